cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export SPARSEDROP_HOPPER=1
timeout 150 python tileinfo.py 2>&1 | tee $OUT/call8_tileinfo.log
(echo "# session 27, call 8, tree $(cat .commit | tr '\n' ' '): tests/test_block_sparse_matmul_hopper.py -m gpu (-n 16)"; timeout 100 python -m pytest -q -n 16 -m gpu tests/test_block_sparse_matmul_hopper.py 2>&1 | tail -2) | tee $OUT/call8_gpu_tests.log

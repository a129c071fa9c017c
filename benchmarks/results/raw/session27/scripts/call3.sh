cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export SPARSEDROP_HOPPER=1
timeout 200 python halves.py 2>&1 | tee $OUT/call3_halves.log
timeout 240 python -m pytest -q -n 16 -m gpu tests/test_block_sparse_matmul_hopper.py -x 2>&1 | tail -15 | tee $OUT/call3_gpu_tests.log

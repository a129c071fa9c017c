cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export SPARSEDROP_HOPPER=1
timeout 260 python prefetch.py 2>&1 | tee $OUT/call4_prefetch.log
timeout 150 python -m pytest -q -n 16 -m gpu tests/test_block_sparse_matmul_hopper.py -x 2>&1 | tail -3 | tee $OUT/call4_gpu_tests.log

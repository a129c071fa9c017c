cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export SPARSEDROP_HOPPER=1 PYTHONUNBUFFERED=1
timeout 150 python zeros28.py 2>&1 | tee $OUT/call8_zeros.log
timeout 100 python -m pytest -q -n 16 -m gpu tests/test_block_sparse_matmul_hopper.py 2>&1 | tail -3 | tee $OUT/call8_gpu_tests.log

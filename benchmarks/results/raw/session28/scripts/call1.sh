cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export SPARSEDROP_HOPPER=1 PYTHONUNBUFFERED=1
cp ../probe28a.py .
timeout 200 python probe28a.py ab 2>&1 | tee $OUT/call1_ab.log
timeout 170 python probe28a.py curve 2>&1 | tee $OUT/call1_curve.log
timeout 150 python -m pytest -q -n 16 -m gpu tests/test_block_sparse_matmul_hopper.py 2>&1 | tail -5 | tee $OUT/call1_gpu_tests.log

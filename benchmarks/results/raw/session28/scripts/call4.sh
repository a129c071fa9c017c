cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export SPARSEDROP_HOPPER=1 PYTHONUNBUFFERED=1
cp -r ../hostdesc28.py ../base28 .
timeout 280 python hostdesc28.py 2>&1 | tee $OUT/call4_hostdesc.log
timeout 100 python -m pytest -q -n 16 -m gpu tests/test_block_sparse_matmul_hopper.py 2>&1 | tail -4 | tee $OUT/call4_gpu_tests.log
timeout 100 python -m pytest -q -n 16 -m gpu tests/test_launch_plans.py tests/test_eager_path.py 2>&1 | tail -4 | tee -a $OUT/call4_gpu_tests.log
timeout 100 python -m pytest -q -n 16 -m gpu tests/test_gpu_backend.py -k "not hf_models" 2>&1 | tail -4 | tee -a $OUT/call4_gpu_tests.log

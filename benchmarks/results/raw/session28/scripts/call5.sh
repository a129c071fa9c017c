cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export SPARSEDROP_HOPPER=1 PYTHONUNBUFFERED=1
timeout 100 python -m pytest -q -n 16 -m gpu tests/test_block_sparse_matmul_hopper.py -x 2>&1 | tail -3 | tee $OUT/call5_gpu_tests.log
timeout 220 python pdl28.py 2>&1 | tee $OUT/call5_pdl.log
timeout 100 python -m pytest -q -n 16 -m gpu tests/test_gpu_backend.py tests/test_eager_path.py tests/test_launch_plans.py -k "not hf_models" 2>&1 | tail -3 | tee -a $OUT/call5_gpu_tests.log

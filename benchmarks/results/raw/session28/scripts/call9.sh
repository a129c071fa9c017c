cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export PYTHONUNBUFFERED=1
timeout 150 python -m pytest -q -n 16 -m gpu tests/test_block_sparse_matmul_hopper.py tests/test_eager_path.py tests/test_launch_plans.py 2>&1 | tail -3 | tee $OUT/call9_gpu_tests.log

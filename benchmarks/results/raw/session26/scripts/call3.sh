cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
echo "tree $(cat .commit)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 120 python benchmarks/profile_stream_k.py 2>&1 | tee $OUT/call3_profile_stream_k.log
timeout 150 python ../probe3.py 2>&1 | tee $OUT/call3_group_probe.log
timeout 280 python -m pytest -q -n 16 tests/test_block_sparse_matmul_hopper.py tests/test_eager_path.py tests/test_launch_plans.py tests/test_output_side.py tests/test_block_sparse_matmul.py -m gpu 2>&1 | tail -4 | tee $OUT/call3_gpu_tests.log

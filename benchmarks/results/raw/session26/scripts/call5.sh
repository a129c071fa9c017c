cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
echo "tree $(cat .commit)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 120 python ../probe5.py 2>&1 | tee $OUT/call5_group_ab.log
mkdir -p $OUT/bench
timeout 300 python -c "import sys; sys.argv=['bench_kernels.py','--skip-compiled','--out','$OUT/bench']; sys.path.insert(0,'benchmarks'); import bench_kernels as b; sys.exit(b.main())" > $OUT/call5_bench_kernels.log 2>&1; tail -22 $OUT/call5_bench_kernels.log
timeout 250 python -m pytest -q -n 16 tests/test_block_sparse_matmul_hopper.py tests/test_eager_path.py -m gpu 2>&1 | tail -3 | tee $OUT/call5_gpu_tests.log

cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
echo "tree $(cat .commit)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p $OUT/bench
timeout 400 python -c "import sys; sys.argv=['bench_kernels.py','--skip-compiled','--out','$OUT/bench']; sys.path.insert(0,'benchmarks'); import bench_kernels as b; sys.exit(b.main())" 2>&1 | tee $OUT/call2_bench_kernels.log | tail -40

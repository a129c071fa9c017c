cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export SPARSEDROP_HOPPER=1
timeout 200 python stages.py 2>&1 | tee $OUT/call5_stages.log
timeout 60 python -m pytest -q -n 16 -m gpu tests/test_block_sparse_matmul_hopper.py -x 2>&1 | tail -2 | tee $OUT/call5_gpu_tests.log
mkdir -p $OUT/bench
timeout 170 python -c "import sys; sys.argv=['bench_kernels.py','--skip-compiled','--out','$OUT/bench']; sys.path.insert(0,'benchmarks'); import bench_kernels as b; sys.exit(b.main())" 2>&1 | tail -40 | tee $OUT/call5_bench_kernels.log

cd .gl/wt
echo "# session 25, call 3, tree: 17f40ff + diff $(cat .commit)"
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 240 python -m pytest -q -n 16 tests/test_block_sparse_matmul_hopper.py tests/test_gpu_backend.py tests/test_eager_path.py -k "not hf_models" 2>&1 | tail -6 | tee $OUT/call3_gpu_tests.log
timeout 120 python ../s25/probe3.py 2>&1 | grep -v -i warn | tee $OUT/call3_copy_ab.log
mkdir -p $OUT/bk && timeout 220 python benchmarks/bench_kernels.py --skip-compiled --out $OUT/bk > $OUT/call3_bench_kernels.log 2>&1; tail -42 $OUT/call3_bench_kernels.log

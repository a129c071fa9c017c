echo "# session 23, call 5: $(cat .gl/wt/.commit) (GPU tests, per-kernel times)"
cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1
timeout 330 python -m pytest -q -n 16 tests/test_block_sparse_matmul.py tests/test_gpu_backend.py tests/test_eager_path.py tests/test_output_side.py -k "not hf_" 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -15 | tee $OUT/call5_gpu_tests.log
SPARSEDROP_HOPPER=0 timeout 200 python ../perk.py 8192x768x768,2048x768x768,8192x768x3072 2>&1 | grep -v Warn | grep -E 'lb34|cublas' | tee $OUT/call5_perk.log

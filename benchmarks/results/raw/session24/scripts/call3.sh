echo "# session 24, call 3: $(cat .gl/wt/.commit) + working tree (prefer_tma)"
cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1
timeout 300 python -m pytest -q -n 16 tests/test_block_sparse_matmul.py tests/test_gpu_backend.py tests/test_eager_path.py tests/test_output_side.py tests/test_ops_and_config.py -k "not hf_" 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -15 | tee $OUT/call3_gpu_tests.log
timeout 90 python scripts/perk3.py 8192x3072x768,8192x768x3072 0.3 2>&1 | grep -E "^SUMMARY|H200" | tee $OUT/call3_perk.log
ROUNDS=8 timeout 200 python scripts/abrule.py 16 512 0.3 inductor,sparsedrop,old_rule 2>&1 | grep -v Warn | tee $OUT/call3_ab16x512.log

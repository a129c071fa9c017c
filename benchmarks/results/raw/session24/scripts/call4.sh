echo "# session 24, call 4: $(cat .gl/wt/.commit) + working tree (alignment hint)"
cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1
timeout 120 python scripts/sweep_align.py 2>&1 | grep -v Warn | tee $OUT/call4_sweep_align.log
timeout 270 python -m pytest -q -n 16 tests/test_block_sparse_matmul.py tests/test_output_side.py tests/test_eager_path.py tests/test_gpu_backend.py -k "not hf_" 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -15 | tee $OUT/call4_gpu_tests.log

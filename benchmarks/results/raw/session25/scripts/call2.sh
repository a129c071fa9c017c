cd .gl/wt
echo "# session 25, call 2, tree: 17f40ff + diff $(cat .commit)"
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 330 python -m pytest -q -n 16 tests/test_block_sparse_matmul_hopper.py 2>&1 | tail -8 | tee $OUT/call2_gpu_tests.log
timeout 230 python ../s25/probe2.py 2>&1 | grep -v -i warn | tee $OUT/call2_probe.log

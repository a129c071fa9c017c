set -x
cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
echo "tree $(cat .commit) + snake deal (uncommitted)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 300 python ../probe1.py 2>&1 | tee $OUT/call1_snake_probe.log
timeout 200 python -m pytest -q -x -n 16 tests/test_block_sparse_matmul_hopper.py 2>&1 | tail -5 | tee $OUT/call1_gpu_tests.log

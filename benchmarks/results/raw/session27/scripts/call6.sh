cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
echo "tree $(cat .commit)"
timeout 300 python -m pytest -q -n 16 -m gpu tests/test_block_sparse_matmul_hopper.py tests/test_eager_path.py 2>&1 | tail -4 | tee $OUT/call6_gpu_tests.log

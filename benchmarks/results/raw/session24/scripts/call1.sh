echo "# session 24, call 1: $(cat .gl/wt/.commit)"
cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv
SPARSEDROP_HOPPER=0 timeout 300 python scripts/perk2.py 8192x3072x768,8192x768x3072,32768x768x3072,32768x3072x768,16384x4096x4096 0.3 2>&1 | grep -v Warn | tee $OUT/call1_perk.log
ROUNDS=8 timeout 260 python ../session23/scripts/abhost.py 16 512 0.3 inductor,sparsedrop,tma0 2>&1 | grep -v Warn | tee $OUT/call1_ab16x512.log

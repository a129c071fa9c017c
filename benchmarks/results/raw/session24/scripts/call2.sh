echo "# session 24, call 2: $(cat .gl/wt/.commit)"
cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1
timeout 280 python scripts/sweep_tma.py 2>&1 | grep -v Warn | tee $OUT/call2_sweep.log
ROUNDS=8 timeout 280 python ../session23/scripts/abhost.py 64 512 0.3 inductor,sparsedrop,tma0 2>&1 | grep -v Warn | tee $OUT/call2_ab64x512.log

cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 SPARSEDROP_HOPPER=0
S=8192x768x768,8192x768x3072,8192x3072x768,16384x768x3072,32768x768x3072
for site in input output; do
  python ../mid.py $site 34 $OUT/mid.csv $S 0.3 cublas,inductor,sparsedrop 2>&1 | grep -v Warn | tee -a $OUT/call2_mid.log
  python ../mid.py $site 40 $OUT/mid.csv $S 0.3 sparsedrop 2>&1 | grep -v Warn | tee -a $OUT/call2_mid.log
done

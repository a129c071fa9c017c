cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export SPARSEDROP_HOPPER=1
(ncu --query-metrics 2>/dev/null | grep -i -E "gmma|tensor_op" | head -20) > $OUT/call2_ncu_metric_names.txt
timeout 200 ncu --clock-control none --kernel-name regex:"_listed_wgmma|nvjet" --launch-skip 12 --launch-count 6 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section WarpStateStats \
  --section SchedulerStats --section Occupancy --section LaunchStats python ncu_t5.py > $OUT/call2_ncu_t5.txt 2>&1
echo "ncu rc $?"
timeout 330 python tiles.py 2>&1 | tee $OUT/call2_tiles.log

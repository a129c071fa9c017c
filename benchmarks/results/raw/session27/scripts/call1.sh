set -x
cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version --format=csv
T=$(python -c "import triton,os;print(os.path.dirname(triton.__file__))")
grep -n "grid_dependency\|def gdc\|launch_pdl" -r $T --include=*.py | head -20
python timeline.py 2>&1 | tee $OUT/call1_timeline.log

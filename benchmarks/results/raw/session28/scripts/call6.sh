cd .gl/wt && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
export PYTHONUNBUFFERED=1
mkdir -p $OUT/bk
timeout 240 python -c "import sys; sys.argv=['bench_kernels.py','--skip-compiled','--out','$OUT/bk']; sys.path.insert(0, 'benchmarks'); import bench_kernels as b; sys.exit(b.main())" 2>&1 | grep -v Warn | tee $OUT/call6_bench_kernels.log
timeout 150 python -c "
import sys; sys.path.insert(0, 'benchmarks'); import host_overhead as h
for r in h.eager_functional(5): print(r, flush=True)
from sparsedrop_compile.kernels import launch_plans; print(launch_plans.stats)" 2>&1 | grep -v Warn | tee $OUT/call6_eager_host.log

export PYTHONUNBUFFERED=1
for tree in wt0 wt wt0 wt; do
  (cd .gl/$tree && python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
   timeout 100 python -c "
import sys; sys.path.insert(0, 'benchmarks'); import host_overhead as h
h.EAGER_SHAPES = [(4096, 4096, 4096), (8192, 1024, 4096), (8192, 768, 3072)]
for r in h.eager_functional(5):
    if r['backend'] == 'sparsedrop': print('$tree', r, flush=True)
from sparsedrop_compile.kernels import launch_plans; print('$tree', launch_plans.stats)" 2>&1 | grep -v Warn | tee -a $OUT/call7_eager_host_ab.log)
done

"""Mid-size sites: light (launch-bound) vs full (TMA + lists) portable path, input and output side."""
import sys, csv, os
sys.path.insert(0, "benchmarks")
import torch, torch.nn.functional as F
import linear_compiled as lc
from sparsedrop_compile.kernels import runtime
site = sys.argv[1]; lb = int(sys.argv[2]); out = sys.argv[3]
shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[4].split(",")]
ps = [float(x) for x in sys.argv[5].split(",")]
methods = sys.argv[6].split(",")
runtime.LAUNCH_BOUND_WORK = 2 ** lb
if site == "output":
    lc._site = lambda p: (lambda x, w: F.dropout(F.linear(x, w), p, training=True))
rows = lc.run(shapes, ps, methods)
for r in rows:
    r.update(site=site, launch_bound_log2=lb)
new = not os.path.exists(out)
with open(out, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    if new: w.writeheader()
    w.writerows(rows)

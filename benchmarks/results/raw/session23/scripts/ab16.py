"""BERT-base steps, default mode: Inductor, sparsedrop, sparsedrop without dsd_tn's split, compiled
first, then timed in interleaved rounds (host drift reaches all alike)."""
import sys, time, statistics, gc
sys.path.insert(0, "benchmarks")
import torch
from sparsedrop_compile import harness
from sparsedrop_compile.models import build_model, example_batch
from sparsedrop_compile.kernels import block_sparse_matmul_configs as configs
torch._inductor.config.fx_graph_cache = False  # the variants differ below the graph: no cache hits
torch._functorch.config.enable_autograd_cache = False
batch, seq, p = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
print(harness.device_name("cuda"), torch.__version__, f"bert base {batch}x{seq} p={p}", flush=True)
variants = {}
for name in ("inductor", "sparsedrop", "sparsedrop_nosplit"):
    torch.manual_seed(0)
    model = build_model("bert", size="base", dropout=p).cuda().train()
    data = example_batch(model, batch=batch, seq=seq, device="cuda")
    f = torch.compile(model, backend="inductor" if name == "inductor" else "sparsedrop")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step = (lambda f, data, opt: (lambda: harness.train_step(lambda: f(**data).loss, opt, autocast="cuda")))(f, data, opt)
    saved = configs._SPLIT_MAX
    configs._TUNER.best.clear()
    if name.endswith("nosplit"):
        configs._SPLIT_MAX = 1
    try:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    finally:
        configs._SPLIT_MAX = saved
    variants[name] = step
times = {n: [] for n in variants}
for r in range(6):
    for n, step in variants.items():
        for _ in range(20):
            torch.cuda.synchronize(); t0 = time.perf_counter(); step(); torch.cuda.synchronize()
            times[n].append((time.perf_counter() - t0) * 1e3)
base = statistics.median(times["inductor"])
for n, t in times.items():
    m = statistics.median(t)
    print(f"  {n:20s} median {m:6.2f} ms (p25 {statistics.quantiles(t, n=4)[0]:.2f}, p75 {statistics.quantiles(t, n=4)[2]:.2f}); speed-up vs inductor {base / m:.3f}x", flush=True)

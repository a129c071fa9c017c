"""BERT-base steps, default mode, interleaved: Inductor and sparsedrop variants that differ in the
mid-size path (default; LAUNCH_BOUND_WORK 2^36; TMA off)."""
import os, sys, time, statistics
import torch
from sparsedrop_compile import harness
from sparsedrop_compile.models import build_model, example_batch
from sparsedrop_compile.kernels import block_sparse_matmul_configs as configs, runtime
torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False
batch, seq, p = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
names = sys.argv[4].split(",")
print(harness.device_name("cuda"), torch.__version__, f"bert base {batch}x{seq} p={p}", flush=True)
variants = {}
for name in names:
    torch.manual_seed(0)
    model = build_model("bert", size="base", dropout=p).cuda().train()
    data = example_batch(model, batch=batch, seq=seq, device="cuda")
    f = torch.compile(model, backend="inductor" if name == "inductor" else "sparsedrop")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step = (lambda f, data, opt: (lambda: harness.train_step(lambda: f(**data).loss, opt, autocast="cuda")))(f, data, opt)
    configs._TUNER.best.clear()
    saved = runtime.LAUNCH_BOUND_WORK
    if name == "lb36":
        runtime.LAUNCH_BOUND_WORK = 2**36
    if name == "tma0":
        os.environ["SPARSEDROP_TMA"] = "0"
    saved_rule = configs.prefer_tma
    if name == "old_rule":  # session 23's order: TMA first for every kernel that can take it
        configs.prefer_tma = lambda *a, **k: True
    try:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    finally:
        runtime.LAUNCH_BOUND_WORK = saved
        configs.prefer_tma = saved_rule
        os.environ.pop("SPARSEDROP_TMA", None)
    variants[name] = step
    print("  compiled", name, flush=True)
times = {n: [] for n in variants}
for r in range(int(os.environ.get("ROUNDS", 5))):
    for n, step in variants.items():
        for _ in range(20):
            torch.cuda.synchronize(); t0 = time.perf_counter(); step(); torch.cuda.synchronize()
            times[n].append((time.perf_counter() - t0) * 1e3)
base = statistics.median(times[names[0]])
for n, t in times.items():
    m = statistics.median(t)
    q = statistics.quantiles(t, n=4)
    print(f"  {n:10s} median {m:6.2f} ms (p25 {q[0]:.2f}, p75 {q[2]:.2f}); speed-up vs {names[0]} {base / m:.3f}x", flush=True)

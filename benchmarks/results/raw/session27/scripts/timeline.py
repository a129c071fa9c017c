"""Kernel timeline of one CUDA-graph replay of the whole op (flag draw + fwd + bwd) and of dense
F.linear fwd+bwd, from torch.profiler (CUPTI traces graph kernel nodes)."""
import math, sys, statistics
import torch, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
import sparsedrop_compile  # noqa
from sparsedrop_compile.harness import capture_cuda_graph
from sparsedrop_compile.kernels.block_mask import dropout_scale, sample_block_keep

BLOCK = (128, 128)

def steps(rows, n, k, p):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    w = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / math.sqrt(k)).requires_grad_()
    dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = dropout_scale(p)
    def ours():
        keep = sample_block_keep(x, p, *BLOCK, batched=False)
        return torch.autograd.grad(torch.ops.sparsedrop.linear(x, w, None, keep, scale, *BLOCK, "triton"), (x, w), dy)
    def dense():
        return torch.autograd.grad(F.linear(x, w), (x, w), dy)
    return dict(ours=ours, dense=dense)

def timeline(fn, reps=12):
    g, keep = capture_cuda_graph(fn)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            g.replay()
            torch.cuda.synchronize()
            torch.cuda._sleep(2_000_000)
            torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "sleep" not in e.name]
    evs.sort(key=lambda e: e.time_range.start)
    # split into replays by big gaps
    runs, cur = [], []
    for e in evs:
        if cur and e.time_range.start - cur[-1].time_range.end > 200:
            runs.append(cur); cur = []
        cur.append(e)
    runs.append(cur)
    runs = [r for r in runs if len(r) == len(runs[-1])]
    n = len(runs[-1])
    rows = []
    for i in range(n):
        durs = [r[i].time_range.elapsed_us() for r in runs]
        gaps = [r[i].time_range.start - r[i - 1].time_range.end for r in runs] if i else [0]
        rows.append((runs[-1][i].name[:70], statistics.median(durs), statistics.median(gaps)))
    spans = [r[-1].time_range.end - r[0].time_range.start for r in runs]
    return rows, statistics.median(spans), len(runs)

for shape in [(8192, 768, 3072), (8192, 1024, 4096), (6000, 2000, 3000), (4096, 4096, 4096)]:
    for p in (0.1, 0.5):
        st = steps(*shape, p)
        for name, fn in st.items():
            if name == "dense" and p == 0.5:
                continue
            rows, span, nr = timeline(fn)
            busy = sum(r[1] for r in rows)
            print(f"== {shape} p={p} {name}: span {span:.1f} us, kernels {busy:.1f} us, gaps {span - busy:.1f} us ({nr} replays)")
            for nm, d, gap in rows:
                print(f"   gap {gap:6.1f}  dur {d:7.1f}  {nm}")
        sys.stdout.flush()

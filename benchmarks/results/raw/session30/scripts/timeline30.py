"""Session 30: kernel-by-kernel durations of one CUDA-graph replay of the whole op as
bench_kernels.py's "ours" runs it (flag draw + forward + backward of sparsedrop.linear) and of
dense F.linear forward + backward, on the five shapes of the Hopper-kernels issue, p = 0.1 / 0.5,
the L2 flushed before each replay (torch.profiler; CUPTI traces a graph's kernel nodes). Replays
are told apart by the flush kernel; per kernel the median over the replays of its duration and of
the gap before it, then the replay's span (first start to last end), its kernels' sum and gaps."""
import math, statistics, sys
import torch, torch.nn.functional as F, triton
from torch.profiler import profile, ProfilerActivity
import sparsedrop_compile  # noqa: F401 (registers the ops)
from sparsedrop_compile.harness import capture_cuda_graph
from sparsedrop_compile.kernels.block_mask import dropout_scale, sample_block_keep

BLOCK = (128, 128)
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")


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
    g, _ = capture_cuda_graph(fn)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.zero_()
            g.replay()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    evs.sort(key=lambda e: e.time_range.start)
    runs, cur, in_run = [], [], False
    for e in evs:
        is_flush = "fill" in e.name.lower() and e.time_range.elapsed_us() > 20  # the 256 MB zero_()
        if is_flush:
            if cur:
                runs.append(cur)
            cur, in_run = [], True
        elif in_run:
            cur.append(e)
    if cur:
        runs.append(cur)
    n = statistics.mode(len(r) for r in runs)
    runs = [r for r in runs if len(r) == n]
    rows = []
    for i in range(n):
        durs = [r[i].time_range.elapsed_us() for r in runs]
        gaps = [r[i].time_range.start - r[i - 1].time_range.end for r in runs] if i else [0.0]
        rows.append((runs[-1][i].name[:70], statistics.median(durs), statistics.median(gaps)))
    span = statistics.median(r[-1].time_range.end - r[0].time_range.start for r in runs)
    return rows, span, len(runs)


for shape in [(4096, 4096, 4096), (8192, 1024, 4096), (8192, 4096, 14336), (8192, 768, 3072), (6000, 2000, 3000)]:
    for p in (0.1, 0.5):
        for name, fn in steps(*shape, p).items():
            if name == "dense" and p == 0.5:
                continue
            rows, span, nr = timeline(fn)
            busy = sum(r[1] for r in rows)
            print(f"== {'x'.join(map(str, shape))} p={p} {name}: span {span:.1f} us, kernels {busy:.1f} us, "
                  f"gaps {span - busy:.1f} us ({nr} replays)")
            for nm, d, gap in rows:
                print(f"   gap {gap:6.1f}  dur {d:8.1f}  {nm}")
        sys.stdout.flush()

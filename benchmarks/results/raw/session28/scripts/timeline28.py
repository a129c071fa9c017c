"""Session 28, call 2: kernel-by-kernel durations (torch.profiler over CUDA-graph replays, the L2
flushed before each) of each T5 product at p = 0 / 0.5 / 1: how much of the time that does not
shrink with the kept work is the list launch, and how much the matmul kernel itself."""
import statistics, sys
import torch, triton
from torch.profiler import profile, ProfilerActivity
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
from sparsedrop_compile.harness import capture_cuda_graph
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

def timeline(fn, reps=15):
    g, _ = capture_cuda_graph(fn)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.zero_()
            torch.cuda._sleep(200_000)
            g.replay()
            torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    evs.sort(key=lambda e: e.time_range.start)
    runs, cur, prev_end = [], [], None
    for e in evs:
        if "sleep" in e.name or "fill" in e.name.lower() and e.time_range.elapsed_us() > 20:
            if cur:
                runs.append(cur)
            cur = []
            continue
        cur.append(e)
    if cur:
        runs.append(cur)
    n = statistics.mode(len(r) for r in runs)
    runs = [r for r in runs if len(r) == n]
    rows = []
    for i in range(n):
        durs = [r[i].time_range.elapsed_us() for r in runs]
        gaps = [r[i].time_range.start - r[i - 1].time_range.end for r in runs] if i else [0]
        rows.append((runs[-1][i].name[:60], statistics.median(durs), statistics.median(gaps)))
    return rows, len(runs)

M, N, K = 8192, 768, 3072
torch.manual_seed(0)
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
a3, b3, g3 = x[None], w.t()[None], dy[None]
dw = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
for p in (0.0, 0.5, 1.0):
    keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
    for name, fn in (("fwd", lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128))),
                     ("dX", lambda: tri.sdd(g3, b3, keep, 1.0, (128, 128))),
                     ("dW", lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw.t().unsqueeze(0))),
                     ("cuBLAS fwd", lambda: torch.nn.functional.linear(x, w)), ("cuBLAS dX", lambda: dy @ w),
                     ("cuBLAS dW", lambda: dy.t() @ x)):
        if name.startswith("cuBLAS") and p:
            continue
        rows, nr = timeline(fn)
        print(f"== T5 {name} p={p} ({nr} replays): " + "  |  ".join(f"{nm} {d:.1f} (gap {gap:.1f})" for nm, d, gap in rows), flush=True)

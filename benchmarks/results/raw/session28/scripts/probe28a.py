"""Session 28, call 1. (a) Each T5 kernel's time against p from 0 to 1 (the part that does not
shrink with the kept work), default plans; (b) whole listed tiles taken in turns by two consumer
warpgroups (_LISTED_PINGPONG) against the default's one tile of two cooperating warpgroups, where
the default takes 128 x 128 whole tiles. 'gapped' (graph replay, L2 flushed: bench_kernels.py's
method) / 'sustained' (do_bench_cudagraph). Same fresh masks for every variant; outputs checked
bit-equal."""
import sys
import torch, triton
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
from sparsedrop_compile.harness import capture_cuda_graph, do_bench
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)

def gapped(fn):
    g, _ = capture_cuda_graph(fn)
    return 1000 * do_bench(g.replay, warmup=25, rep=100)

def sustained(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=60)

def problem(M, N, K):
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    a3, b3, g3 = x[None], w.t()[None], dy[None]
    dw = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
    return {"fwd": (lambda keep: tri.dsd(a3, b3, keep, 1.0, (128, 128)), lambda: torch.nn.functional.linear(x, w),
                    lambda keep: hopper.plan_dsd(a3, b3, keep, (128, 128), None, None, torch.empty(1, M, N, device="cuda", dtype=torch.bfloat16))),
            "dX": (lambda keep: tri.sdd(g3, b3, keep, 1.0, (128, 128)), lambda: dy @ w, None),
            "dW": (lambda keep: (tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw.t().unsqueeze(0)), dw)[1],
                   lambda: dy.t() @ x,
                   lambda keep: hopper.plan_dsd_tn(a3, g3, keep, (128, 128), False, None, dw.t().unsqueeze(0)))}

def masks(M, K, p, n):
    return [torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p for _ in range(n)]

part = sys.argv[1] if len(sys.argv) > 1 else "ab"
if part == "curve":
    M, N, K = 8192, 768, 3072
    kernels = problem(M, N, K)
    for kname, (ours, dense, plan) in kernels.items():
        d = (gapped(dense), sustained(dense))
        print(f"T5 {kname} cuBLAS {d[0]:.1f}/{d[1]:.1f}", flush=True)
        variants = ["default", "pingpong"] if kname == "fwd" else ["default"]
        for p in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
            res = {v: [[], []] for v in variants}
            for keep in masks(M, K, p, 1 if p in (0.0, 1.0) else 3):
                outs = []
                for v in variants:
                    hopper._LISTED_PINGPONG = v == "pingpong"
                    outs.append(ours(keep).clone())
                    res[v][0].append(gapped(lambda: ours(keep)))
                    res[v][1].append(sustained(lambda: ours(keep)))
                hopper._LISTED_PINGPONG = False
                if any(not torch.equal(outs[0], o) for o in outs[1:]):
                    print("   !! outputs differ", flush=True)
            print(f"   p={p}: " + "  ".join(
                f"{v} {sum(r[0])/len(r[0]):.1f}/{sum(r[1])/len(r[1]):.1f} ({sum(r[0])/len(r[0])/d[0]:.3f}/{sum(r[1])/len(r[1])/d[1]:.3f})"
                for v, r in res.items()), flush=True)
else:
    for (M, N, K), kname in [((8192, 768, 3072), "fwd"), ((16384, 768, 3072), "fwd"), ((8192, 768, 768), "fwd"),
                             ((8192, 1024, 4096), "dW"), ((6144, 2048, 3072), "dW"), ((4096, 2048, 3072), "dW")]:
        ours, dense, plan = problem(M, N, K)[kname]
        d = (gapped(dense), sustained(dense))
        for p in (0.0, 0.1, 0.5):
            res = {v: [[], []] for v in ("default", "pingpong")}
            for keep in masks(M, K, p, 1 if p == 0 else 3):
                outs = []
                for v in res:
                    hopper._LISTED_PINGPONG = v == "pingpong"
                    pl = plan(keep)
                    cfg = (pl.cfg.tile_r, pl.cfg.tile_c, pl.cfg.pingpong, pl.stream_k)
                    outs.append(ours(keep).clone())
                    res[v][0].append(gapped(lambda: ours(keep)))
                    res[v][1].append(sustained(lambda: ours(keep)))
                    res[v].append(cfg)
                hopper._LISTED_PINGPONG = False
                if any(not torch.equal(outs[0], o) for o in outs[1:]):
                    print("   !! outputs differ", flush=True)
            avg = {v: (sum(r[0]) / len(r[0]), sum(r[1]) / len(r[1]), r[2]) for v, r in res.items()}
            b = avg["default"]
            print(f"{M}x{N}x{K} {kname} p={p} cuBLAS {d[0]:.1f}/{d[1]:.1f}: " + "  ".join(
                f"{v}{a[2]} {a[0]:.1f}/{a[1]:.1f} ({a[0]/d[0]:.3f}/{a[1]/d[1]:.3f}; /default {a[0]/b[0]:.3f}/{a[1]/b[1]:.3f})"
                for v, a in avg.items()), flush=True)

"""Session 27, call 5: ring depth of the 128 x 128 tiles. The square tiles (forward / weight
gradient where they fill the waves, stream-K's 128 x 128) at 5 stages (this tree) against 4, and
the flat sdd's ping-pong tiles at 4 (default) against 5; variants alternate which runs first per
mask; 'gapped' (graph replay, L2 flushed: bench_kernels.py's method) / 'sustained'
(do_bench_cudagraph); three fresh masks per p; outputs checked bit-equal."""
import dataclasses, torch, triton
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
from sparsedrop_compile.harness import capture_cuda_graph, do_bench
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
C0 = dict(hopper._CONFIGS)

def gapped(fn):
    g, _ = capture_cuda_graph(fn)
    return 1000 * do_bench(g.replay, warmup=25, rep=100)

def sustained(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=60)

def set_stages(name, stages):
    hopper._CONFIGS = dict(C0)
    hopper._CONFIGS[name] = dataclasses.replace(C0[name], stages=stages)

CASES = [("square", "fwd", (8192, 768, 3072)), ("square", "dW", (8192, 768, 3072)), ("square", "fwd", (16384, 768, 3072)),
         ("square", "dW", (6144, 2048, 3072)), ("square", "dW", (4096, 2048, 3072)),
         ("pingpong", "dX", (8192, 768, 3072)), ("pingpong", "dX", (8192, 1024, 4096)), ("pingpong", "dX", (4096, 4096, 4096)),
         ("pingpong", "dX", (6000, 2000, 3000))]
for cfg_name, kname, (M, N, K) in CASES:
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    a3, b3, g3 = x[None], w.t()[None], dy[None]
    dw = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
    ours, dense = {
        "fwd": (lambda keep: tri.dsd(a3, b3, keep, 1.0, (128, 128)), lambda: torch.nn.functional.linear(x, w)),
        "dX": (lambda keep: tri.sdd(g3, b3, keep, 1.0, (128, 128)), lambda: dy @ w),
        "dW": (lambda keep: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw.t().unsqueeze(0)), lambda: dy.t() @ x),
    }[kname]
    d_gap, d_sus = gapped(dense), sustained(dense)
    stages = (5, 4) if cfg_name == "square" else (4, 5)
    for p in (0.0, 0.1, 0.5):
        res = {}
        for m in range(3 if p else 2):
            keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
            outs = {}
            for s in (stages if m % 2 == 0 else stages[::-1]):
                set_stages(cfg_name, s)
                o = ours(keep)
                outs[s] = (o if o is not None else dw).clone()
                r = res.setdefault(s, [[], []])
                r[0].append(gapped(lambda: ours(keep)))
                r[1].append(sustained(lambda: ours(keep)))
            hopper._CONFIGS = dict(C0)
            if not torch.equal(outs[4], outs[5]):
                print("   !! outputs differ", flush=True)
        avg = {s: (sum(r[0]) / len(r[0]), sum(r[1]) / len(r[1])) for s, r in res.items()}
        print(f"{cfg_name} {M}x{N}x{K} {kname} p={p} cuBLAS {d_gap:.1f}/{d_sus:.1f}: " + "  ".join(
            f"stages {s} {a[0]:.1f}/{a[1]:.1f} ({a[0]/d_gap:.3f}/{a[1]/d_sus:.3f})" for s, a in sorted(avg.items()))
            + f"  5/4 {avg[5][0]/avg[4][0]:.3f}/{avg[5][1]/avg[4][1]:.3f}", flush=True)

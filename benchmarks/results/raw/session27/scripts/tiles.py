"""Session 27, call 2: forward (dsd) and weight-gradient (dsd_tn) tile / schedule variants on the
issue's narrow shapes, each against the cuBLAS product it replaces, timed two ways in one run:
'gapped' (graph replay, L2 flushed, idle between: bench_kernels.py's method) and 'sustained'
(do_bench_cudagraph, back to back). Three fresh masks per p, same masks for every variant; the
variants' outputs are checked equal to the default's."""
import dataclasses, os, sys, torch, triton
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
from sparsedrop_compile.harness import capture_cuda_graph, do_bench
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
C0, SK0, cfg0 = dict(hopper._CONFIGS), hopper._STREAM_K, hopper._config

def gapped(fn):
    g, _ = capture_cuda_graph(fn)
    return 1000 * do_bench(g.replay, warmup=25, rep=100)

def sustained(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=60)

def variant(name):
    hopper._CONFIGS, hopper._STREAM_K, hopper._config = dict(C0), SK0, cfg0
    if name == "default":
        return
    tile, sk = name.split("/")
    cfg = C0[tile]
    hopper._config = lambda *a, cfg=cfg: cfg
    hopper._STREAM_K = sk == "sk"
    if sk == "sk" and tile == "tall":
        hopper._CONFIGS["square"] = cfg  # keep _plan from swapping to 128 x 128

SHAPES = [(8192, 768, 3072), (8192, 1024, 4096), (6000, 2000, 3000)]
for (M, N, K) in SHAPES:
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    a3, b3, g3 = x[None], w.t()[None], dy[None]
    dw = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
    kernels = {
        "fwd": (lambda keep: tri.dsd(a3, b3, keep, 1.0, (128, 128)), lambda: torch.nn.functional.linear(x, w),
                ["default", "square/whole", "square/sk", "wide/whole", "wide/sk"]),
        "dW": (lambda keep: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw.t().unsqueeze(0)),
               lambda: dy.t() @ x, ["default", "square/whole", "square/sk", "tall/whole", "tall/sk"]),
    }
    for kname, (ours, dense, variants) in kernels.items():
        d_gap, d_sus = gapped(dense), sustained(dense)
        for p in (0.0, 0.1, 0.5):
            res = {}
            for m in range(3 if p else 1):
                keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
                ref = None
                for v in variants:
                    variant(v)
                    try:
                        out = ours(keep)
                        out = (out if out is not None else dw).clone()
                        if ref is None:
                            ref = out
                        elif not torch.equal(out, ref):
                            err = (out.float() - ref.float()).abs().max().item()
                            if err > 0.02 * ref.float().abs().max().item():
                                print(f"   !! {v} differs by {err}", flush=True)
                        r = res.setdefault(v, [[], []])
                        r[0].append(gapped(lambda: ours(keep)))
                        r[1].append(sustained(lambda: ours(keep)))
                    except Exception as e:  # noqa
                        print(f"   !! {v}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                variant("default")
            line = "  ".join(f"{v} {sum(r[0])/len(r[0]):.1f}/{sum(r[1])/len(r[1]):.1f} "
                             f"({sum(r[0])/len(r[0])/d_gap:.3f}/{sum(r[1])/len(r[1])/d_sus:.3f})" for v, r in res.items())
            print(f"{M}x{N}x{K} {kname} p={p} cuBLAS {d_gap:.1f}/{d_sus:.1f}: {line}", flush=True)

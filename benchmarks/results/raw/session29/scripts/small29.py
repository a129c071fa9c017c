"""Session 29, call 1: small problems under CUDA graphs. Each product (forward dsd, dX sdd, dW
dsd_tn) of x (M x K) -> (M x N), against the cuBLAS product it replaces, three ways:
  walk   the eager launcher's default at launch-bound sizes (< 2^34 multiply-adds): every block
         walked, dropped ones read as zeros, no lists (what a graph captured from eager code runs)
  lists  the portable kernels as compiled code under CUDA graphs picks them (not launch-bound:
         kept-block lists, balance)
  gluon  the Hopper wgmma kernel (which _usable refuses below 2^34 today)
gapped (graph replay, L2 flushed: bench_kernels.py's method) / sustained (do_bench_cudagraph);
three fresh masks per p, the same for every variant; outputs checked against the reference."""
import os, sys
import torch, triton
from torch._inductor import config as inductor_config
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels import block_sparse_matmul as ref
from sparsedrop_compile.kernels.block_mask import cdiv
from sparsedrop_compile.harness import capture_cuda_graph, do_bench
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)

def variant(v):
    os.environ.pop("SPARSEDROP_TMA", None)
    os.environ["SPARSEDROP_HOPPER"] = "1"
    inductor_config.triton.cudagraphs = False
    if v == "lists":
        inductor_config.triton.cudagraphs = True
        os.environ["SPARSEDROP_HOPPER"] = "0"
    elif v == "gluon":
        os.environ["SPARSEDROP_TMA"] = "always"

def gapped(fn):
    g, _ = capture_cuda_graph(fn)
    return 1000 * do_bench(g.replay, warmup=25, rep=100)

def sustained(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=60)

VARIANTS = ("walk", "lists", "gluon")
SHAPES = [tuple(int(v) for v in s.split("x")) for s in sys.argv[1:]] or \
    [(2048, 768, 3072), (1024, 768, 3072), (4096, 768, 3072), (2048, 768, 768), (2048, 1024, 4096), (2048, 4096, 1024)]
for (M, N, K) in SHAPES:
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    a3, b3, g3 = x[None], w.t()[None], dy[None]
    dw = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
    blk = (128, 128)
    kernels = {"fwd": (lambda keep: tri.dsd(a3, b3, keep, 1.0, blk), lambda: torch.nn.functional.linear(x, w),
                       lambda keep: ref.reference_dsd(a3.float(), b3.float(), keep, 1.0, blk)),
               "dX": (lambda keep: tri.sdd(g3, b3, keep, 1.0, blk), lambda: dy @ w,
                      lambda keep: ref.reference_sdd(g3.float(), b3.float(), keep, 1.0, blk)),
               "dW": (lambda keep: (tri.dsd_tn(a3, g3, keep, 1.0, blk, False, out=dw.t().unsqueeze(0)), dw)[1],
                      lambda: dy.t() @ x,
                      lambda keep: ref.reference_dsd_tn(a3.float(), g3.float(), keep, 1.0, blk, False)[0].t())}
    for kname, (ours, dense, oracle) in kernels.items():
        variant("walk")
        d = (gapped(dense), sustained(dense))
        for p in (0.1, 0.5):
            res = {v: [[], []] for v in VARIANTS}
            for m in range(3):
                keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
                want = oracle(keep).float()
                for v in VARIANTS:
                    variant(v)
                    got = ours(keep).float().reshape(want.shape)
                    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
                    if err > 2e-2:
                        print(f"   !! {v} {kname} p={p} rel err {err:.3g}", flush=True)
                    res[v][0].append(gapped(lambda: ours(keep)))
                    res[v][1].append(sustained(lambda: ours(keep)))
            avg = {v: (sum(r[0]) / len(r[0]), sum(r[1]) / len(r[1])) for v, r in res.items()}
            print(f"{M}x{N}x{K} {kname} p={p} cuBLAS {d[0]:.1f}/{d[1]:.1f}: " + "  ".join(
                f"{v} {a[0]:.1f}/{a[1]:.1f} ({a[0]/d[0]:.3f}/{a[1]/d[1]:.3f})" for v, a in avg.items()), flush=True)
variant("walk")

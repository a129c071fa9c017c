"""Portable kernels (SPARSEDROP_HOPPER=0), each alone, TMA descriptors (default candidate order)
against pointer loads (SPARSEDROP_TMA=0), beside cuBLAS's product; CUDA-graph medians in us,
kept-block lists inside the timing, one mask per p (same mask for both variants)."""
import os, sys, torch, triton
os.environ["SPARSEDROP_HOPPER"] = "0"
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_triton as tri, block_sparse_matmul_configs as configs
from sparsedrop_compile.kernels.block_mask import cdiv
torch.manual_seed(0)
SHAPES = [(4096, 4096, 4096), (8192, 1024, 4096), (8192, 4096, 14336), (8192, 768, 3072), (6000, 2000, 3000),
          (8192, 3072, 768), (32768, 768, 3072), (32768, 3072, 768), (16384, 768, 768)]
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
def bench(fn):
    fn(); torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=40)
tot = {}
for (M, N, K) in SHAPES:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    dense = [bench(lambda: x @ w.t()), bench(lambda: g @ w), bench(lambda: g.t() @ x)]
    a3, b3, g3 = x[None], w.t()[None], g[None]
    for p in (0.0, 0.1, 0.3, 0.5):
        keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
        res = {}
        for v in ("tma", "ptr"):
            if v == "ptr":
                os.environ["SPARSEDROP_TMA"] = "0"
            else:
                os.environ.pop("SPARSEDROP_TMA", None)
            configs._TUNER.best.clear()
            dw_out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
            res[v] = [bench(lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128))),
                      bench(lambda: tri.sdd(g3, b3, keep, 1.0, (128, 128))),
                      bench(lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out))]
            res[v + "_cfg"] = [str(c) for c in configs.tuned_configs().values()]
        os.environ.pop("SPARSEDROP_TMA", None)
        t, q = res["tma"], res["ptr"]
        print(f"{M}x{N}x{K} p={p}: cublas fwd/dx/dw {dense[0]:.1f}/{dense[1]:.1f}/{dense[2]:.1f} | tma {t[0]:.1f}/{t[1]:.1f}/{t[2]:.1f} (sum {sum(t):.1f}) | "
              f"ptr {q[0]:.1f}/{q[1]:.1f}/{q[2]:.1f} (sum {sum(q):.1f}) | ptr/tma {q[0]/t[0]:.3f}/{q[1]/t[1]:.3f}/{q[2]/t[2]:.3f} sum {sum(q)/sum(t):.3f} | sum/cublas tma {sum(t)/sum(dense):.3f} ptr {sum(q)/sum(dense):.3f}", flush=True)
        print("   tma cfgs:", res["tma_cfg"], "\n   ptr cfgs:", res["ptr_cfg"], flush=True)

"""Portable kernels alone (SPARSEDROP_HOPPER=0): TMA, pointer loads with the alignment hint
(ALIGN), and pointer loads without it (tri._alignment patched to 1), beside cuBLAS; bf16 and
fp32 (pointer only); CUDA-graph medians in us, one mask per p."""
import os, sys, torch, triton
os.environ["SPARSEDROP_HOPPER"] = "0"
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_triton as tri, block_sparse_matmul_configs as configs
from sparsedrop_compile.kernels.block_mask import cdiv
torch.manual_seed(0)
SHAPES = [(6000, 2000, 3000), (6000, 2000, 3004), (4096, 4096, 4096)]
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
real_alignment = tri._alignment
def bench(fn):
    fn(); torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=40)
for dtype in (torch.bfloat16, torch.float32):
    for (M, N, K) in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        w = torch.randn(N, K, device="cuda", dtype=dtype)
        g = torch.randn(M, N, device="cuda", dtype=dtype)
        dense = [bench(lambda: x @ w.t()), bench(lambda: g @ w), bench(lambda: g.t() @ x)]
        a3, b3, g3 = x[None], w.t()[None], g[None]
        for p in (0.0, 0.1, 0.5):
            keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
            res = {}
            for v in (("tma", "ptr", "ptr_noalign") if dtype == torch.bfloat16 else ("ptr", "ptr_noalign")):
                os.environ["SPARSEDROP_TMA"] = "1" if v == "tma" else "0"
                tri._alignment = (lambda *a: 1) if v == "ptr_noalign" else real_alignment
                configs._TUNER.best.clear()
                dw_out = torch.empty(N, K, device="cuda", dtype=dtype).t().unsqueeze(0)
                res[v] = [bench(lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128))),
                          bench(lambda: tri.sdd(g3, b3, keep, 1.0, (128, 128))),
                          bench(lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out))]

            tri._alignment = real_alignment
            os.environ.pop("SPARSEDROP_TMA", None)
            line = " | ".join(f"{v} {r[0]:.1f}/{r[1]:.1f}/{r[2]:.1f} (x cuBLAS {sum(r)/sum(dense):.3f})" for v, r in res.items())
            print(f"{str(dtype)[6:]} {M}x{N}x{K} p={p}: cublas {dense[0]:.1f}/{dense[1]:.1f}/{dense[2]:.1f} | {line}", flush=True)

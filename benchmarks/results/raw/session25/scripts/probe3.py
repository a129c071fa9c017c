"""Session 25 call 3: the aligned copy of an unaligned right operand, on and off, per kernel
(each launcher alone, its lists and the copy inside the timing), CUDA-graph medians, bf16."""
import os, torch, triton
os.environ["SPARSEDROP_HOPPER"] = "1"
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
torch.manual_seed(0)
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
def bench(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=60)
rule = hopper._COPY_Y_MIN_ROWS
for (M, N, K) in ((6000, 2000, 3000), (8192, 1000, 3000), (8192, 3000, 1000), (8192, 4000, 4000)):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    a3, b3, g3 = x[None], w.t()[None], g[None]
    dense = {"fwd": bench(lambda: x @ w.t()), "dx": bench(lambda: g @ w), "dw": bench(lambda: g.t() @ x)}
    dw_out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
    for p in (0.0, 0.1, 0.3, 0.5):
        keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
        res = {}
        for copy in (True, False):
            hopper._COPY_Y_MIN_ROWS = rule if copy else 1 << 62
            pf = hopper.plan_dsd(a3, b3, keep, (128, 128), None, None, torch.empty(1, M, N, device="cuda", dtype=torch.bfloat16))
            px = hopper.plan_sdd(g3, b3, keep, (128, 128), None, None, torch.empty(1, M, K, device="cuda", dtype=torch.bfloat16))
            yf = tri.dsd(a3, b3, keep, 1.0, (128, 128)); yx = tri.sdd(g3, b3, keep, 1.0, (128, 128))
            res[copy] = (bench(lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128))), bench(lambda: tri.sdd(g3, b3, keep, 1.0, (128, 128))),
                         pf.copy_y, px.copy_y, yf.float(), yx.float())
        hopper._COPY_Y_MIN_ROWS = rule
        dw = bench(lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out))
        pw = hopper.plan_dsd_tn(a3, g3, keep, (128, 128), False, None, dw_out)
        c, n = res[True], res[False]
        same = torch.equal(c[4], n[4]) and torch.equal(c[5], n[5])
        s_c = (c[0] + c[1] + dw) / sum(dense.values()); s_n = (n[0] + n[1] + dw) / sum(dense.values())
        print(f"{M}x{N}x{K} p={p}: fwd copy {c[0]:.1f} ({c[0]/dense['fwd']:.3f}, copy_y={c[2]}) no copy {n[0]:.1f} ({n[0]/dense['fwd']:.3f})  "
              f"dX copy {c[1]:.1f} ({c[1]/dense['dx']:.3f}, copy_y={c[3]}) no copy {n[1]:.1f} ({n[1]/dense['dx']:.3f})  "
              f"dW {dw:.1f} ({dw/dense['dw']:.3f}, {pw.cfg.tile_r}x{pw.cfg.tile_c}{' sk' if pw.stream_k else ''})  "
              f"sum x cuBLAS: copy {s_c:.3f} no copy {s_n:.3f}  outputs identical: {same}", flush=True)

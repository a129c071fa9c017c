"""Session 26, call 5: the square tiles' group of 4 (the new default) against 8, on the final
tree: the T5 forward and the 8192x1536x4096 weight gradient (whole 128 x 128 tiles) at p = 0 /
0.1 / 0.3 / 0.5, three fresh masks per p, the same for both; CUDA-graph medians, bf16, us."""
import dataclasses, os, torch, triton
os.environ["SPARSEDROP_HOPPER"] = "1"
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
torch.manual_seed(0)
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
def bench(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=40)
base = dict(hopper._CONFIGS)
assert base["square"].group == 4
for (M, N, K, kind) in [(8192, 768, 3072, "fwd"), (16384, 768, 3072, "fwd"), (8192, 1536, 4096, "dw")]:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    a3, b3, g3 = x[None], w.t()[None], g[None]
    dw_out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
    out_f = torch.empty(1, M, N, device="cuda", dtype=torch.bfloat16)
    dense = bench(lambda: x @ w.t()) if kind == "fwd" else bench(lambda: g.t() @ x)
    for p in (0.0, 0.1, 0.3, 0.5):
        res = {4: [], 8: []}
        for m in range(3):
            keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
            plan = hopper.plan_dsd(a3, b3, keep, (128, 128), None, None, out_f) if kind == "fwd" else \
                hopper.plan_dsd_tn(a3, g3, keep, (128, 128), False, None, dw_out)
            assert plan.cfg.tile_r == plan.cfg.tile_c == 128 and not plan.stream_k, plan
            fn = (lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128))) if kind == "fwd" else \
                (lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out))
            outs = {}
            for group in (4, 8):
                hopper._CONFIGS = dict(base, square=dataclasses.replace(base["square"], group=group))
                outs[group] = fn().float().clone()
                res[group].append(bench(fn))
            hopper._CONFIGS = base
            assert torch.equal(outs[4], outs[8]), "the group changed the result"
        print(f"{M}x{N}x{K} p={p} {kind} cuBLAS {dense:.1f}: group 4 {sum(res[4]) / 3:.1f} ({sum(res[4]) / 3 / dense:.3f})"
              f"  group 8 {sum(res[8]) / 3:.1f} ({sum(res[8]) / 3 / dense:.3f})  4/8 {sum(res[4]) / sum(res[8]):.3f}", flush=True)

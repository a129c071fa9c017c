"""Session 26, call 6: (a) the flat sdd's (dX) row-block group of its kept-block list (_SDD_GROUP,
8 by default) at 2 / 4 / 8 / 16; (b) the square tiles' group 2 against 4 (committed). Three fresh
masks per p, the same for every variant; CUDA-graph medians, bf16, us."""
import dataclasses, os, torch, triton
os.environ["SPARSEDROP_HOPPER"] = "1"
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
torch.manual_seed(0)
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
def bench(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=30)
base = dict(hopper._CONFIGS)
for (M, N, K) in [(4096, 4096, 4096), (8192, 1024, 4096), (8192, 768, 3072), (8192, 3072, 768), (6000, 2000, 3000),
                  (16384, 768, 3072)]:
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    b3, g3 = w.t()[None], g[None]
    dense = bench(lambda: g @ w)
    for p in (0.1, 0.5):
        res = {}
        for m in range(3):
            keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
            ref = None
            for group in (2, 4, 8, 16):
                hopper._SDD_GROUP = group
                got = tri.sdd(g3, b3, keep, 1.0, (128, 128)).float()
                ref = got if ref is None else ref
                assert torch.equal(got, ref)
                res.setdefault(group, []).append(bench(lambda: tri.sdd(g3, b3, keep, 1.0, (128, 128))))
            hopper._SDD_GROUP = 8
        print(f"{M}x{N}x{K} p={p} dx cuBLAS {dense:.1f}: " + "  ".join(
            f"group {gr} {sum(v) / 3:.1f} ({sum(v) / 3 / dense:.3f})" for gr, v in res.items()), flush=True)
for (M, N, K, kind) in [(8192, 768, 3072, "fwd"), (16384, 768, 3072, "fwd"), (8192, 1536, 4096, "dw"),
                        (6144, 2048, 3072, "dw"), (4096, 2048, 3072, "dw")]:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    a3, b3, g3 = x[None], w.t()[None], g[None]
    dw_out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
    out_f = torch.empty(1, M, N, device="cuda", dtype=torch.bfloat16)
    dense = bench(lambda: x @ w.t()) if kind == "fwd" else bench(lambda: g.t() @ x)
    for p in (0.1, 0.5):
        res = {}
        for m in range(3):
            keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
            plan = hopper.plan_dsd(a3, b3, keep, (128, 128), None, None, out_f) if kind == "fwd" else \
                hopper.plan_dsd_tn(a3, g3, keep, (128, 128), False, None, dw_out)
            fn = (lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128))) if kind == "fwd" else \
                (lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out))
            for group in (2, 4, 8):
                hopper._CONFIGS = dict(base, square=dataclasses.replace(base["square"], group=group))
                res.setdefault(group, []).append(bench(fn))
            hopper._CONFIGS = base
        print(f"{M}x{N}x{K} p={p} {kind} [{plan.cfg.tile_r}x{plan.cfg.tile_c} sk={plan.stream_k}] cuBLAS {dense:.1f}: "
              + "  ".join(f"square group {gr} {sum(v) / 3:.1f} ({sum(v) / 3 / dense:.3f})" for gr, v in res.items()),
              flush=True)

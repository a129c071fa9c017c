"""Session 25 call 2: (1) which operand's unaligned rows cost the time (one operand padded at a
time) and what a copy into aligned rows costs; (2) the new tile rules against the old, per kernel."""
import os, sys, torch, triton
os.environ["SPARSEDROP_HOPPER"] = "1"
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
torch.manual_seed(0)
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
def bench(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=60)
def mk(rows, cols, pad):
    if not pad: return torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    base = torch.randn(rows, cdiv(cols, 64) * 64, device="cuda", dtype=torch.bfloat16)
    return base[:, :cols]
M, N, K = 6000, 2000, 3000
print("== (1) one operand aligned at a time, 6000x2000x3000 (pad = rows padded to a multiple of 64 elements)", flush=True)
for p in (0.0, 0.1):
    keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
    for xp, wp, gp in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)):
        x, w, g = mk(M, K, xp), mk(N, K, wp), mk(M, N, gp)
        a3, b3, g3 = x[None], w.t()[None], g[None]
        dw_out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
        f = bench(lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128)))
        dx = bench(lambda: tri.sdd(g3, b3, keep, 1.0, (128, 128)))
        pairs, hopper._SDD_PAIRS_UNALIGNED = hopper._SDD_PAIRS_UNALIGNED, None
        dx_flat = bench(lambda: tri.sdd(g3, b3, keep, 1.0, (128, 128)))
        hopper._SDD_PAIRS_UNALIGNED = pairs
        dw = bench(lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out))
        plan = hopper.plan_dsd_tn(a3, g3, keep, (128, 128), False, None, dw_out)
        print(f"p={p} x{'P' if xp else 'u'} w{'P' if wp else 'u'} g{'P' if gp else 'u'}: fwd {f:.1f}  dX {dx:.1f} (flat {dx_flat:.1f})  "
              f"dW {dw:.1f} [{plan.cfg.tile_r}x{plan.cfg.tile_c} sk={plan.stream_k}]", flush=True)
for rows, cols in ((M, K), (N, K), (M, N)):
    src = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty(rows, cdiv(cols, 64) * 64, device="cuda", dtype=torch.bfloat16)[:, :cols]
    print(f"copy {rows}x{cols} into aligned rows: {bench(lambda: dst.copy_(src)):.1f} us", flush=True)

print("== (2) new rules against the old, per kernel (us, x cuBLAS)", flush=True)
orig_aligned = hopper._rows_aligned
for (M, N, K) in ((6000, 2000, 3000), (6144, 2048, 3072), (4096, 2048, 3072), (8192, 2048, 5632), (4000, 1000, 3000)):
    x, w, g = mk(M, K, 0), mk(N, K, 0), mk(M, N, 0)
    a3, b3, g3 = x[None], w.t()[None], g[None]
    dense = {"dx": bench(lambda: g @ w), "dw": bench(lambda: g.t() @ x)}
    for p in (0.0, 0.1, 0.3, 0.5):
        keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
        dw_out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
        res = {}
        for rule in ("new", "old"):
            if rule == "old":
                hopper._SDD_PAIRS_UNALIGNED = None
                hopper._rows_aligned = lambda *t: False  # _plan's square-tile branch off (pairs are off above)
            dxp = hopper.plan_sdd(g3, b3, keep, (128, 128), None, None, torch.empty(1, M, K, device="cuda", dtype=torch.bfloat16))
            dwp = hopper.plan_dsd_tn(a3, g3, keep, (128, 128), False, None, dw_out)
            res[rule] = (bench(lambda: tri.sdd(g3, b3, keep, 1.0, (128, 128))), dxp.list_by,
                         bench(lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out)),
                         f"{dwp.cfg.tile_r}x{dwp.cfg.tile_c}{'sk' if dwp.stream_k else ''}")
            hopper._SDD_PAIRS_UNALIGNED, hopper._rows_aligned = hopper._CONFIGS["tall"], orig_aligned
        n, o = res["new"], res["old"]
        print(f"{M}x{N}x{K} p={p}: dX new {n[0]:.1f} ({n[0]/dense['dx']:.3f}, {n[1]}) old {o[0]:.1f} ({o[0]/dense['dx']:.3f}, {o[1]})   "
              f"dW new {n[2]:.1f} ({n[2]/dense['dw']:.3f}, {n[3]}) old {o[2]:.1f} ({o[2]/dense['dw']:.3f}, {o[3]})", flush=True)

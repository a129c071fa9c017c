"""Session 26, call 1: the snake deal of whole tiles (dsd, dsd_tn over ranked lines) against the
plain deal, each kernel alone beside cuBLAS, several fresh masks per p (the same masks for both
deals); and the flag draw with and without its contiguous copy. CUDA-graph medians, bf16, us."""
import os, sys, time, torch, triton
os.environ["SPARSEDROP_HOPPER"] = "1"
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv, sample_block_keep, padded, keep_shape
import torch.nn.functional as F
torch.manual_seed(0)
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
SHAPES = [(4096, 4096, 4096), (8192, 1024, 4096), (8192, 768, 3072), (8192, 3072, 768), (6000, 2000, 3000),
          (8192, 4096, 14336)]
PS = (0.0, 0.1, 0.3, 0.5)
MASKS = 3
def bench(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=40)
t0 = time.time()
for (M, N, K) in SHAPES:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    dense = {"fwd": bench(lambda: x @ w.t()), "dw": bench(lambda: g.t() @ x)}
    a3, b3, g3 = x[None], w.t()[None], g[None]
    dw_out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
    out_f = torch.empty(1, M, N, device="cuda", dtype=torch.bfloat16)
    for p in PS:
        res = {(k, s): [] for k in ("fwd", "dw") for s in (True, False)}
        for m in range(MASKS):
            keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
            plans = (hopper.plan_dsd(a3, b3, keep, (128, 128), None, None, out_f),
                     hopper.plan_dsd_tn(a3, g3, keep, (128, 128), False, None, dw_out))
            refs = {}
            for snake in (True, False):
                hopper._SNAKE = snake
                f = lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128))
                d = lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out)
                for kind, fn in (("fwd", f), ("dw", d)):
                    got = fn().float().clone()
                    if kind in refs:
                        assert torch.equal(got, refs[kind]), (M, N, K, p, kind, "snake changed the result")
                    refs[kind] = got
                    res[(kind, snake)].append(bench(fn))
            hopper._SNAKE = True
        for kind, plan in zip(("fwd", "dw"), plans):
            sn = sum(res[(kind, True)]) / MASKS
            io = sum(res[(kind, False)]) / MASKS
            print(f"{M}x{N}x{K} p={p} {kind} [{plan.cfg.tile_r}x{plan.cfg.tile_c} sk={plan.stream_k}] cuBLAS {dense[kind]:.1f}"
                  f"  snake {sn:.1f} ({sn / dense[kind]:.3f})  in-order {io:.1f} ({io / dense[kind]:.3f})"
                  f"  snake/in-order {sn / io:.3f}  per-mask snake {[round(v, 1) for v in res[(kind, True)]]}"
                  f" in-order {[round(v, 1) for v in res[(kind, False)]]}", flush=True)
print(f"deal A/B took {time.time() - t0:.0f} s", flush=True)

# the flag draw: as sample_block_keep does it (rand, compare, contiguous copy of the cut) and
# without the copy (a strided view of the padded flags, which the launchers read through strides)
for (M, N, K) in [(8192, 768, 3072), (4096, 4096, 4096)]:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    shape = keep_shape(x.shape, (128, 128), False)
    def draw_copy():
        return sample_block_keep(x, 0.1, 128, 128, batched=False)
    def draw_view():
        return (torch.rand(padded(shape), device="cuda") >= 0.1)[..., : shape[-2], : shape[-1]]
    def whole(draw):
        def step():
            keep = draw()
            y = torch.ops.sparsedrop.linear(x, w, None, keep, 1 / 0.9, 128, 128, "triton")
            return torch.autograd.grad(y, (x, w), dy)
        return step
    r = {n: bench(fn) for n, fn in (("draw_copy", draw_copy), ("draw_view", draw_view), ("op_copy", whole(draw_copy)),
                                    ("op_view", whole(draw_view)), ("op_copy2", whole(draw_copy)), ("op_view2", whole(draw_view)))}
    print(f"{M}x{N}x{K} p=0.1 flag draw / whole op, us: " + "  ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)

"""Session 25 probe: per-kernel Gluon times, tile config x stream-K, and strided (padded-row) operands.
Each kernel alone (launcher incl. its lists), CUDA-graph medians, bf16."""
import os, sys, torch, triton, itertools
os.environ["SPARSEDROP_HOPPER"] = "1"
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
torch.manual_seed(0)
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
SHAPES = [(4096, 4096, 4096, 0), (8192, 1024, 4096, 0), (8192, 768, 3072, 0), (8192, 3072, 768, 0),
          (6000, 2000, 3000, 0), (6000, 2000, 3000, 1), (6144, 2048, 3072, 0), (8192, 4096, 14336, 0)]
if "quick" in sys.argv: SHAPES = SHAPES[:1]
PS = (0.0, 0.1, 0.5)
def bench(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=50)
orig_config, orig_sk = hopper._config, hopper._STREAM_K
def force(cfg_name, sk):
    hopper._config = (lambda *a, **k: hopper._CONFIGS[cfg_name]) if cfg_name else orig_config
    hopper._STREAM_K = sk
def mk(rows, cols, pad):
    if not pad: return torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    base = torch.randn(rows, cdiv(cols, 128) * 128 + 64, device="cuda", dtype=torch.bfloat16)
    return base[:, :cols]
for (M, N, K, pad) in SHAPES:
    x, w, g = mk(M, K, pad), mk(N, K, pad), mk(M, N, pad)
    name = f"{M}x{N}x{K}" + (" padded-rows" if pad else "")
    dense = {"fwd": bench(lambda: x @ w.t()), "dx": bench(lambda: g @ w), "dw": bench(lambda: g.t() @ x)}
    print(f"{name} cuBLAS fwd {dense['fwd']:.1f} dx {dense['dx']:.1f} dw {dense['dw']:.1f}  strides x {x.stride()} w {w.stride()} g {g.stride()}", flush=True)
    a3, b3, g3 = x[None], w.t()[None], g[None]
    for p in PS:
        keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
        dw_out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
        out_f = torch.empty(1, M, N, device="cuda", dtype=torch.bfloat16)
        force(None, orig_sk)
        ref = {"fwd": tri.dsd(a3, b3, keep, 1.0, (128, 128)).float(),
               "dw": tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out).float().clone()}
        line = []
        for kind, cands in (("fwd", ["wide", "square", "small"]), ("dw", ["tall", "square", "small"])):
            res = []
            for cfg_name, sk in itertools.product([None] + cands, [None, False, True]):
                if cfg_name is None and sk is not None: continue
                force(cfg_name, sk)
                if kind == "fwd":
                    plan = hopper.plan_dsd(a3, b3, keep, (128, 128), None, None, out_f)
                    fn = lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128))
                else:
                    plan = hopper.plan_dsd_tn(a3, g3, keep, (128, 128), False, None, dw_out)
                    fn = lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out)
                if plan is None:
                    res.append(f"{cfg_name}/{sk}: no plan"); continue
                got = fn().float()
                err = (got - ref[kind]).abs().max().item() / max(ref[kind].abs().max().item(), 1e-6)
                t = bench(fn)
                tag = f"{cfg_name or 'default'}/{'sk' if sk else ('nosk' if sk is False else 'rule')}"
                res.append(f"{tag}[{plan.cfg.tile_r}x{plan.cfg.tile_c},sk={plan.stream_k}] {t:.1f} ({t / dense[kind]:.3f}){' ERR %.1e' % err if err > 2e-2 else ''}")
            print(f"{name} p={p} {kind} cuBLAS {dense[kind]:.1f}: " + "  ".join(res), flush=True)
        force(None, orig_sk)
        t_flat = bench(lambda: tri.sdd(g3, b3, keep, 1.0, (128, 128)))
        flat, hopper._SDD_PAIRS = hopper._SDD_PAIRS, hopper._CONFIGS["tall"]
        t_pair = bench(lambda: tri.sdd(g3, b3, keep, 1.0, (128, 128)))
        hopper._SDD_PAIRS = flat
        print(f"{name} p={p} dx cuBLAS {dense['dx']:.1f}: flat-pp {t_flat:.1f} ({t_flat / dense['dx']:.3f})  paired {t_pair:.1f} ({t_pair / dense['dx']:.3f})", flush=True)

"""Session 26, call 4: the tile-group size (GROUP ranked lines interleaved) of the forward and
the weight gradient (whole tiles, snake deal) on more narrow and mid outputs, to see where a
smaller group wins (call 3: T5's forward 4-7 % faster with GROUP 4, 6000x2000x3000 1 % slower).
Three fresh masks per p, the same for every GROUP; CUDA-graph medians, bf16, us."""
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
GROUPS = (2, 4, 8)
import sys
SHAPES = [(8192, 768, 3072), (16384, 768, 3072), (4096, 768, 3072), (8192, 1024, 4096), (16384, 1024, 4096),
          (8192, 1536, 4096), (8192, 2048, 4096), (8192, 1024, 1024), (6000, 2000, 3000), (8192, 4096, 4096)]
for (M, N, K) in SHAPES[int(sys.argv[1]) if len(sys.argv) > 1 else 0:]:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    a3, b3, g3 = x[None], w.t()[None], g[None]
    dw_out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
    out_f = torch.empty(1, M, N, device="cuda", dtype=torch.bfloat16)
    dense = {"fwd": bench(lambda: x @ w.t()), "dw": bench(lambda: g.t() @ x)}
    for p in (0.1, 0.5):
        res = {}
        for m in range(3):
            keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
            plans = {"fwd": hopper.plan_dsd(a3, b3, keep, (128, 128), None, None, out_f),
                     "dw": hopper.plan_dsd_tn(a3, g3, keep, (128, 128), False, None, dw_out)}
            for group in GROUPS:
                hopper._CONFIGS = {k: dataclasses.replace(v, group=group) for k, v in base.items()}
                res.setdefault(("fwd", group), []).append(bench(lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128))))
                if plans["dw"] is not None and not plans["dw"].stream_k:
                    res.setdefault(("dw", group), []).append(
                        bench(lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out)))
            hopper._CONFIGS = base
        for kind in ("fwd", "dw"):
            pl = plans[kind]
            if pl is None or pl.stream_k:
                continue
            grid_o = cdiv(pl.R if pl.line_of_col else pl.C, pl.cfg.tile_r if pl.line_of_col else pl.cfg.tile_c)
            print(f"{M}x{N}x{K} p={p} {kind} [{pl.cfg.tile_r}x{pl.cfg.tile_c}, R {pl.R} C {pl.C}, tiles across {grid_o}]"
                  f" cuBLAS {dense[kind]:.1f}: " + "  ".join(
                      f"GROUP {gr} {sum(res[(kind, gr)]) / 3:.1f} ({sum(res[(kind, gr)]) / 3 / dense[kind]:.3f})"
                      for gr in GROUPS), flush=True)

"""Each block-sparse kernel alone, on the Hopper (Gluon wgmma) path and on the portable Triton
path, against the cuBLAS matmul it replaces: forward dsd vs x @ wᵀ, dX sdd vs g @ w, dW dsd_tn
vs gᵀ @ x (the weight gradient written in (N, K) order, as ops.py does), at p = 0, 0.1, 0.5.
Each launcher builds its kept-block lists inside the timing; mask sampling is not included
(bench_kernels.py times the whole op). CUDA-graph medians (triton.testing.do_bench_cudagraph),
bf16, random inputs, 128 x 128 blocks. The path is switched with SPARSEDROP_HOPPER. dX is
also timed with the Hopper sdd's paired schedule (256 x 128 tiles, two kept blocks of a column;
the default of sessions 13-21), beside its default flat one (whole 128 x 128 tiles of one kept
block, listed in groups of rows, the PINGPONG kernel), as hopper_paired_ms; the
forward and dW also with whole tiles per program (stream-K off), as hopper_tiles_ms, and
stream_k says whether the default took stream-K there.
(Session 13's run, results/raw/session13/call5_hopper_kernels.log, also timed the kernel
before warp specialisation, from 314ac9a, where it was a switch.)

    python benchmarks/bench_hopper_kernels.py [quick] [--out DIR]   # CSV: DIR/hopper_kernels.csv
"""
import os, sys, torch, triton, csv
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
torch.manual_seed(0)
SHAPES = [(4096, 4096, 4096), (8192, 1024, 4096), (8192, 4096, 14336), (8192, 768, 3072), (6000, 2000, 3000)]
if len(sys.argv) > 1 and sys.argv[1] == "quick":
    SHAPES = SHAPES[:2]
dev = torch.cuda.get_device_name()
print("GPU", dev, torch.__version__, triton.__version__, flush=True)
rows_out = []
def bench(fn):
    fn(); torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=60)
for (M, N, K) in SHAPES:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    dense = {
        "fwd": bench(lambda: x @ w.t()),
        "dx": bench(lambda: g @ w),
        "dw": bench(lambda: g.t() @ x),
    }
    a3, b3, g3 = x[None], w.t()[None], g[None]
    for p in (0.0, 0.1, 0.5):
        keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
        res = {}
        for path in ("hopper", "triton"):
            os.environ["SPARSEDROP_HOPPER"] = "1" if path == "hopper" else "0"
            dw_out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
            res[(path, "fwd")] = bench(lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128)))
            res[(path, "dx")] = bench(lambda: tri.sdd(g3, b3, keep, 1.0, (128, 128)))
            res[(path, "dw")] = bench(lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out))
        os.environ["SPARSEDROP_HOPPER"] = "1"
        flat, hopper._SDD_PAIRS = hopper._SDD_PAIRS, hopper._CONFIGS["tall"]
        paired_dx = bench(lambda: tri.sdd(g3, b3, keep, 1.0, (128, 128)))
        hopper._SDD_PAIRS = flat
        dw_out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
        plans = {"fwd": hopper.plan_dsd(a3, b3, keep, (128, 128), None, None, torch.empty(1, M, N, device="cuda", dtype=torch.bfloat16)),
                 "dw": hopper.plan_dsd_tn(a3, g3, keep, (128, 128), False, None, dw_out)}
        stream_k = {k: plan is not None and plan.stream_k for k, plan in plans.items()}
        rule, hopper._STREAM_K = hopper._STREAM_K, False
        tiles = {"fwd": bench(lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128))),
                 "dw": bench(lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out))}
        hopper._STREAM_K = rule
        for k in ("fwd", "dx", "dw"):
            row = dict(gpu=dev, torch=torch.__version__, triton=triton.__version__, shape=f"{M}x{N}x{K}", p=p, kernel=k, cublas_ms=dense[k],
                       hopper_ms=res[("hopper", k)], triton_ms=res[("triton", k)],
                       hopper_paired_ms=paired_dx if k == "dx" else "", hopper_tiles_ms=tiles.get(k, ""),
                       stream_k=stream_k.get(k, False),
                       hopper_vs_cublas=res[("hopper", k)] / dense[k], triton_vs_cublas=res[("triton", k)] / dense[k],
                       hopper_vs_ideal=res[("hopper", k)] / (dense[k] * (1 - p)))
            rows_out.append(row)
            print(f"{M}x{N}x{K} p={p} {k:3s} cublas {dense[k]:.4f}  hopper {res[('hopper', k)]:.4f} ({row['hopper_vs_cublas']:.3f})  "
                  f"triton {res[('triton', k)]:.4f} ({row['triton_vs_cublas']:.3f})  hopper/ideal {row['hopper_vs_ideal']:.3f}"
                  + (f"  paired sdd {paired_dx:.4f} ({paired_dx / dense[k]:.3f})" if k == "dx" else "")
                  + (f"  tiles {tiles[k]:.4f} ({tiles[k] / dense[k]:.3f}) stream_k={stream_k[k]}" if k in tiles else ""),
                  flush=True)
    tot = lambda path, p: sum(r[f"{path}_ms"] for r in rows_out if r["shape"] == f"{M}x{N}x{K}" and r["p"] == p)
    for p in (0.0, 0.1, 0.5):
        d = sum(dense.values())
        print(f"  TOTAL {M}x{N}x{K} p={p}: hopper {tot('hopper', p)/d:.3f}  triton {tot('triton', p)/d:.3f} x cuBLAS "
              f"(ideal {1-p:.2f})", flush=True)
out_dir = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "benchmarks/results"
os.makedirs(out_dir, exist_ok=True)
gpu_name = dev.lower().replace(" ", "-")
with open(os.path.join(out_dir, f"hopper_kernels_{gpu_name}.csv"), "w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=list(rows_out[0])); wr.writeheader(); wr.writerows(rows_out)

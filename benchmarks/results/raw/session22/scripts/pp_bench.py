"""A/B: the PINGPONG kernel (two consumer warpgroups, 128x128 each) against the default configs,
per kernel (fwd dsd, dX sdd, dW dsd_tn), CUDA-graph medians, beside cuBLAS; correctness first."""
import os, sys, torch, triton
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels import block_sparse_matmul as ref
from sparsedrop_compile.kernels.block_mask import cdiv
torch.manual_seed(0)
SHAPES = [(4096, 4096, 4096), (8192, 1024, 4096), (8192, 4096, 14336), (8192, 768, 3072), (6000, 2000, 3000)]
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
def bench(fn):
    fn(); torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=60) * 1000
def variant(pp=False, pairs=True, sk=None, group=8):
    hopper._PINGPONG, hopper._SDD_PAIRS, hopper._STREAM_K = pp, (hopper._CONFIGS["tall"] if pairs else None), sk
    hopper._SDD_GROUP = group
for (M, N, K) in SHAPES:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    dense = dict(fwd=bench(lambda: x @ w.t()), dx=bench(lambda: g @ w), dw=bench(lambda: g.t() @ x))
    a3, b3, g3 = x[None], w.t()[None], g[None]
    for p in (0.0, 0.1, 0.5):
        keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
        dw_out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
        fns = dict(fwd=lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128)), dx=lambda: tri.sdd(g3, b3, keep, 1.0, (128, 128)),
                   dw=lambda: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw_out))
        # correctness of the pingpong variants against the default kernels (tested separately vs the oracle)
        if p == 0.1:
            variant(); base = {k: (f().clone() if k != "dw" else (f(), dw_out.clone())[1]) for k, f in fns.items()}
            for v in (dict(pp=True, pairs=False), dict(pairs=False), dict(pairs=False, group=16), dict(pairs=False, group=None)):
                variant(**v); torch.cuda.synchronize()
                for k, f in fns.items():
                    got = f() if k != "dw" else (f(), dw_out)[1]
                    torch.cuda.synchronize()
                    err = (got.float() - base[k].float()).abs().max().item() / base[k].float().abs().max().item()
                    print(f"  check {M}x{N}x{K} {k} {v}: rel err vs default {err:.2e}", flush=True)
                    assert err < 2e-2, err
        res = {}
        NAMES = dict(default={}, rows=dict(pairs=False, group=None), g8=dict(pairs=False), g4=dict(pairs=False, group=4),
                     g16=dict(pairs=False, group=16), rows_pp=dict(pp=True, pairs=False, group=None),
                     g8_pp=dict(pp=True, pairs=False), g4_pp=dict(pp=True, pairs=False, group=4),
                     g16_pp=dict(pp=True, pairs=False, group=16))
        for name, v in NAMES.items():
            variant(**v)
            for k, f in fns.items():
                if k == "dx" or name == "default":
                    res[(name, k)] = bench(f)
        variant()
        for k in ("fwd", "dx", "dw"):
            cells = "  ".join(f"{n} {res[(n, k)]:7.1f} ({res[(n, k)] / dense[k]:.3f})" for n in NAMES if (n, k) in res)
            print(f"{M}x{N}x{K} p={p} {k:3s} cublas {dense[k]:7.1f}  {cells}", flush=True)
        for n in NAMES:
            if (n, "dx") in res:
                tot = res[("default", "fwd")] + res[(n, "dx")] + res[("default", "dw")]
                print(f"  SUM {M}x{N}x{K} p={p} dx={n}: {tot / sum(dense.values()):.3f} x cuBLAS (ideal {1 - p:.2f})", flush=True)

"""Session 26, call 3: with the snake deal, the forward's tile-group size (GROUP ranked lines
interleaved, for L2) at 4 / 8 (the default) / 16, three fresh masks per p, same masks for each;
CUDA-graph medians, bf16, us."""
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
for (M, N, K) in [(4096, 4096, 4096), (8192, 1024, 4096), (8192, 768, 3072), (8192, 3072, 768), (6000, 2000, 3000)]:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    a3, b3 = x[None], w.t()[None]
    dense = bench(lambda: x @ w.t())
    for p in (0.1, 0.5):
        res = {}
        for m in range(3):
            keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
            for group in (4, 8, 16):
                hopper._CONFIGS = {k: dataclasses.replace(v, group=group) for k, v in base.items()}
                res.setdefault(group, []).append(bench(lambda: tri.dsd(a3, b3, keep, 1.0, (128, 128))))
        hopper._CONFIGS = base
        print(f"{M}x{N}x{K} p={p} fwd cuBLAS {dense:.1f}: " + "  ".join(
            f"GROUP {g} {sum(v) / 3:.1f} ({sum(v) / 3 / dense:.3f})" for g, v in res.items()), flush=True)

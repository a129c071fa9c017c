"""Session 28, call 8: the sdd's dropped-block zero tiles stored before the kept tiles' MMAs
(this tree) against after them (7e3b9ea's kernel file, imported from a copy of the kernels
package). dX (sdd) against the cuBLAS product it replaces; 'gapped' (graph replay, L2 flushed:
bench_kernels.py's method) / 'sustained' (do_bench_cudagraph). Three fresh masks per p, the same
for both; outputs checked bit-equal."""
import gc, importlib, os, shutil, sys, tempfile
import torch, triton
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
from sparsedrop_compile.harness import capture_cuda_graph, do_bench
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
here = os.path.dirname(os.path.abspath(__file__))
root = tempfile.mkdtemp()
shutil.copytree(os.path.dirname(hopper.__file__), os.path.join(root, "kernels_base"), ignore=shutil.ignore_patterns("__pycache__"))
shutil.copy(os.path.join(here, "base_kernels_7e3b9ea.py"), os.path.join(root, "kernels_base", "block_sparse_matmul_hopper_kernels.py"))
sys.path.insert(0, root)
KERNEL = {"zeros_first": hopper._listed_wgmma_kernel,
          "zeros_last": importlib.import_module("kernels_base.block_sparse_matmul_hopper_kernels")._listed_wgmma_kernel}

def gapped(fn):
    g, _ = capture_cuda_graph(fn)
    return 1000 * do_bench(g.replay, warmup=25, rep=100)

def sustained(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=60)

for (M, N, K) in [(8192, 768, 3072), (4096, 4096, 4096), (8192, 1024, 4096), (6000, 2000, 3000)]:
    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    b3, g3 = w.t()[None], dy[None]
    ours = lambda keep: tri.sdd(g3, b3, keep, 1.0, (128, 128))
    d = (gapped(lambda: dy @ w), sustained(lambda: dy @ w))
    for p in (0.1, 0.3, 0.5):
        res = {v: [[], []] for v in KERNEL}
        for m in range(3):
            keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
            outs = []
            for v in KERNEL:
                hopper._listed_wgmma_kernel = KERNEL[v]
                outs.append(ours(keep).clone())
                res[v][0].append(gapped(lambda: ours(keep)))
                res[v][1].append(sustained(lambda: ours(keep)))
            hopper._listed_wgmma_kernel = KERNEL["zeros_first"]
            if any(not torch.equal(outs[0], o) for o in outs[1:]):
                print("   !! outputs differ", flush=True)
            del outs
        avg = {v: (sum(r[0]) / len(r[0]), sum(r[1]) / len(r[1])) for v, r in res.items()}
        b = avg["zeros_last"]
        print(f"{M}x{N}x{K} dX p={p} cuBLAS {d[0]:.1f}/{d[1]:.1f}: " + "  ".join(
            f"{v} {a[0]:.1f}/{a[1]:.1f} ({a[0]/d[0]:.3f}/{a[1]/d[1]:.3f}; /last {a[0]/b[0]:.3f}/{a[1]/b[1]:.3f})"
            for v, a in avg.items()), flush=True)
    del w, dy, b3, g3
    gc.collect(); torch.cuda.empty_cache()

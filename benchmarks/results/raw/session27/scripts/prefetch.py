"""Session 27, call 4: the producer reads a step's list entry before waiting for the step's stage
(this tree) against reading it after (HEAD's kernel file, imported from a copy of the kernels
package); and the square tiles' stages, 4 / 5 / 6. Forward (dsd) and weight gradient (dsd_tn),
each against the cuBLAS product it replaces; 'gapped' (graph replay, L2 flushed: bench_kernels.py's
method) / 'sustained' (do_bench_cudagraph). Three fresh masks per p, same masks for every variant;
outputs checked bit-equal."""
import dataclasses, importlib, os, shutil, sys, tempfile
import torch, triton
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
from sparsedrop_compile.harness import capture_cuda_graph, do_bench
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)

root = tempfile.mkdtemp()
shutil.copytree(os.path.dirname(hopper.__file__), os.path.join(root, "kernels_base"), ignore=shutil.ignore_patterns("__pycache__"))
shutil.copy(os.path.join(os.path.dirname(__file__), "base_kernels.py"), os.path.join(root, "kernels_base", "block_sparse_matmul_hopper_kernels.py"))
sys.path.insert(0, root)
BASE = importlib.import_module("kernels_base.block_sparse_matmul_hopper_kernels")._listed_wgmma_kernel
NEW = hopper._listed_wgmma_kernel
C0 = dict(hopper._CONFIGS)

def gapped(fn):
    g, _ = capture_cuda_graph(fn)
    return 1000 * do_bench(g.replay, warmup=25, rep=100)

def sustained(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=60)

def variant(v):
    hopper._listed_wgmma_kernel = BASE if v == "read_after" else NEW
    hopper._CONFIGS = dict(C0)
    if v.startswith("stages"):
        hopper._CONFIGS["square"] = dataclasses.replace(C0["square"], stages=int(v[6:]))

for (M, N, K) in [(8192, 768, 3072), (8192, 1024, 4096), (6000, 2000, 3000), (4096, 4096, 4096), (8192, 4096, 14336)]:
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    a3, b3, g3 = x[None], w.t()[None], dy[None]
    dw = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
    kernels = {"fwd": (lambda keep: tri.dsd(a3, b3, keep, 1.0, (128, 128)), lambda: torch.nn.functional.linear(x, w)),
               "dW": (lambda keep: tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw.t().unsqueeze(0)),
                      lambda: dy.t() @ x)}
    variants = ["read_before", "read_after"] + (["stages5", "stages6"] if M == 8192 and N == 768 else [])
    for kname, (ours, dense) in kernels.items():
        d_gap, d_sus = gapped(dense), sustained(dense)
        for p in (0.0, 0.1, 0.5):
            res = {}
            for m in range(3 if p else 1):
                keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
                outs = []
                for v in variants:
                    variant(v)
                    o = ours(keep)
                    outs.append((o if o is not None else dw).clone())
                    r = res.setdefault(v, [[], []])
                    r[0].append(gapped(lambda: ours(keep)))
                    r[1].append(sustained(lambda: ours(keep)))
                variant("read_before")
                if any(not torch.equal(outs[0], o) for o in outs[1:]):
                    print("   !! outputs differ", flush=True)
            avg = {v: (sum(r[0]) / len(r[0]), sum(r[1]) / len(r[1])) for v, r in res.items()}
            b = avg["read_after"]
            print(f"{M}x{N}x{K} {kname} p={p} cuBLAS {d_gap:.1f}/{d_sus:.1f}: " + "  ".join(
                f"{v} {a[0]:.1f}/{a[1]:.1f} ({a[0]/d_gap:.3f}/{a[1]/d_sus:.3f}; /after {a[0]/b[0]:.3f}/{a[1]/b[1]:.3f})"
                for v, a in avg.items()), flush=True)

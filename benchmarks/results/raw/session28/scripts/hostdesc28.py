"""Session 28, call 4: TMA descriptors built on the host (this tree) against built in the kernel
(HEAD's kernel file, imported from a copy of the kernels package, launched by HEAD's Plan.run).
Forward (dsd), dX (sdd) and weight gradient (dsd_tn), each against the cuBLAS product it replaces,
at p = 0 / 0.1 / 0.5 / 1; 'gapped' (graph replay, L2 flushed: bench_kernels.py's method) /
'sustained' (do_bench_cudagraph). Three fresh masks per p, the same for both; outputs checked
bit-equal."""
import ast, importlib, os, shutil, sys, tempfile, textwrap
import torch, triton
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
from sparsedrop_compile.harness import capture_cuda_graph, do_bench
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)

here = os.path.dirname(os.path.abspath(__file__))
root = tempfile.mkdtemp()
shutil.copytree(os.path.dirname(hopper.__file__), os.path.join(root, "kernels_base"), ignore=shutil.ignore_patterns("__pycache__"))
shutil.copy(os.path.join(here, "base28", "block_sparse_matmul_hopper_kernels.py"), os.path.join(root, "kernels_base", "block_sparse_matmul_hopper_kernels.py"))
sys.path.insert(0, root)
BASE_KERNEL = importlib.import_module("kernels_base.block_sparse_matmul_hopper_kernels")._listed_wgmma_kernel
# HEAD's Plan.run, run in the hopper module's namespace with HEAD's kernel
src = open(os.path.join(here, "base28", "hopper_head.py")).read()
tree = ast.parse(src)
plan_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Plan")
run_src = textwrap.dedent(ast.get_source_segment(src, next(n for n in plan_cls.body if isinstance(n, ast.FunctionDef) and n.name == "run"), padded=True))
ns = dict(vars(hopper)); ns["_listed_wgmma_kernel"] = BASE_KERNEL
exec(run_src, ns)
RUN = {"host": hopper.Plan.run, "device": ns["run"]}

def gapped(fn):
    g, _ = capture_cuda_graph(fn)
    return 1000 * do_bench(g.replay, warmup=25, rep=100)

def sustained(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=60)

for (M, N, K) in [(8192, 768, 3072), (4096, 4096, 4096), (8192, 1024, 4096), (6000, 2000, 3000), (2048, 768, 3072)]:
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    a3, b3, g3 = x[None], w.t()[None], dy[None]
    dw = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
    kernels = {"fwd": (lambda keep: tri.dsd(a3, b3, keep, 1.0, (128, 128)), lambda: torch.nn.functional.linear(x, w)),
               "dX": (lambda keep: tri.sdd(g3, b3, keep, 1.0, (128, 128)), lambda: dy @ w),
               "dW": (lambda keep: (tri.dsd_tn(a3, g3, keep, 1.0, (128, 128), False, out=dw.t().unsqueeze(0)), dw)[1],
                      lambda: dy.t() @ x)}
    for kname, (ours, dense) in kernels.items():
        d = (gapped(dense), sustained(dense))
        for p in (0.0, 0.1, 0.5, 1.0):
            res = {v: [[], []] for v in RUN}
            for m in range(3 if 0 < p < 1 else 1):
                keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
                outs = []
                for v in RUN:
                    hopper.Plan.run = RUN[v]
                    outs.append(ours(keep).clone())
                    res[v][0].append(gapped(lambda: ours(keep)))
                    res[v][1].append(sustained(lambda: ours(keep)))
                hopper.Plan.run = RUN["host"]
                if any(not torch.equal(outs[0], o) for o in outs[1:]):
                    print("   !! outputs differ", flush=True)
            avg = {v: (sum(r[0]) / len(r[0]), sum(r[1]) / len(r[1])) for v, r in res.items()}
            b = avg["device"]
            print(f"{M}x{N}x{K} {kname} p={p} cuBLAS {d[0]:.1f}/{d[1]:.1f}: " + "  ".join(
                f"{v} {a[0]:.1f}/{a[1]:.1f} ({a[0]/d[0]:.3f}/{a[1]/d[1]:.3f}; /device {a[0]/b[0]:.3f}/{a[1]/b[1]:.3f})"
                for v, a in avg.items()), flush=True)

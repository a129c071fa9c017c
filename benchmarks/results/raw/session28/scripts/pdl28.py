"""Session 28, call 5: the wgmma kernel launched as a programmatic dependent of the lists'
launch (PDL, hopper._DEPENDENT) against an ordinary launch after them; both with host-built
descriptors. Forward (dsd), dX (sdd), weight gradient (dsd_tn) against cuBLAS at p = 0.1 / 0.5;
'gapped' (graph replay, L2 flushed) / 'sustained' (do_bench_cudagraph). Three fresh masks per p,
the same for both; outputs checked bit-equal."""
import torch, triton
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
from sparsedrop_compile.harness import capture_cuda_graph, do_bench
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
RUN = {"pdl": True, "plain": False}

def gapped(fn):
    g, _ = capture_cuda_graph(fn)
    return 1000 * do_bench(g.replay, warmup=25, rep=100)

def sustained(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=60)

for (M, N, K) in [(8192, 768, 3072), (4096, 4096, 4096), (8192, 1024, 4096), (6000, 2000, 3000)]:
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
        for p in (0.1, 0.5):
            res = {v: [[], []] for v in RUN}
            for m in range(3 if 0 < p < 1 else 1):
                keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
                outs = []
                for v in RUN:
                    hopper._DEPENDENT = RUN[v]
                    outs.append(ours(keep).clone())
                    res[v][0].append(gapped(lambda: ours(keep)))
                    res[v][1].append(sustained(lambda: ours(keep)))
                hopper._DEPENDENT = True
                if any(not torch.equal(outs[0], o) for o in outs[1:]):
                    print("   !! outputs differ", flush=True)
            avg = {v: (sum(r[0]) / len(r[0]), sum(r[1]) / len(r[1])) for v, r in res.items()}
            b = avg["plain"]
            print(f"{M}x{N}x{K} {kname} p={p} cuBLAS {d[0]:.1f}/{d[1]:.1f}: " + "  ".join(
                f"{v} {a[0]:.1f}/{a[1]:.1f} ({a[0]/d[0]:.3f}/{a[1]/d[1]:.3f}; /plain {a[0]/b[0]:.3f}/{a[1]/b[1]:.3f})"
                for v, a in avg.items()), flush=True)

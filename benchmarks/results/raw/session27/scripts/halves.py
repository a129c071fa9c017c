"""Session 27, call 3: whole listed tiles on two consumer partitions (_HALVES, a half of every
tile's rows each) against one partition of both warpgroups, forward (dsd) and weight gradient
(dsd_tn), each against the cuBLAS product it replaces; 'gapped' (graph replay, L2 flushed:
bench_kernels.py's method) / 'sustained' (do_bench_cudagraph). Three fresh masks per p, same masks
for both; outputs checked bit-equal."""
import torch, triton
from sparsedrop_compile import ops  # noqa
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels.block_mask import cdiv
from sparsedrop_compile.harness import capture_cuda_graph, do_bench
print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)

def gapped(fn):
    g, _ = capture_cuda_graph(fn)
    return 1000 * do_bench(g.replay, warmup=25, rep=100)

def sustained(fn):
    fn(); torch.cuda.synchronize()
    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=60)

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
    for kname, (ours, dense) in kernels.items():
        out0 = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
        plan = (hopper.plan_dsd(a3, b3, torch.ones(1, cdiv(M, 128), cdiv(K, 128), dtype=torch.bool, device="cuda"),
                                (128, 128), None, None, torch.empty(1, M, N, device="cuda", dtype=torch.bfloat16))
                if kname == "fwd" else
                hopper.plan_dsd_tn(a3, g3, torch.ones(1, cdiv(M, 128), cdiv(K, 128), dtype=torch.bool, device="cuda"),
                                   (128, 128), False, None, out0.t().unsqueeze(0)))
        desc = f"{plan.cfg.tile_r}x{plan.cfg.tile_c} {'stream-K' if plan.stream_k else 'whole'}"
        d_gap, d_sus = gapped(dense), sustained(dense)
        for p in (0.0, 0.1, 0.5):
            res = {}
            for m in range(3 if p else 1):
                keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
                outs = []
                for halves in (True, False):
                    hopper._HALVES = halves
                    o = ours(keep)
                    outs.append((o if o is not None else dw).clone())
                    r = res.setdefault(halves, [[], []])
                    r[0].append(gapped(lambda: ours(keep)))
                    r[1].append(sustained(lambda: ours(keep)))
                hopper._HALVES = True
                if not torch.equal(outs[0], outs[1]):
                    print(f"   !! outputs differ: {(outs[0].float() - outs[1].float()).abs().max().item()}", flush=True)
            avg = {h: (sum(r[0]) / len(r[0]), sum(r[1]) / len(r[1])) for h, r in res.items()}
            print(f"{M}x{N}x{K} {kname} [{desc}] p={p} cuBLAS {d_gap:.1f}/{d_sus:.1f}: "
                  f"two partitions {avg[True][0]:.1f}/{avg[True][1]:.1f} ({avg[True][0]/d_gap:.3f}/{avg[True][1]/d_sus:.3f})  "
                  f"one {avg[False][0]:.1f}/{avg[False][1]:.1f} ({avg[False][0]/d_gap:.3f}/{avg[False][1]/d_sus:.3f})  "
                  f"two/one {avg[True][0]/avg[False][0]:.3f}/{avg[True][1]/avg[False][1]:.3f}", flush=True)

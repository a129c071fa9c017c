"""Per-kernel GPU time of one compiled site (fwd+bwd, CUDA-graph replay), portable kernels with
TMA descriptors (default) against pointer loads (SPARSEDROP_TMA=0 while compiling), p given."""
import os, sys, collections, math
sys.path.insert(0, "benchmarks")
import torch, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from sparsedrop_compile.kernels import block_sparse_matmul_configs as configs
from sparsedrop_compile.harness import capture_cuda_graph, device_name
shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[1].split(",")]
p = float(sys.argv[2])
print(device_name("cuda"), torch.__version__, flush=True)
def site(kind):
    if kind == "input":
        return lambda x, w: F.linear(F.dropout(x, p, training=True), w)
    return lambda x, w: F.dropout(F.linear(x, w), p, training=True)
for kind in ("input", "output"):
    for R, N, K in shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(R, K, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        w = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen) / math.sqrt(K)).requires_grad_()
        dy = torch.randn(R, N, device="cuda", dtype=torch.bfloat16, generator=gen)
        res = {}
        for name in ("cublas", "tma", "ptr", "tma2", "ptr2"):
            torch._dynamo.reset(); configs._TUNER.best.clear()
            if name.startswith("ptr"):
                os.environ["SPARSEDROP_TMA"] = "0"
            f = (lambda x, w: F.linear(x, w)) if name == "cublas" else torch.compile(site(kind), backend="sparsedrop", dynamic=False)
            step = lambda: torch.autograd.grad(f(x, w), (x, w), dy)
            step(); step(); torch.cuda.synchronize()
            g, keep = capture_cuda_graph(step)
            os.environ.pop("SPARSEDROP_TMA", None)
            for _ in range(5): g.replay()
            torch.cuda.synchronize()
            n = 30
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(n): g.replay()
                torch.cuda.synchronize()
            per = collections.Counter()
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    per[e.name[:60]] += (getattr(e, "device_time", None) or e.cuda_time) / n
            tot = sum(per.values())
            res[name] = tot
            print(f"{kind} {R}x{N}x{K} p={p} {name}: kernels {tot:.1f} us: " + "; ".join(f"{k} {v:.1f}" for k, v in per.most_common(6)), flush=True)
            del g, keep
        print(f"SUMMARY {kind} {R}x{N}x{K} p={p}: cublas {res['cublas']:.1f} tma {min(res['tma'],res['tma2']):.1f} ptr {min(res['ptr'],res['ptr2']):.1f} ptr/tma {min(res['ptr'],res['ptr2'])/min(res['tma'],res['tma2']):.3f}", flush=True)

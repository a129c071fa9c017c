"""Per-kernel GPU time of a compiled site (fwd+bwd), light vs full portable path, p=0.3."""
import sys, collections, math
sys.path.insert(0, "benchmarks")
import torch, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from sparsedrop_compile.kernels import runtime
from sparsedrop_compile.harness import capture_cuda_graph
shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[1].split(",")]
p = 0.3
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
        for name in ("cublas", "inductor", "lb34", "lb40"):
            torch._dynamo.reset()
            runtime.LAUNCH_BOUND_WORK = 2 ** (40 if name == "lb40" else 34)
            if name == "cublas":
                f = lambda x, w: F.linear(x, w)
            elif name == "inductor":
                f = torch.compile(site(kind), dynamic=False)
            else:
                f = torch.compile(site(kind), backend="sparsedrop", dynamic=False)
            step = lambda: torch.autograd.grad(f(x, w), (x, w), dy)
            step(); step(); torch.cuda.synchronize()
            g, keep = capture_cuda_graph(step)
            for _ in range(5): g.replay()
            torch.cuda.synchronize()
            n = 30
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(n): g.replay()
                torch.cuda.synchronize()
            per = collections.Counter()
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    per[e.name[:70]] += (getattr(e, "device_time", None) or e.cuda_time) / n
            tot = sum(per.values())
            print(f"{kind} {R}x{N}x{K} {name}: kernels {tot:.1f} us: " + "; ".join(f"{k} {v:.1f}" for k, v in per.most_common()), flush=True)
            del g, keep

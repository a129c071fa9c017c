"""cProfile of a compiled block-dropped linear site's plain fwd+bwd calls (host), Gluon at every
size vs portable, 8192x1024x4096 p=0.3."""
import cProfile, pstats, io, math, sys, time, torch
sys.path.insert(0, "benchmarks")
import linear_compiled as lc
M, N, K = 8192, 1024, 4096
gen = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
w = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen) / math.sqrt(K)).requires_grad_()
dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, generator=gen)
for method in ("sparsedrop_gluon", "sparsedrop_portable"):
    torch._dynamo.reset()
    step = lc.step_for(method, 0.3, x, w, dy)
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        step()
    t1 = time.perf_counter(); torch.cuda.synchronize()
    print(f"{method}: host {(t1 - t0) * 1e4:.1f} us per fwd+bwd", flush=True)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(100):
        step()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(28)
    print(s.getvalue()[-6000:], flush=True)

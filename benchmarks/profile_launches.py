"""Where the eager sparse_dropout_linear fwd+bwd spends host time (GPU kept busy, so enqueue = host).

Produced results/raw/session10/launch_costs_db0afbf.log (one H200): per-kernel host time of Triton's
launch inside a step, and of the same launches through the compiled kernel's own launcher, at
db0afbf, before the eager path replayed launch plans (kernels/launch_plans.py). Since then the
launchers only run in full with the plans off:
    SPARSEDROP_LAUNCH_PLANS=0 python benchmarks/profile_launches.py
"""
import collections, inspect, os, statistics, sys, time
import torch
import triton
import sparsedrop_compile as sd
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host_overhead  # noqa: E402  (beside this script)
from sparsedrop_compile.kernels import block_sparse_matmul_triton as bsm, runtime

print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)

def busy():
    torch.cuda.synchronize(); torch.cuda._sleep(int(3e8))

def host_us(fn, n=40, reps=5):
    out = []
    for _ in range(reps):
        busy()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)

for rows, n, k in ((4096, 4096, 4096), (8192, 1024, 4096)):
    step, x, w = host_overhead.eager_step(rows, n, k)  # sparse_dropout_linear fwd + bwd, bf16, p = 0.1
    gy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    def fwd():
        return sd.sparse_dropout_linear(x, w, None, p=0.1, block_size=128)
    for _ in range(3): step()
    print(f"\n{rows}x{n}x{k}: full fwd+bwd host {host_us(step):.0f} us", flush=True)
    print(f"  fwd only host {host_us(fwd):.0f} us")
    from sparsedrop_compile.kernels.block_mask import sample_block_keep
    print(f"  sample_block_keep host {host_us(lambda: sample_block_keep(x, 0.1, 128, 128, False)):.0f} us")
    print(f"  torch.empty host {host_us(lambda: torch.empty(100, device='cuda')):.1f} us")
    print(f"  F.linear fwd+bwd dense host {host_us(lambda: torch.nn.functional.linear(x, w).backward(gy)):.0f} us")
    # Triton launch cost, per kernel, inside the full step
    orig = bsm.launch
    acc, cnt, captured = collections.Counter(), collections.Counter(), {}
    class Timed:
        def __init__(s, kern): s.kern = kern
        def __getitem__(s, grid):
            inner = orig(s.kern)[grid]
            def call(*a, **kw):
                t = time.perf_counter(); r = inner(*a, **kw); acc[s.kern.__name__] += time.perf_counter() - t
                cnt[s.kern.__name__] += 1
                captured[s.kern.__name__] = (s.kern, grid, a, kw, r)
                return r
            return call
    bsm.launch = Timed
    busy()
    for _ in range(40): step()
    torch.cuda.synchronize()
    bsm.launch = orig
    for name in acc:
        print(f"  triton launch {name}: {acc[name] / cnt[name] * 1e6:.1f} us per launch ({cnt[name] / 40:.0f} per step)")
    # the same launches straight through the compiled kernel
    for name, (kern, grid, a, kw, compiled) in captured.items():
        if compiled is None:
            print(f"  {name}: no compiled kernel returned"); continue
        sig = inspect.signature(kern.fn)
        bound = sig.bind(*a, **{k_: v for k_, v in kw.items() if k_ in sig.parameters})
        bound.apply_defaults()
        vals = list(bound.arguments.values())
        g3 = tuple(grid) + (1,) * (3 - len(grid))
        runner = compiled[g3]
        try:
            t_runner = host_us(lambda: runner(*vals), n=200)
            stream = torch.cuda.current_stream().cuda_stream
            fn, pm = compiled.function, compiled.packed_metadata
            t_run = host_us(lambda: compiled.run(g3[0], g3[1], g3[2], stream, fn, pm, None, None, None, *vals), n=200)
            t_triton = host_us(lambda: kern[grid](*a, **kw), n=200)
            print(f"  {name}: kern[grid] {t_triton:.1f} us, compiled[grid] runner {t_runner:.1f} us, compiled.run {t_run:.1f} us")
        except Exception as e:
            print(f"  {name}: direct run failed: {type(e).__name__}: {e}")
    # cProfile of our python (own time) for the step
    import cProfile, pstats, io
    pr = cProfile.Profile(); busy(); pr.enable()
    for _ in range(40): step()
    pr.disable(); torch.cuda.synchronize()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25); print(s.getvalue()[:6000])

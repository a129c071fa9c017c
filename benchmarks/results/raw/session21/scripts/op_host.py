import time, torch
import sparsedrop_compile
from sparsedrop_compile.kernels import runtime, launch_plans
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, block_sparse_matmul_triton as tri
runtime.LAUNCH_BOUND_WORK = 0
for (M, N, K) in ((1024, 1024, 1024), (4096, 4096, 4096)):
    a = torch.randn(1, M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1, K, N, device="cuda", dtype=torch.bfloat16)
    keep = torch.rand(1, M // 128 + 1, K // 128 + 1, device="cuda") > 0.5
    out = torch.empty(1, M, N, device="cuda", dtype=torch.bfloat16)
    def op():
        torch.ops.sparsedrop.wgmma_dsd(a, b, keep, 2.0, 128, 128, None, out)
    def raw():
        hopper.wgmma_dsd._init_fn(a, b, keep, 2.0, 128, 128, None, out)
    def direct():
        with runtime.direct_launches():
            tri.dsd(a, b, keep, 2.0, (128, 128), None, out=out, _supported=True)
    def plain():
        tri.dsd(a, b, keep, 2.0, (128, 128), None, out=out, _supported=True)
    for name, fn in (("op", op), ("raw", raw), ("direct", direct), ("plain launcher", plain)):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"{M}x{N}x{K} {name:15s} host {(t1 - t0) / n * 1e6:8.1f} us/call, wall {(t2 - t0) / n * 1e6:8.1f} us/call", flush=True)
    print(launch_plans.stats)
    from triton import knobs
    print("hooks", launch_plans.launch_hooks_set())
    plan = [p for p in launch_plans._plans.values() if p is not None]
    for p_ in plan:
        print([(type(r.kernel).__name__, r.compiled is not None) for r in p_.launches])

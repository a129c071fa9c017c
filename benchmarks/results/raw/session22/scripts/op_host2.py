"""Host time per call of the opaque wgmma ops (session 22: schema ops, cheaper replays), 200 calls."""
import time, torch
import sparsedrop_compile
from sparsedrop_compile.kernels import runtime, launch_plans
from sparsedrop_compile.kernels import block_sparse_matmul_triton as tri
runtime.LAUNCH_BOUND_WORK = 0
M = N = K = 4096
a = torch.randn(1, M, K, device="cuda", dtype=torch.bfloat16)
w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
b = w.t()[None]
g = torch.randn(1, M, N, device="cuda", dtype=torch.bfloat16)
keep = torch.rand(1, M // 128 + 1, K // 128 + 1, device="cuda") > 0.5
out = torch.empty(1, M, N, device="cuda", dtype=torch.bfloat16)
dx = torch.empty(1, M, K, device="cuda", dtype=torch.bfloat16)
dw = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t()[None]
cases = {
    "op dsd": lambda: torch.ops.sparsedrop.wgmma_dsd(a, b, keep, 2.0, 128, 128, None, out),
    "op sdd": lambda: torch.ops.sparsedrop.wgmma_sdd(g, b, keep, 2.0, 128, 128, None, 1.0, dx),
    "op dsd_tn": lambda: torch.ops.sparsedrop.wgmma_dsd_tn(a, g, keep, 2.0, 128, 128, False, dw),
}
def direct():
    with runtime.direct_launches():
        tri.dsd(a, b, keep, 2.0, (128, 128), None, out=out, _supported=True)
cases["direct dsd (replay)"] = direct
for name, fn in cases.items():
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    print(f"{M}x{N}x{K} {name:22s} host {(t1 - t0) / n * 1e6:8.1f} us/call", flush=True)
print(launch_plans.stats)

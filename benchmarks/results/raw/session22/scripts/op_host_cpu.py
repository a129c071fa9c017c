"""Host time per call of the opaque wgmma ops on CPU (no GPU here), kernel launches stubbed.

Drives the real host code (custom-op layers, direct_launches, the launch-plan replay of the
launchers and of the Hopper Plan.run: kept-block lists + wgmma launch) on small CPU bf16
tensors, with the device answered as an H200 (132 SMs) and every kernel launch replaced by a
stub whose "compiled kernel" has a no-op ``run``: replays take the compiled-launcher branch, as on
a GPU, minus Triton's C launcher itself and CUDA's allocator/stream calls.

Parts:
  dispatch  a trivial body registered with custom_op vs torch.library.Library (torch layers only)
  op        torch.ops.sparsedrop.wgmma_*.default(...): the whole host path of one compiled call
  direct    the launcher under runtime.direct_launches() (the launch-plan replay, no op layers)

Run:  python .gl/op_host_cpu.py                                  (this tree)
      .gl/make_before.sh && PYTHONPATH=/tmp/sd_before/pkg python .gl/op_host_cpu.py
                                        (this tree with this change taken out)
"""
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # real host code (Gluon kernels import); launches are stubbed
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import sparsedrop_compile  # noqa: E402,F401
from sparsedrop_compile.kernels import (  # noqa: E402
    block_sparse_matmul_hopper as hopper,
    block_sparse_matmul_triton as tri,
    kept_blocks,
    launch_plans,
    runtime,
)

N, REPEATS = 1000, 25


def best_us(fn) -> float:
    """Minimum over REPEATS blocks of N calls (this box's speed drifts between phases)."""
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(N):
            fn()
        best = min(best, (time.perf_counter() - t0) / N * 1e6)
    return best


_calib = torch.empty(16)
print(f"calib     as_strided {best_us(lambda: _calib.as_strided((8,), (1,), 1)):7.2f} us/call (machine speed)", flush=True)


# ------------------------------------------------------------------ dispatch layers, trivial body
SCHEMA = "(Tensor a, Tensor b, Tensor keep, float scale, SymInt br, SymInt bc, Tensor? bias, Tensor(a!) out) -> ()"


@torch.library.custom_op("hostbench::custom", mutates_args=("out",))
def _custom(a: Tensor, b: Tensor, keep: Tensor, scale: float, br: int, bc: int, bias: Tensor | None,
            out: Tensor) -> None:
    pass


_lib = torch.library.Library("hostbench", "FRAGMENT")
_lib.define("library" + SCHEMA)
_lib.impl("library", lambda a, b, keep, scale, br, bc, bias, out: torch._C._increment_version((out,)),
          "CompositeExplicitAutograd")

x = torch.empty(1, 64, 64)
k = torch.ones(1, 2, 2, dtype=torch.bool)
for name in ("custom", "library"):
    op = getattr(torch.ops.hostbench, name).default
    print(f"dispatch  {name:8s} {best_us(lambda: op(x, x, k, 2.0, 32, 32, None, x)):7.2f} us/call", flush=True)


# ------------------------------------------------------------------ the wgmma ops, launches stubbed
class _Compiled:
    packed_metadata = function = None

    def run(self, *args):
        pass


_COMPILED = _Compiled()


class _Stub:
    """A kernel whose launch returns a stub compiled kernel (replays call its ``run``)."""

    def __init__(self, kernel):
        self.fn = kernel.fn

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _COMPILED


for module, names in ((hopper, ("_listed_wgmma_kernel",)),
                      (kept_blocks, ("_kept_lists_kernel", "_kept_pairs_kernel", "_kept_grouped_kernel")),
                      (tri, ("_dsd_kernel", "_sdd_kernel", "_dsd_tn_kernel"))):
    for name in names:
        if hasattr(module, name):  # _kept_grouped_kernel: new in the tree under work
            setattr(module, name, _Stub(getattr(module, name)))
runtime.hopper_enabled = lambda device: True
runtime.sm_resources = lambda device: (132, 233472, 65536)  # an H200
runtime.LAUNCH_BOUND_WORK = 0

gen = torch.Generator().manual_seed(0)
bf = dict(dtype=torch.bfloat16)
M = K = Nn = 1024
blk = 128
a = torch.randn(1, M, K, generator=gen, **bf)
b = torch.randn(1, K, Nn, generator=gen, **bf)
g = torch.randn(1, M, Nn, generator=gen, **bf)
keep = torch.rand(1, M // blk + 1, K // blk + 1, generator=gen) > 0.5  # padded flags, as the passes make them
out_dsd = torch.empty(1, M, Nn, **bf)
out_sdd = torch.empty(1, M, K, **bf)
dw = torch.empty(Nn, K, **bf)

cases = {
    "wgmma_dsd": (lambda: torch.ops.sparsedrop.wgmma_dsd.default(a, b, keep, 2.0, blk, blk, None, out_dsd),
                  lambda: tri.dsd(a, b, keep, 2.0, (blk, blk), None, out=out_dsd, _supported=True)),
    "wgmma_sdd": (lambda: torch.ops.sparsedrop.wgmma_sdd.default(g, b, keep, 2.0, blk, blk, None, 2.0, out_sdd),
                  lambda: tri.sdd(g, b, keep, 2.0, (blk, blk), None, bias_scale=2.0, out=out_sdd, _supported=True)),
    "wgmma_dsd_tn": (lambda: torch.ops.sparsedrop.wgmma_dsd_tn.default(a, g, keep, 2.0, blk, blk, False,
                                                                       dw.t().unsqueeze(0)),
                     lambda: tri.dsd_tn(a, g, keep, 2.0, (blk, blk), False, out=dw.t().unsqueeze(0), _supported=True)),
}
for name, (op, launcher) in cases.items():
    def direct(launcher=launcher):
        with runtime.direct_launches():
            launcher()

    launch_plans.clear()
    t_op = best_us(op)
    stats = dict(launch_plans.stats)
    plans = [p for p in launch_plans._plans.values() if p is not None]
    launches = [type(r.kernel).__name__ + ("/compiled" if r.compiled is not None else "/python")
                for p in plans for r in p.launches]
    t_direct = best_us(direct)
    print(f"{name:13s} op {t_op:7.2f} us/call   direct {t_direct:7.2f} us/call   "
          f"plans {stats} launches {launches} buffers {[len(p.buffers) for p in plans]}", flush=True)
print(sys.version.split()[0], "torch", torch.__version__, os.uname().machine, flush=True)

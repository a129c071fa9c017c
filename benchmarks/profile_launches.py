"""Where the eager sparse_dropout_linear forward + backward spends host time (GPU kept busy, so
the time a call takes on the host is its enqueue time; bf16, p = 0.1, blocks of 128).

For each shape (default 4096^3 and 8192x1024x4096; give others as ROWSxNxK):
- host time of the step with launch plans (kernels/launch_plans.py), without them, and with the
  plans' launches skipped (what the Python and torch ops around the kernels cost);
- host time of its parts and of baselines: the forward alone, the flag draw, dense F.linear
  forward + backward, F.dropout + F.linear, and a floor (an autograd.Function that only draws
  the flags and allocates its outputs);
- wall time per call (synchronised) against the step's CUDA-graph replay;
- cProfile of 40 steps by own and by cumulative time, and torch.profiler's CPU table.

    python benchmarks/profile_launches.py [4096x4096x4096 ...]

Raw logs: results/raw/session10/launch_costs_db0afbf.log (an earlier version of this script:
per-kernel Triton launch costs), results/raw/session11/eager_probe_*.log.
"""
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

import sparsedrop_compile as sd
from sparsedrop_compile.harness import capture_cuda_graph, do_bench
from sparsedrop_compile.kernels import block_mask, launch_plans

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host_overhead  # noqa: E402  (beside this script)


def busy():
    torch.cuda.synchronize()
    torch.cuda._sleep(int(4e8))


def host_us(fn, n=40, reps=7):
    """Median over reps of the host time per call of n calls enqueued behind a sleeping GPU."""
    out = []
    for _ in range(reps):
        busy()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def wall_ms(fn, n=20, reps=7):
    out = []
    for _ in range(reps):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(out)


class _Floor(torch.autograd.Function):
    """What any autograd op with outputs of these shapes costs: save, allocate, return."""

    @staticmethod
    def forward(ctx, x, w, keep):
        ctx.save_for_backward(x, w, keep)
        return x.new_empty(x.shape[0], w.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, w, _ = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(w), None


def probe(rows: int, n: int, k: int) -> None:
    step, x, w = host_overhead.eager_step(rows, n, k)
    gy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    parts = {
        "step, plans": step,
        "forward only": lambda: sd.sparse_dropout_linear(x, w, None, p=0.1, block_size=128),
        "flag draw (sample_block_keep)": lambda: block_mask.sample_block_keep(x, 0.1, 128, 128, False),
        "dense F.linear fwd+bwd": lambda: F.linear(x, w).backward(gy),
        "F.dropout + F.linear fwd+bwd": lambda: F.linear(F.dropout(x, 0.1), w).backward(gy),
        "floor: Function, flag draw, 3 allocations": lambda: _Floor.apply(
            x, w, torch.rand(1, rows // 128, k // 128, device="cuda") >= 0.1).backward(gy),
    }
    for _ in range(4):
        step()
    print(f"\n== {rows}x{n}x{k}", launch_plans.stats, flush=True)
    res = {name: host_us(fn) for name, fn in parts.items()}
    launch_plans.ENABLED = False
    step(), step()
    res["step, no plans"] = host_us(step)
    launch_plans.ENABLED = True
    step(), step()
    replay = launch_plans._Replay.__call__
    launch_plans._Replay.__call__ = lambda self, tensors, stream, hooks: None
    try:
        res["step, plans, launches skipped"] = host_us(step)
    finally:
        launch_plans._Replay.__call__ = replay
    for name, us in res.items():
        print(f"  host {name}: {us:.0f} us", flush=True)
    x.grad = w.grad = None
    wall = wall_ms(step)
    x.grad = w.grad = None
    graph, _ = capture_cuda_graph(step, warmup_calls=2)
    graph_ms = do_bench(graph.replay, warmup=10, rep=50)
    print(f"  wall per call {wall:.3f} ms, CUDA-graph replay {graph_ms:.3f} ms: {wall / graph_ms:.2f}x", flush=True)
    x.grad = w.grad = None
    for _ in range(3):
        step()
    prof = cProfile.Profile()
    busy()
    prof.enable()
    for _ in range(40):
        step()
    prof.disable()
    torch.cuda.synchronize()
    for key in ("tottime", "cumtime"):
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(40)
        print(text.getvalue(), flush=True)
    busy()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        for _ in range(40):
            step()
    torch.cuda.synchronize()
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for shape in sys.argv[1:] or ["4096x4096x4096", "8192x1024x4096"]:
        probe(*map(int, shape.split("x")))

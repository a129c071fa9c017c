"""Host (CPU) time per call of each layer of a rewritten site, next to Inductor's, on a GPU.

Question: a compiled training step is only as fast as the host can enqueue its kernels. How many
microseconds of host time does each of our ops cost per call, and how much of that is the
custom-op dispatch, our launcher's Python, Triton's JIT launch path and the kernels' launches?

Method: the GPU is first kept busy (torch.cuda._sleep), so every call below only enqueues work
and the wall time of a loop of calls is host time alone (no call waits for the GPU; the loops
stay far below the launch queue's depth). Median of --reps loops of --calls calls each, after
warm-up calls that compile and tune. Shapes are T5-base's at batch 64 x 512 (the benchmark's).

    python benchmarks/host_overhead.py                 # table to stdout
    python benchmarks/host_overhead.py --out DIR       # also DIR/host_overhead_<gpu>.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import sparsedrop_compile  # noqa: E402,F401  (registers the ops)
from sparsedrop_compile.kernels import block_sparse_matmul_triton as bsm  # noqa: E402
from sparsedrop_compile.kernels import flash_attention_triton as fat  # noqa: E402
from sparsedrop_compile.kernels.block_mask import keep_shape  # noqa: E402
from sparsedrop_compile.kernels.flash_attention import attention_keep_shape  # noqa: E402

ops = torch.ops.sparsedrop


def host_us(fn, calls: int, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU spin: the loop below never waits for the GPU
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def cases(args):
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows, k, n = args.batch * args.seq, 3072, 768  # T5's FFN output projection wo: dropout(relu(x Wi)) Wo
    block = (128, 128)
    x = torch.randn(rows, k, device=dev, dtype=dt, generator=g)
    w = torch.randn(n, k, device=dev, dtype=dt, generator=g)
    gy = torch.randn(rows, n, device=dev, dtype=dt, generator=g)
    keep = torch.rand(keep_shape(x.shape, block, False), device=dev, generator=g) >= 0.1
    a3, b3 = x.reshape(1, rows, k), w.t().unsqueeze(0)
    yield "linear fwd: sparsedrop::linear op", lambda: ops.linear(x, w, None, keep, 1.1, 128, 128, "auto")
    yield "linear fwd: dsd launcher only", lambda: bsm.dsd(a3, b3, keep, 1.1, block, _supported=True)
    yield "linear fwd: kept_lists launch only", lambda: bsm.kept_lists(keep, "row", order=True)
    yield "linear bwd: linear_grad_input op", lambda: ops.linear_grad_input(gy, w, keep, 1.1, 128, 128, "auto")
    yield "linear bwd: linear_grad_weight op", lambda: ops.linear_grad_weight(gy, x, keep, 1.1, 128, 128, "auto")
    yield "dense: torch.mm (cuBLAS), for scale", lambda: torch.mm(x, w.t())

    def dense_site(x, w):
        return torch.nn.functional.linear(torch.nn.functional.dropout(x, 0.1, True), w)

    compiled = torch.compile(dense_site, backend="inductor")
    yield "dense: Inductor dropout + linear fwd (compiled fn)", lambda: compiled(x, w)

    b, h, s, d = args.batch, 12, args.seq, 64
    q, kk, v, go = (torch.randn(b, s, h * d, device=dev, dtype=dt, generator=g).view(b, s, h, d).transpose(1, 2)
                    for _ in range(4))
    bias = torch.randn(1, h, s, s, device=dev, dtype=dt, generator=g)  # T5's position bias
    akeep = torch.rand(attention_keep_shape(q.shape, kk.shape, (64, 128)), device=dev, generator=g) >= 0.1
    fwd_args = (q, kk, v, bias, akeep, 0.1, False, 1.0, False, 64, 128, "post_softmax", "auto")
    out, lse = ops.attention_forward(*fwd_args)
    yield "attention fwd: attention_forward op", lambda: ops.attention_forward(*fwd_args)
    yield "attention fwd: launcher only", lambda: fat.attention_forward(q, kk, v, bias, akeep, 0.1, False, 1.0, False,
                                                                         (64, 128), "post_softmax")
    bwd_args = (go, q, kk, v, out, lse, bias, akeep, 0.1, False, 1.0, False, 64, 128, "post_softmax", "auto", True)
    yield "attention bwd: attention_backward op (dmask)", lambda: ops.attention_backward(*bwd_args)
    yield "attention bwd: launcher only (dmask)", lambda: fat.attention_backward(
        go, q, kk, v, out, lse, bias, akeep, 0.1, False, 1.0, False, (64, 128), "post_softmax", True)

    def sdpa(q, k, v, bias):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, bias, dropout_p=0.1)

    yield "dense: SDPA(p=0.1) fwd, eager", lambda: sdpa(q, kk, v, bias)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("host_overhead.py measures launches on a CUDA GPU")
    import triton

    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}; host us per call (median of "
          f"{args.reps} x {args.calls} calls, GPU kept busy), with Triton's launch path (JIT) and with "
          "kernels/_launch.py's direct launches (fast)")
    print(f"{'JIT':>9s} {'fast':>9s}  case")
    results = []
    with torch.no_grad():  # as in a compiled graph: the ops are called below autograd
        for label, fn in cases(args):
            us = {}
            for mode in ("0", "1"):  # read by kernels/_launch.py at every launch
                os.environ["SPARSEDROP_FAST_LAUNCH"] = mode
                us[mode] = host_us(fn, args.calls, args.reps)
            results.append((label, us["0"], us["1"]))
            print(f"{us['0']:9.1f} {us['1']:9.1f}  {label}", flush=True)
    os.environ.pop("SPARSEDROP_FAST_LAUNCH")
    from sparsedrop_compile.kernels import _launch

    for kernel in _launch._WRAPPED.values():
        fn_name = getattr(kernel.fn, "__name__", repr(kernel.fn))
        print(f"  {fn_name}: {kernel.fast_launches} direct launches; last fallback: {kernel.fallback or '-'}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        with (out / f"host_overhead_{slug}.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["gpu", "torch", "triton", "case", "host_us_jit_launch", "host_us_fast_launch"])
            for label, jit, fast in results:
                w.writerow([name, torch.__version__, triton.__version__, label, round(jit, 1), round(fast, 1)])
    return 0


if __name__ == "__main__":
    sys.exit(main())

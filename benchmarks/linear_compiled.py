"""A block-dropped linear site under torch.compile (default mode), as users run it:
``F.linear(F.dropout(x, p), w)`` forward + backward compiled with the sparsedrop backend, beside
the same code compiled by Inductor and dense cuBLAS (``F.linear`` without dropout), each timed two
ways: CUDA-graph replay (GPU time; ``do_bench`` medians, L2 flushed) and ``do_bench`` on the plain
calls (the host's launch work included, as a default-mode training step pays it).

Methods:
    cublas               F.linear forward + backward, no dropout (eager)
    inductor             torch.compile(backend="inductor") of linear(dropout(x))
    sparsedrop           backend="sparsedrop", default options: on Hopper its matmuls from
                         OPAQUE_MIN_WORK multiply-adds up run the Gluon kernels through opaque ops
                         (kernels/block_sparse_matmul_hopper.py), smaller ones the portable kernels
    sparsedrop_gluon     the same with the Gluon kernels at every size (OPAQUE_MIN_WORK = 0)
    sparsedrop_portable  the same, compiled with SPARSEDROP_HOPPER=0: the portable Triton kernels
                         that Inductor launches itself (what compiled code ran before)
    sparsedrop_min0      options={"sparse_min_p": 0}: skip dropped blocks at every p (at p below
                         the default sparse_min_p, 0.25, the site otherwise runs dense)

    python benchmarks/linear_compiled.py [--ps 0.1 0.3 0.5] [--shapes 8192x768x3072,...] [--out FILE.csv]
    python benchmarks/linear_compiled.py --plot FILE.csv
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import LINEAR_SHAPES  # noqa: E402  (the issue's five shapes)

from sparsedrop_compile import harness  # noqa: E402
from sparsedrop_compile.harness import capture_cuda_graph, do_bench  # noqa: E402
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper  # noqa: E402

# The shapes, the smallest not launch-bound (2**34 multiply-adds), and two between 4096^3
# (2**36) and 8192 x 4096 x 14336 (2**38.8), around OPAQUE_MIN_WORK.
SHAPES = [*LINEAR_SHAPES, (4096, 4096, 1024), (8192, 4096, 4096), (8192, 4096, 8192)]
METHODS = ("cublas", "inductor", "sparsedrop", "sparsedrop_gluon", "sparsedrop_portable", "sparsedrop_min0")


def _site(p: float):
    return lambda x, w: F.linear(F.dropout(x, p, training=True), w)


def _compiled(method: str, p: float):
    if method == "inductor":
        return torch.compile(_site(p), dynamic=False)
    options = {"sparse_min_p": 0.0} if method == "sparsedrop_min0" else {}
    return torch.compile(_site(p), backend="sparsedrop", dynamic=False, options=options)


def step_for(method: str, p: float, x, w, dy):
    """A forward + backward call of ``method``; compiled (and warmed up) here, so that
    ``sparsedrop_portable`` is traced with the Hopper path off."""
    fwd = (lambda x, w: F.linear(x, w)) if method == "cublas" else _compiled(method, p)

    def step():
        return torch.autograd.grad(fwd(x, w), (x, w), dy)

    off = method == "sparsedrop_portable"
    saved, bound = os.environ.get("SPARSEDROP_HOPPER"), hopper.OPAQUE_MIN_WORK
    if off:
        os.environ["SPARSEDROP_HOPPER"] = "0"
    if method == "sparsedrop_gluon":
        hopper.OPAQUE_MIN_WORK = 0
    try:
        step()
        torch.cuda.synchronize()
    finally:
        hopper.OPAQUE_MIN_WORK = bound
        if off:
            if saved is None:
                del os.environ["SPARSEDROP_HOPPER"]
            else:
                os.environ["SPARSEDROP_HOPPER"] = saved
    return step


def time_graph(step) -> float:
    graph, keep_alive = capture_cuda_graph(step)
    try:
        return do_bench(graph.replay, warmup=25, rep=100)
    finally:
        del graph, keep_alive
        torch.cuda.synchronize()


def run(shapes, ps, methods) -> list[dict]:
    info = harness.environment("cuda", ("torch", "triton"))
    print(info, flush=True)
    rows = []
    for rows_, n, k in shapes:
        shape = f"{rows_}x{n}x{k}"
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(rows_, k, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        w = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / math.sqrt(k)).requires_grad_()
        dy = torch.randn(rows_, n, device="cuda", dtype=torch.bfloat16, generator=gen)
        cublas = None
        for p in ps:
            line = []
            for method in methods:
                if method == "cublas" and cublas is not None:
                    continue  # no dropout: once per shape
                if method == "sparsedrop_min0" and p >= 0.25:
                    continue  # the same as "sparsedrop" there
                torch._dynamo.reset()
                print(f"  {shape} p={p} {method}", flush=True)
                step = step_for(method, p, x, w, dy)
                graph_ms, plain_ms = time_graph(step), do_bench(step, warmup=25, rep=100)
                if method == "cublas":
                    cublas = graph_ms
                rows.append({**info, "shape": shape, "p": 0.0 if method == "cublas" else p, "method": method,
                             "cudagraph_ms": round(graph_ms, 4), "do_bench_ms": round(plain_ms, 4),
                             "graph_vs_cublas": round(graph_ms / cublas, 4)})
                line.append(f"{method} {graph_ms:.4f}/{plain_ms:.4f}")
                del step
                torch.cuda.empty_cache()
            print(f"{shape} p={p} (graph/do_bench ms): " + ", ".join(line), flush=True)
    return rows


def plot(path: Path) -> None:
    """Against dense cuBLAS, per shape and p, one bar per method: GPU time (CUDA-graph replay,
    top) and the plain call with the host's work (do_bench, bottom; default mode as users run it)."""
    plt = harness.pyplot()
    if plt is None:
        return
    rows = harness.read_csv(path)
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    ps = sorted({float(r["p"]) for r in rows if r["method"] != "cublas"})
    methods = [m for m in METHODS[1:] if any(r["method"] == m for r in rows)]
    run = lambda r: (r["shape"], r.get("session_call"))  # noqa: E731  (CSVs merged from runs: each row's own cuBLAS)
    cublas = {run(r): r for r in rows if r["method"] == "cublas"}
    fig, axes = plt.subplots(2, len(ps), figsize=(5.5 * len(ps), 8.4), squeeze=False)
    width = 0.8 / len(methods)
    for row, (column, label) in enumerate((("cudagraph_ms", "GPU time (CUDA-graph replay)"),
                                           ("do_bench_ms", "plain call, host included"))):
        for ax, p in zip(axes[row], ps):
            for j, method in enumerate(methods):
                xs, ys = [], []
                for i, shape in enumerate(shapes):
                    hit = [r for r in rows if (r["shape"], r["method"]) == (shape, method) and float(r["p"]) == p]
                    if hit and run(hit[0]) in cublas:
                        xs.append(i + j * width)
                        ys.append(float(hit[0][column]) / float(cublas[run(hit[0])][column]))
                ax.bar(xs, ys, width, label=method, color=f"C{j}")
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.axhline(1.0 - p, color="grey", lw=0.8, ls=":")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
            ax.set_xticklabels(shapes, fontsize=7, rotation=20)
            ax.set_title(f"p = {p:g}: {label} (dotted: ideal 1 - p)", fontsize=9)
            ax.set_ylabel("fwd+bwd / dense cuBLAS")
    axes[0][0].legend(fontsize=7)
    info = rows[0]
    fig.suptitle(f"linear(dropout(x)) under torch.compile (default mode), {info['gpu']}, torch {info['torch']}, "
                 f"triton {info['triton']}", fontsize=9)
    out = path.with_suffix(".png")
    harness.save_figure(fig, out)
    print(f"plot: {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ps", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--shapes", default=None, help="comma-separated RxNxK (default: all)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="draw this CSV instead of running")
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return
    if not torch.cuda.is_available():
        sys.exit("linear_compiled.py needs a CUDA GPU")
    methods = harness.chosen("--methods", args.methods, METHODS)
    if "cublas" not in methods:
        methods.insert(0, "cublas")  # every ratio is against it
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = run(shapes, args.ps, methods)
    slug = harness.slug(rows[0]["gpu"])
    out = args.out or Path(__file__).resolve().parent / "results" / f"linear_compiled_{slug}.csv"
    harness.write_csv(out, rows)
    print(f"wrote {out}")
    plot(out)


if __name__ == "__main__":
    main()

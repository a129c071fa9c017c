"""Attention under torch.compile (default mode), as users run it: forward + backward of
``sparse_dropout_attention`` compiled with the sparsedrop backend, beside the same call made
eagerly and SDPA compiled at p = 0.1 and p = 0, each timed two ways: CUDA-graph replay (GPU time)
and ``do_bench`` on the plain calls (the host's launch work included, as a default-mode training
step pays it).

Compiled code reads K and V by TMA only where Inductor launches our kernels through Triton's
launcher (``kernels/traced_descriptors.py``): run it once as is (the backend's default, Inductor's
static launcher: pointer loads) and once with
``TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=0`` set before Python starts (TMA
loads; ``compiled_pointers`` then times that launcher with pointer loads). Each row says which.

    python benchmarks/attention_compiled.py [--methods eager,compiled,...] [--out FILE.csv]
    python benchmarks/attention_compiled.py --plot A.csv B.csv     # one bar chart of such CSVs
"""
import argparse
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as ba  # noqa: E402  (the inputs and timers of the attention benchmark)

from sparsedrop_compile import harness  # noqa: E402
from sparsedrop_compile.attention_ops import sparse_dropout_attention  # noqa: E402
from sparsedrop_compile.kernels import runtime, traced_descriptors  # noqa: E402

# (name, batch, heads, seq, head_dim, causal, mask kind): the shapes, a head dim of the
# 128 class that is not a power of two, and a fine-tuning batch that is launch-bound.
SHAPES = [
    ("8x16x1024x64", 8, 16, 1024, 64, False, None),
    ("4x16x2048x128-causal", 4, 16, 2048, 128, True, None),
    ("64x12x512x64+boolpad", 64, 12, 512, 64, False, "bool"),
    ("16x32x2048x64-causal", 16, 32, 2048, 64, True, None),
    ("8x12x4096x64-causal", 8, 12, 4096, 64, True, None),
    ("4x16x2048x80-causal", 4, 16, 2048, 80, True, None),
    ("8x12x128x64+boolpad", 8, 12, 128, 64, False, "bool"),
]
P = 0.1


def _method(name, q, k, v, mask, causal):
    if name == "eager":
        return lambda: sparse_dropout_attention(q, k, v, mask, p=P, is_causal=causal)
    if name.startswith("compiled"):
        return torch.compile(lambda: sparse_dropout_attention(q, k, v, mask, p=P, is_causal=causal), backend="sparsedrop")
    p = P if name == "sdpa_compiled_p" else 0.0
    return torch.compile(lambda: F.scaled_dot_product_attention(q, k, v, mask, dropout_p=p, is_causal=causal))


METHODS = ("eager", "compiled", "compiled_pointers", "sdpa_compiled_p", "sdpa_compiled_p0")


def plot(paths: list[Path], out: Path) -> None:
    """GPU time (CUDA-graph replay) per shape, one bar per method and launcher, from the CSVs of
    one or more runs (the static-launcher run and the Triton-launcher one side by side)."""
    plt = harness.pyplot()
    if plt is None:
        return
    rows = [r for path in paths for r in harness.read_csv(path)]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    series = list(dict.fromkeys((r["method"], r["launcher"]) for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.2 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for i, (method, launcher) in enumerate(series):
            ms = [float(r["cudagraph_ms"]) for r in rows
                  if (r["shape"], r["method"], r["launcher"]) == (shape, method, launcher)]
            if ms:
                label = method if method.startswith(("sdpa", "eager")) else f"{method}, {launcher} launcher"
                ax.bar(i, ms[0], label=label, color=f"C{i}")
        ax.set_title(shape, fontsize=8)
        ax.set_xticks([])
        ax.set_ylabel("fwd+bwd ms, CUDA-graph replay")
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=6, loc="lower left")
    info = rows[0]
    fig.suptitle(f"attention under torch.compile, p = {P}, {info['gpu']}, torch {info['torch']}, triton "
                 f"{info['triton']} (K, V by TMA where not launch-bound, but with the static launcher or "
                 "'compiled_pointers')", fontsize=9)
    harness.save_figure(fig, out)
    print(f"plot: {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--shapes", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--plot", type=Path, nargs="+", default=None, help="draw these CSVs instead of running")
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.plot, args.plot[0].with_name("attention_compiled_" + args.plot[0].stem.rsplit("_", 1)[-1] + ".png"))
        return
    if not torch.cuda.is_available():
        sys.exit("attention_compiled.py needs a CUDA GPU")
    methods = harness.chosen("--methods", args.methods, METHODS)
    shapes = [row for row in SHAPES if args.shapes is None or row[0] in args.shapes.split(",")]
    info, slug = ba.env_info()
    # Inductor's caches key on the graph, which is the same with either kind of load.
    torch._inductor.config.force_disable_caches = True
    launcher = "python" if traced_descriptors.usable() else "static"
    info = {**info, "launcher": launcher}
    print(info, flush=True)
    rows = []
    usable = traced_descriptors.usable
    for shape, b, h, s, d, causal, mask_kind in shapes:
        q, k, v, grad, mask = ba.make_inputs(b, h, s, d, mask_kind)
        line = []
        for method in methods:
            torch._dynamo.reset()
            traced_descriptors.usable = (lambda: False) if method == "compiled_pointers" else usable
            large = not runtime.launch_bound(b * h * s, s, 2 * d)  # else pointer loads everywhere
            loads = {"eager": "tma", "compiled": "tma" if usable() else "pointers"}.get(method, "pointers")
            loads = loads if large else "pointers"
            try:
                step = ba.fwd_bwd(_method(method, q, k, v, mask, causal), q, k, v, grad)
                graph_ms = ba.time_graph(step, args.reps)
                bench_ms = ba.time_eager(step, args.reps)
            finally:
                traced_descriptors.usable = usable
            rows.append({**info, "shape": shape, "method": method, "loads": loads if "sdpa" not in method else "",
                         "p": P if "p0" not in method else 0.0,
                         "cudagraph_ms": round(graph_ms, 4), "do_bench_ms": round(bench_ms, 4)})
            line.append(f"{method} {graph_ms:.4f}/{bench_ms:.4f}")
        print(f"{shape} (graph/do_bench ms): " + ", ".join(line), flush=True)
    out = args.out or Path(__file__).resolve().parent / "results" / f"attention_compiled_{launcher}_{slug}.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

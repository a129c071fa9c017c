"""Tile-dropout attention vs PyTorch SDPA, forward + backward, side by side in one process.

Question: at attention dropout p, how fast is sparsedrop::attention (tile dropout, dropped tiles
skipped) against F.scaled_dot_product_attention(dropout_p=p), SDPA without dropout, and the eager
matmul(dropout(softmax)) chain that HF's "eager" attention runs?

    python benchmarks/bench_attention.py                 # full run: shapes x methods x p in {0.1, 0.3, 0.5}
    python benchmarks/bench_attention.py --quick         # p = 0.1 only, fewer repetitions
    python benchmarks/bench_attention.py --sweep         # time the kernel's candidate configs (~2-3 min)
    python benchmarks/bench_attention.py --sweep --neighbours   # and the configs one step from the fastest

Times are medians of CUDA-graph replays of one fwd+bwd step (so Python and dispatch overhead do
not count; every method is timed the same way), falling back to triton.testing.do_bench where
a method cannot be captured (the "timer" column says which). Inputs are random bf16.
Writes benchmarks/results/attention_<gpu>.csv (+ .png); the sweep writes attention_sweep_<gpu>.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

if "--smoke" in sys.argv:
    # Triton reads TRITON_INTERPRET when it is first imported (its own @jit helpers included).
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

import sparsedrop_compile  # noqa: E402,F401  (registers the ops)
from sparsedrop_compile import harness
from sparsedrop_compile.attention_ops import sparse_dropout_attention  # noqa: E402
from sparsedrop_compile.harness import capture_cuda_graph, do_bench, time_calls
from sparsedrop_compile.kernels import flash_attention as fa  # noqa: E402
from sparsedrop_compile.kernels import runtime  # noqa: E402

# (name, batch, heads, seq, head_dim, causal, mask kind)
SHAPES = [
    ("8x16x1024x64", 8, 16, 1024, 64, False, None),
    ("4x12x512x64+boolpad", 4, 12, 512, 64, False, "bool"),
    ("4x12x512x64+floatpad", 4, 12, 512, 64, False, "float"),
    ("4x16x2048x128-causal", 4, 16, 2048, 128, True, None),
    # What HF transformers 5 passes to SDPA: FULL (B, 1, S, S) bool masks. BERT: key padding
    # repeated over the queries; GPT-2: causal & padding in one mask with is_causal=False.
    ("4x12x512x64+hf_pad_full", 4, 12, 512, 64, False, "bool_full_pad"),
    ("4x12x1024x64+hf_causal_pad_full", 4, 12, 1024, 64, False, "bool_full_causal_pad"),
    # BERT-base's training batch in the model benchmark (64 x 512), where launch costs vanish.
    ("64x12x512x64+hf_pad_full", 64, 12, 512, 64, False, "bool_full_pad"),
    # The Hopper-kernels issue's table: the same batch with its key padding as an expanded
    # (B, 1, 1, S) bool view, and two long causal shapes.
    ("64x12x512x64+boolpad", 64, 12, 512, 64, False, "bool"),
    ("16x32x2048x64-causal", 16, 32, 2048, 64, True, None),
    ("8x12x4096x64-causal", 8, 12, 4096, 64, True, None),
]
SMOKE_SHAPES = [("1x2x128x64", 1, 2, 128, 64, False, None), ("1x2x96x64+boolpad", 1, 2, 96, 64, False, "bool"),
                ("1x2x96x128-causal", 1, 2, 96, 128, True, None),
                ("1x2x160x64+hf_causal_pad_full", 1, 2, 160, 64, False, "bool_full_causal_pad")]
# The HF-mask shapes run at the first p only and with fewer methods (the run must stay ~3 min):
# sparsedrop_noclass is sparsedrop_2pass with the mask tile classes off (every tile visited,
# every mask tile read), the A/B for the classification.
HF_MASK_KINDS = ("bool_full_pad", "bool_full_causal_pad")
HF_METHODS = ("sparsedrop_2pass", "sparsedrop_noclass", "sparsedrop_dense", "sdpa_p", "sdpa_p0")
# sparsedrop_2pass / _atomic: the two backward strategies (BACKWARD_STRATEGY), same forward;
# sparsedrop_notma: the default backward with TMA off (SPARSEDROP_TMA=0: K and V by pointer loads,
# the single pass's dQ adds by element atomics), the kernels compiled code runs; the A/B for TMA;
# sparsedrop_dense: every tile kept, p = 0 (the kernels' dense speed, to set against sdpa_p0).
METHODS = ("sparsedrop_2pass", "sparsedrop_notma", "sparsedrop_atomic", "sparsedrop_dropkey", "sparsedrop_dense",
           "sdpa_p", "sdpa_p0", "eager", "sparsedrop_noclass")
DTYPE = torch.bfloat16
# --smoke runs everything on CPU under Triton's interpreter with tiny shapes and a wall-clock
# timer: it checks this script's plumbing where there is no GPU, its times mean nothing.
DEVICE = "cuda"


# --------------------------------------------------------------------------- timing
def time_graph(fn, reps: int) -> float:
    """Median ms of replaying one captured call of fn; raises if fn cannot be captured."""
    graph, _ = capture_cuda_graph(fn)  # 3 calls first: compile kernels, settle the allocator
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    times, _ = time_calls(graph.replay, reps, "cuda")
    del graph
    return statistics.median(times)


def time_eager(fn, reps: int) -> float:
    return do_bench(fn, warmup=25, rep=max(50, reps))


def time_wall(fn, reps: int) -> float:
    fn()
    return statistics.median(time_calls(fn, reps, "cpu")[0])


def timed(fn, reps: int) -> tuple[float, str]:
    if DEVICE == "cpu":
        return time_wall(fn, 1), "wall"
    try:
        return time_graph(fn, reps), "cudagraph"
    except Exception as exc:  # noqa: BLE001 - record and fall back, the row says which timer ran
        print(f"    (CUDA-graph capture failed: {type(exc).__name__}: {str(exc)[:120]}; using do_bench)")
        torch.cuda.synchronize()
        return time_eager(fn, reps), "do_bench"


# --------------------------------------------------------------------------- methods
def make_inputs(b, h, s, d, mask_kind, seed=0):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, h, s, d, device=DEVICE, dtype=DTYPE)
    mask = None
    if mask_kind in HF_MASK_KINDS:
        pad = torch.ones(b, 1, 1, s, device=DEVICE, dtype=torch.bool)
        pad[::2, ..., s - s // 4:] = False  # 25% of the keys padded in half the batch
        mask = pad.expand(b, 1, s, s)
        if mask_kind == "bool_full_causal_pad":
            mask = mask & torch.ones(s, s, device=DEVICE, dtype=torch.bool).tril()
        return q, k, v, grad, mask.contiguous()  # materialised, as HF does
    if mask_kind is not None:
        # Padding: the last quarter of the keys of every other sequence is padding.
        pad = torch.ones(b, 1, 1, s, device=DEVICE, dtype=torch.bool)
        pad[::2, ..., s - s // 4:] = False
        mask = pad if mask_kind == "bool" else torch.zeros(b, 1, 1, s, device=DEVICE, dtype=DTYPE).masked_fill(
            ~pad, torch.finfo(DTYPE).min)
    return q, k, v, grad, mask


def attention_fn(method, q, k, v, mask, p, causal, block):
    scale = 1.0 / math.sqrt(q.shape[-1])
    if method in ("sparsedrop_2pass", "sparsedrop_notma", "sparsedrop_atomic", "sparsedrop_noclass"):
        return lambda: sparse_dropout_attention(q, k, v, mask, p=p, is_causal=causal, block=block)
    if method == "sparsedrop_dropkey":
        return lambda: sparse_dropout_attention(q, k, v, mask, p=p, is_causal=causal, block=block, mode="dropkey")
    if method == "sparsedrop_dense":
        # Every tile kept, no scaling: the kernels' dense efficiency, comparable to sdpa_p0.
        keep = torch.ones(fa.attention_keep_shape(q.shape, k.shape, block), device=DEVICE, dtype=torch.bool)
        return lambda: torch.ops.sparsedrop.attention(q, k, v, mask, keep, 0.0, causal, None, False, block[0], block[1],
                                                      "post_softmax", "triton")
    if method == "sdpa_p":
        return lambda: F.scaled_dot_product_attention(q, k, v, mask, dropout_p=p, is_causal=causal)
    if method == "sdpa_p0":
        return lambda: F.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.0, is_causal=causal)
    if method == "eager":
        def eager():
            s = torch.matmul(q, k.transpose(-1, -2)) * scale
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
            if causal:
                n = q.shape[-2]
                s = s.masked_fill(torch.ones(n, n, device=DEVICE, dtype=torch.bool).triu(1), float("-inf"))
            prob = torch.softmax(s, -1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(F.dropout(prob, p, training=True), v)
        return eager
    raise ValueError(method)


@contextlib.contextmanager
def _env(name, value):
    """os.environ[name] = value inside (None: left as it is), restored after."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _tma_off(fn):
    """fn run with TMA descriptors off (SPARSEDROP_TMA=0, read when kernels launch)."""
    def run():
        with _env("SPARSEDROP_TMA", "0"):
            return fn()
    return run


@contextlib.contextmanager
def backward_strategy(method, head_dim):
    """Run the sparsedrop_<strategy> methods with that backward (read when kernels launch), and
    sparsedrop_notma with the default backward and TMA off."""
    from sparsedrop_compile.kernels import flash_attention_triton as fat

    saved = dict(fat.BACKWARD_STRATEGY)
    saved_classify = fat.CLASSIFY_MASK_TILES
    cls = fat.head_dim_class(head_dim)  # the tables are keyed by head-dim class
    if method in ("sparsedrop_2pass", "sparsedrop_noclass"):
        fat.BACKWARD_STRATEGY[cls] = "two_pass"
    elif method == "sparsedrop_atomic":
        fat.BACKWARD_STRATEGY[cls] = "atomic"
    if method == "sparsedrop_noclass":
        fat.CLASSIFY_MASK_TILES = False
    try:
        with _env("SPARSEDROP_TMA", "0" if method == "sparsedrop_notma" else None):
            yield fat.BACKWARD_STRATEGY[cls]
    finally:
        fat.BACKWARD_STRATEGY.update(saved)
        fat.CLASSIFY_MASK_TILES = saved_classify


def fwd_bwd(fwd, q, k, v, grad):
    def step():
        out = fwd()
        return torch.autograd.grad(out, (q, k, v), grad)
    return step


def fwd_only(fwd):
    def step():
        with torch.no_grad():
            return fwd()
    return step


# --------------------------------------------------------------------------- main benchmark
def env_info():
    info = harness.environment(DEVICE, ("torch", "triton"), cpu="cpu-interpreter")
    return info, harness.slug(info["gpu"])


def run_benchmark(args) -> list[dict]:
    from sparsedrop_compile.kernels.flash_attention_triton import DEFAULT_BLOCK

    block = tuple(args.block) if args.block else DEFAULT_BLOCK
    info, _ = env_info()
    ps = [0.1] if args.quick else [0.1, 0.3, 0.5]
    reps = 30 if args.quick else 100
    rows = []
    shapes = SMOKE_SHAPES if DEVICE == "cpu" else SHAPES
    if args.only:
        shapes = [sh for sh in shapes if any(o in sh[0] for o in args.only)]
    for name, b, h, s, d, causal, mask_kind in shapes:
        q, k, v, grad, mask = make_inputs(b, h, s, d, mask_kind)
        hf = mask_kind in HF_MASK_KINDS
        for p in (ps[:1] if hf else ps):
            for method in (HF_METHODS if hf else METHODS[:-1]):
                if p != ps[0] and method in ("sdpa_p0", "sparsedrop_dense"):
                    continue  # no dropout: the same for every p
                row = {**info, "shape": name, "batch": b, "heads": h, "seq": s, "head_dim": d, "causal": causal,
                       "mask": mask_kind or "none", "p": p, "method": method, "block": f"{block[0]}x{block[1]}"}
                try:
                    fwd = attention_fn(method, q, k, v, mask, p, causal, block)
                    with backward_strategy(method, d) as strategy:
                        if method.startswith("sparsedrop"):
                            row["backward"] = strategy
                        row["median_ms"], row["timer"] = timed(fwd_bwd(fwd, q, k, v, grad), reps)
                        row["fwd_ms"], _ = timed(fwd_only(fwd), reps)
                except Exception as exc:  # noqa: BLE001 - one failing method must not end the run
                    row["median_ms"], row["fwd_ms"], row["timer"] = float("nan"), float("nan"), "failed"
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    print(f"  {name} p={p} {method}: FAILED {row['error']}")
                    if args.verbose:
                        traceback.print_exc()
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                harness.write_csv(args.csv_path, rows)  # after every row: a run cut short keeps its data
                print(f"  {name:24s} p={p:.1f} {method:20s} {row['median_ms']:8.3f} ms (fwd {row['fwd_ms']:.3f})",
                      flush=True)
    # Ratios against SDPA at the same p and at p = 0, from the same run.
    by_key = {(r["shape"], r["p"], r["method"]): r["median_ms"] for r in rows}
    for r in rows:
        sdpa_p = by_key.get((r["shape"], r["p"], "sdpa_p"), float("nan"))
        sdpa_0 = by_key.get((r["shape"], ps[0], "sdpa_p0"), float("nan"))
        r["speedup_vs_sdpa_p"] = sdpa_p / r["median_ms"] if r["median_ms"] == r["median_ms"] else float("nan")
        r["speedup_vs_sdpa_p0"] = sdpa_0 / r["median_ms"] if r["median_ms"] == r["median_ms"] else float("nan")
    return rows


def plot(rows, path: Path, title: str):
    plt = harness.pyplot()
    if plt is None:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in rows if r["shape"] == shape]
        for method, style in (("sparsedrop_2pass", "o-"), ("sparsedrop_notma", "o:"), ("sparsedrop_atomic", "d-"),
                              ("sparsedrop_dropkey", "^-"),
                              ("sparsedrop_noclass", "v-"), ("sdpa_p", "s-"), ("eager", "x-")):
            pts = sorted((r["p"], r["median_ms"]) for r in sub if r["method"] == method)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=method)
        for method, ls in (("sdpa_p0", "--"), ("sparsedrop_dense", ":")):
            base = [r["median_ms"] for r in sub if r["method"] == method]
            if base and base[0] == base[0]:
                ax.axhline(base[0], ls=ls, color="gray" if method == "sdpa_p0" else "tab:blue", label=f"{method} (p=0)")
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("dropout p")
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    harness.save_figure(fig, path)
    print(f"plot: {path}")


def print_table(rows):
    print("\nfwd+bwd median ms (speedup vs SDPA at the same p / vs SDPA at p=0)")
    print(f"{'shape':24s} {'p':>4s} {'method':20s} {'ms':>8s} {'fwd ms':>8s} {'x sdpa_p':>9s} {'x sdpa_0':>9s}")
    for r in rows:
        print(f"{r['shape']:24s} {r['p']:4.1f} {r['method']:20s} {r['median_ms']:8.3f} {r['fwd_ms']:8.3f} "
              f"{r['speedup_vs_sdpa_p']:9.2f} {r['speedup_vs_sdpa_p0']:9.2f}")


# --------------------------------------------------------------------------- config sweep
def _as_tuple(row) -> tuple:
    """A sweep row's config as the candidate table writes it."""
    return (row["BLOCK_M"], row["BLOCK_N"], row["num_warps"], row["num_stages"], row["skip_mode"])


def neighbours(config: tuple) -> list[tuple]:
    """The configs one step from ``config`` (the table's tuple form): the other warp count (4 or
    8), each other stage count from 1 to 3, and each tile side halved or doubled within 16-128.
    The sweep's ``--neighbours`` times them around its two fastest, so that a table that never
    listed the best tile cannot hide it (session 18: the head-dim-128 backward's 4-warp 64 x 64
    tiles, 13 % of the whole op, were in no table)."""
    m, n, warps, stages, skip = config
    out = [(m, n, 8 if warps == 4 else 4, stages, skip)]
    out += [(m, n, warps, st, skip) for st in (1, 2, 3) if st != stages]
    out += [(side, n, warps, stages, skip) for side in (m // 2, m * 2) if 16 <= side <= 128]
    out += [(m, side, warps, stages, skip) for side in (n // 2, n * 2) if 16 <= side <= 128]
    return out


def run_sweep(args) -> list[dict]:
    """Time every candidate kernel config, pass by pass, and report the best per mask tile."""
    from sparsedrop_compile.kernels import flash_attention_triton as fat

    info, _ = env_info()
    rows = []
    mask_tiles = [(64, 64), (128, 64), (64, 128), (128, 128), (256, 128), (128, 256)]
    for spec in args.sweep_shape:
        parts = spec.split(",")
        b, h, s, d = (int(x) for x in parts[:4])
        causal = "causal" in parts[4:]
        # the last quarter of every other sequence's keys padded: "keypad" as an expanded (B, 1, 1, S) bool
        # mask, "hfpad" materialised (B, 1, S, S) as HF builds it ("hfcausalpad": and the causal mask in it),
        # "floatpad" additive (B, 1, 1, S)
        masks = {"keypad": "bool", "hfpad": "bool_full_pad", "hfcausalpad": "bool_full_causal_pad",
                 "floatpad": "float"}
        mask_kind = next((masks[x] for x in parts[4:] if x in masks), None)
        q, k, v, grad, mask = make_inputs(b, h, s, d, mask_kind)
        q, k, v = (t.detach() for t in (q, k, v))
        torch.manual_seed(1)
        # Every candidate tile divides 128 x 128, so one keep (at the sweep's p) times them all;
        # the fraction of dropped work is p whatever the mask tile.
        block = (128, 128)
        keep = fa.sample_attention_keep(q, k, args.sweep_p, *block)
        pb = fat._Problem(q, k, v, mask, keep, args.sweep_p, causal, None, False, block, "post_softmax")
        ref_out, ref_lse = fa.reference_attention_forward(q, k, v, mask, keep, args.sweep_p, causal, None, False, block,
                                                          "post_softmax")
        shape = f"{b}x{h}x{s}x{d}" + ("-causal" if causal else "") + "".join(f"-{x}" for x in parts[4:] if x in masks)
        print(f"\nsweep {shape} p={args.sweep_p} bf16 (each config checked against the reference)")

        def bench(fn):
            # One pass is a few kernels of 0.02-2 ms: launched eagerly (through wrap_triton, a few
            # hundred microseconds of Python each) the host, not the GPU, would set the time of
            # the short ones. A captured CUDA graph's replay times the GPU alone.
            if DEVICE == "cpu":
                return time_wall(fn, 1)
            return time_graph(fn, 30)

        def record(kind, cfg, fn, check):
            row = {**info, "shape": shape, "pass": kind, "BLOCK_M": cfg.tile_m, "BLOCK_N": cfg.tile_n,
                   "num_warps": cfg.warps, "num_stages": cfg.stages, "skip_mode": cfg.skip}
            t0 = time.time()
            try:
                result = fn()
                row["max_err"] = check(result)
                row["median_ms"] = bench(fn)
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile is data too
                row["median_ms"], row["max_err"] = float("nan"), float("nan")
                row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            row["wall_s"] = round(time.time() - t0, 1)
            rows.append(row)
            harness.write_csv(args.csv_path, rows)  # after every config: a run cut short keeps its data
            flag = "" if row["max_err"] < 0.05 else "  <-- WRONG RESULT"
            print(f"  {kind:6s} {str(_as_tuple(row)):24s} {row['median_ms']:8.4f} ms  err {row['max_err']:.2e}  "
                  f"({row['wall_s']} s){flag}{'  ' + row.get('error', '') if 'error' in row else ''}", flush=True)
            return row

        out, lse = fat._launch_forward(pb, fat._pick_config("fwd", d, block))
        delta = fat._launch_delta(pb, out, grad)
        ref_dq, ref_dk, ref_dv, _ = fa.reference_attention_backward(grad, q, k, v, mask, keep, args.sweep_p, causal,
                                                                    None, False, block, "post_softmax", False)
        err = lambda a, b: (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)  # noqa: E731
        passes = {
            "fwd": (lambda cfg: (lambda: fat._launch_forward(pb, cfg)), lambda r: err(r[0], ref_out)),
            "bwd_kv": (lambda cfg: (lambda: fat._launch_dkdv(pb, grad, lse, delta, cfg)),
                       lambda r: max(err(r[0], ref_dk), err(r[1], ref_dv))),
            "bwd_q": (lambda cfg: (lambda: fat._launch_dq(pb, grad, lse, delta, cfg, False)), lambda r: err(r[0], ref_dq)),
            # The single-pass backward: dK, dV and (atomically) dQ in one kernel.
            "bwd_fused": (lambda cfg: (lambda: fat._launch_dkdv(pb, grad, lse, delta, cfg, atomic_dq=True)),
                          lambda r: max(err(r[0], ref_dk), err(r[1], ref_dv), err(r[2], ref_dq))),
        }
        if runtime.tma_enabled(q.device):
            # Where TMA runs (K and V through descriptors in the forward and the dQ pass, the
            # single pass's dQ adds as bulk reductions), those passes also with TMA off beside
            # them: pointer loads and element atomics (SPARSEDROP_TMA=0 while it is launched and
            # captured). The dK/dV pass takes no TMA, so it is timed once.
            for kind in ("fwd", "bwd_q", "bwd_fused"):
                make, check = passes[kind]
                passes[kind + "_ptr"] = (lambda cfg, make=make: _tma_off(make(cfg)), check)
        if args.passes:
            passes = {kind: entry for kind, entry in passes.items() if kind in args.passes}
        best = {}
        for kind, (make, check) in passes.items():
            # Tiles under 32 x 32 are there for small mask tiles, not speed: not timed.
            # (The 256 class's first dQ and single-pass tiles, 32 x 16, are under it: time them.)
            table = fat.CANDIDATES[kind.removesuffix("_ptr")][fat.head_dim_class(d)]
            timed_rows = [record(kind, cfg, make(cfg), check) for cfg in table
                          if cfg.tile_m * cfg.tile_n >= 32 * 32 or fat.head_dim_class(d) == 256]
            seen = {_as_tuple(r) for r in timed_rows}

            def fastest_two():
                return sorted((r for r in timed_rows if r["median_ms"] == r["median_ms"] and r["max_err"] < 0.05),
                              key=lambda r: r["median_ms"])[:2]

            def time_new(configs):
                for tried in configs:
                    if tried not in seen:
                        seen.add(tried)
                        timed_rows.append(record(kind, fat.as_config(tried), make(fat.as_config(tried)), check))

            for r in fastest_two():  # the other ways of skipping a tile, on the two fastest tiles
                time_new([(*_as_tuple(r)[:4], skip) for skip in (fat.SKIP_PREFETCH, fat.SKIP_LAZY_LOAD, fat.SKIP_NONE)])
            if args.neighbours:  # one step from the two fastest, whatever the table lists
                for r in fastest_two():
                    time_new(neighbours(_as_tuple(r)))
            best[kind] = [r for r in timed_rows if r["median_ms"] == r["median_ms"] and r["max_err"] < 0.05]
        t_delta = bench(lambda: fat._launch_delta(pb, out, grad))
        if not args.passes or "fwd_hopper" in args.passes:
            hopper_sweep(pb, d, causal, args, info, shape, rows, bench, lambda r: err(r[0], ref_out))

        # Baselines at the same shape, fwd+bwd, for scale.
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        base = {}
        for name, pp in (("sdpa_p", args.sweep_p), ("sdpa_p0", 0.0)):
            fn = fwd_bwd(lambda pp=pp: F.scaled_dot_product_attention(qg, kg, vg, mask, dropout_p=pp,
                                                                  is_causal=causal),
                         qg, kg, vg, grad)
            base[name], _ = timed(fn, 50)

        print(f"\n  best per mask tile (fwd + delta {t_delta:.4f} + bwd_kv + bwd_q kernel time; "
              f"SDPA fwd+bwd: p={args.sweep_p} {base['sdpa_p']:.3f} ms, p=0 {base['sdpa_p0']:.3f} ms)")
        for tile in mask_tiles:
            picks = {}
            for kind in passes:
                fit = [r for r in best[kind] if tile[0] % r["BLOCK_M"] == 0 and tile[1] % r["BLOCK_N"] == 0]
                picks[kind] = min(fit, key=lambda r: r["median_ms"]) if fit else None
            for strategy, kinds in (("two_pass", ("fwd", "bwd_kv", "bwd_q")), ("atomic", ("fwd", "bwd_fused")),
                                    ("two_pass_ptr", ("fwd_ptr", "bwd_kv", "bwd_q_ptr")),
                                    ("atomic_ptr", ("fwd_ptr", "bwd_fused_ptr"))):
                if any(picks.get(kind) is None for kind in kinds):
                    continue
                total = t_delta + sum(picks[kind]["median_ms"] for kind in kinds)
                cfgs = {kind: (picks[kind]["BLOCK_M"], picks[kind]["BLOCK_N"], picks[kind]["num_warps"],
                               picks[kind]["num_stages"], picks[kind]["skip_mode"]) for kind in kinds}
                rows.append({**info, "shape": shape, "pass": f"total_{strategy}", "mask_tile": f"{tile[0]}x{tile[1]}",
                             "median_ms": total, "configs": str(cfgs)})
                print(f"  mask tile {tile[0]:3d}x{tile[1]:<3d} {strategy:8s}: {total:.4f} ms "
                      f"(x{base['sdpa_p'] / total:.2f} vs SDPA p, x{base['sdpa_p0'] / total:.2f} vs SDPA p=0)  {cfgs}")
        print(f"\n  to adopt: put each pass's winner first in _CANDIDATE_TABLE[...][{fat.head_dim_class(d)}] and the faster "
              f"strategy in BACKWARD_STRATEGY[{fat.head_dim_class(d)}] in kernels/flash_attention_configs.py")
    return rows


def hopper_sweep(pb, d, causal, args, info, shape, rows, bench, check):
    """The Gluon Hopper forward's configs (``flash_attention_hopper``), where it serves this
    problem: its candidates and the 128-row tiles over two warpgroups, timed like the passes
    above (pass "fwd_hopper"; BLOCK_M / BLOCK_N / num_warps / num_stages as its config writes them)."""
    from sparsedrop_compile.kernels import flash_attention_hopper as hopper
    from sparsedrop_compile.kernels import flash_attention_triton as fat

    reason = hopper.unsupported_reason(pb.q, pb.k, pb.v, pb.mask_input, False, pb.block)
    if reason is not None:
        print(f"  fwd_hopper: not timed ({reason})")
        return
    for cfg in hopper.CANDIDATES[d] + [hopper.FwdConfig(128, 128, 2, 8), hopper.FwdConfig(128, 64, 3, 8)]:
        fn = lambda cfg=cfg: fat.attention_forward(pb.q, pb.k, pb.v, None, pb.keep, args.sweep_p, causal, None,  # noqa: E731
                                                   False, pb.block, "post_softmax", {"fwd_hopper": cfg})
        row = {**info, "shape": shape, "pass": "fwd_hopper", "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
               "num_warps": cfg.warps, "num_stages": cfg.stages}
        try:
            row["max_err"] = check(fn())
            row["median_ms"] = bench(fn)
        except Exception as exc:  # noqa: BLE001 - a config that fails to compile is data too
            row["median_ms"], row["max_err"] = float("nan"), float("nan")
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        rows.append(row)
        harness.write_csv(args.csv_path, rows)
        print(f"  fwd_hopper {cfg}: {row['median_ms']:8.4f} ms  err {row['max_err']:.2e}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the CSV and plot")
    parser.add_argument("--quick", action="store_true", help="p = 0.1 only, fewer repetitions")
    parser.add_argument("--block", type=int, nargs=2, metavar=("BQ", "BK"), help="mask tile (default: the kernels')")
    parser.add_argument("--sweep", action="store_true", help="time the kernel's candidate configs instead")
    parser.add_argument("--sweep-shape", action="append", default=None,
                        help="B,H,S,D[,causal][,keypad|hfpad|hfcausalpad|floatpad] for --sweep; repeatable "
                             "(default 8,16,1024,64)")
    parser.add_argument("--sweep-p", type=float, default=0.1)
    parser.add_argument("--neighbours", action="store_true",
                        help="with --sweep, also time the configs one step from each pass's two fastest (warps, "
                             "stages, tile sides): about twice the sweep's time")
    parser.add_argument("--passes", nargs="+", default=None,
                        choices=["fwd", "bwd_kv", "bwd_q", "bwd_fused", "fwd_ptr", "bwd_q_ptr", "bwd_fused_ptr",
                                 "fwd_hopper"],
                        help="with --sweep, time only these passes (default: all)")
    parser.add_argument("--only", nargs="+", default=None, help="run only shapes whose name contains one of these")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="check the script on CPU (interpreter, tiny shapes)")
    args = parser.parse_args(argv)
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
        args.quick = True
        args.sweep_shape = args.sweep_shape or ["1,2,256,64"]
    elif not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU (it times kernels); --smoke checks it on CPU")
    args.sweep_shape = args.sweep_shape or ["8,16,1024,64"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info, slug = env_info()
    print(f"{info['gpu']}  torch {info['torch']}  triton {info['triton']}")
    if args.sweep:
        args.csv_path = path = out_dir / f"attention_sweep_{slug}.csv"
        rows = run_sweep(args)
        harness.write_csv(path, rows)
        print(f"\nsweep results: {path}")
        return
    args.csv_path = path = out_dir / f"attention_{slug}.csv"
    rows = run_benchmark(args)
    harness.write_csv(path, rows)
    plot(rows, out_dir / f"attention_{slug}.png", f"{info['gpu']}, torch {info['torch']}, triton {info['triton']}, bf16")
    print(f"results: {path}")
    print_table(rows)


if __name__ == "__main__":
    main()

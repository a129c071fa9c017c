"""One training step of base-size HF models: backend="sparsedrop" vs backend="inductor" (Fig. 4).

Question: at dropout p, how long does one training step (forward, backward, AdamW step, bf16
autocast) of T5 / BERT / GPT-2 take when torch.compile uses the sparsedrop backend instead of
plain Inductor, and how much GPU memory does it need at its peak?

    python benchmarks/bench_model.py                  # all models, p in 0.1 0 0.5 0.3 0.2, stops at --budget-min
    python benchmarks/bench_model.py --resume         # run only the pairs the CSV does not hold yet
    python benchmarks/bench_model.py --models bert --ps 0.1   # re-measure one pair, keep the other rows
    python benchmarks/bench_model.py --smoke          # CPU check of this script (tiny models, aot_eager)
    python benchmarks/bench_model.py --mode reduce-overhead   # both backends with CUDA graphs: model_<gpu>_reduce-overhead.csv
    python benchmarks/bench_model.py --gpus 4 --resume         # the pairs split over 4 GPUs, one child process each

Models come from config classes (build_model(family, size="base", attn="sdpa", dropout=p)):
T5 6+6 layers, BERT-base and GPT-2 small, all d_model 768, d_ff 3072, 12 heads. Their default
dropout is 0.1 everywhere, so "default" and p = 0.1 are the same run; any other p is applied to
every dropout. For each (model, p) both backends run in this one process, each on a model
rebuilt from the same seed, with the same batch, after torch._dynamo.reset().

Timing: the first --warmup steps (which compile) are excluded; the next --steps are timed with
CUDA events and the median is reported. In the default mode both backends' models are compiled
and warmed up first, then the timed steps run in --rounds alternating rounds (the order flips
each round): a host-bound step (small batches) moves with the host's speed, which drifts over
minutes, so timing one backend after the other compared two different hosts (BERT at 16 x 128
read 31.8, 36.4 and 40.4 ms for three variants in the order they ran). --sequential times them
one after the other, as --mode reduce-overhead always does; the CSV's timing column says which.
Peak memory is a run's resident memory (weights, gradients, AdamW state; both backends hold the
same amount) plus the most its timed steps allocated on top of it (sequential: simply
torch.cuda.max_memory_allocated over the timed steps).

Compiling a base-size model takes about a minute per backend, so a full sweep does not fit in
one short job: (model, p) pairs run headline-first (every model at p = 0.1, then the other p),
a pair is not started when it would end past --budget-min, and --resume fills in the rest. Runs
with the same settings add up in one CSV (--fresh starts a new one); the CSV and plots are
rewritten after every pair, so a killed run still leaves its data.

--mode reduce-overhead compiles both backends with Inductor's CUDA graphs (the baseline with
torch.compile(mode=...), sparsedrop with options["mode"]); AdamW stays outside the compiled model
either way. Its results go to files named model_<gpu>_reduce-overhead*, so the default-mode files
are left alone.

--gpus N runs N child processes of this script, one per GPU (CUDA_VISIBLE_DEVICES), each on its
share of the (model, p) pairs (balanced by a guess of each model's time) and with its own
--out/gpu<i> folder and log.txt; --budget-min applies to each child. When they end (or on
SIGTERM / Ctrl-C, after stopping them) the parent merges their CSVs into the one in --out,
rewrites the plots and prints the table. Each pair runs in one child, so both rows of a speed-up
always come from the same GPU. The children share the host: a file lock keeps any child's compile
(shared) out of another's timed steps (exclusive), since a host-bound model slows while others
compile beside it.

Writes to --out (default benchmarks/results): model_<gpu>.csv, model_<gpu>_time.png,
model_<gpu>_memory.png and model_<gpu>_sites_<model>.txt (explain() of each model at p = 0.1);
with a non-default --mode, <gpu> is followed by _<mode> in every name.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

T0 = time.perf_counter()  # the budget counts the imports too
import traceback
import warnings
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import sparsedrop_compile as sd  # noqa: E402  (registers the backend and its ops)
from sparsedrop_compile import harness
from sparsedrop_compile.harness import time_calls, train_step
from sparsedrop_compile.models import build_model, example_batch  # noqa: E402

import ideal_speedup as ideal  # noqa: E402  (beside this script: on sys.path as distributed.py imports it too)
from model_results import (  # noqa: F401  (beside this script; distributed.py reads some through bench_model)
    BACKENDS,
    DEFAULT_P,
    FIELDS,
    MODELS,
    SETTING_KEYS,
    TEXT_FIELDS,
    find,
    fmt,
    log,
    ok,
    plot,
    print_table,
    put,
    read_rows,
    set_ratios,
    short,
    write_rows,
)

# Headline first, then the end points, so a run cut by the budget still shows the trend.
DEFAULT_PS = (0.1, 0.0, 0.5, 0.3, 0.2)
TARGET_STEP_MS = 50.0
MODES = ("default", "reduce-overhead")  # Inductor's compile mode, the same for both backends
# Seconds per (model, p) pair on one H200 (both backends, compiles included; measured): --gpus
# balances the children's shares with these.
PAIR_COST_S = {"t5": 100.0, "gpt2": 70.0, "bert": 70.0}

# (batch, seq, decoder seq) per model. Sized from FLOPs so an Inductor step takes >= 50 ms on an
# H100 (~350-450 TFLOP/s reached at d_model 768): T5 ~13 TFLOP, BERT ~23, GPT-2 ~21 per step;
# the smaller batches one might guess (T5 16, BERT 32, GPT-2 16) give ~15-45 ms. Peak memory
# stays around 20-35 GB, far below 78 GB.
SHAPES = {"t5": (64, 512, 128), "bert": (64, 512, None), "gpt2": (24, 1024, None)}
SMOKE_SHAPES = {"t5": (2, 96, 64), "bert": (2, 96, None), "gpt2": (2, 96, None)}  # 96: not a multiple of the 64-wide attention tile

# --------------------------------------------------------------------------- environment
def env_info(device: str) -> tuple[dict, str]:
    info = harness.environment(device, ("torch", "transformers", "triton", "cuda"), cpu="cpu-smoke")
    return info, harness.slug(info["gpu"])


def file_stem(slug: str, mode: str) -> str:
    """model_<gpu>, or model_<gpu>_<mode> for a non-default mode: each mode has its own CSV and plots."""
    return f"model_{slug}" + ("" if mode == "default" else f"_{mode}")


# --gpus children share one host. A timed step of a model near the host-bound limit (T5 at
# 64 x 512) slows down when another child compiles beside it (T5 at p = 0.1 read 0.89x instead of
# 1.07x once, its fastest step unchanged), so compiles and timed phases exclude each other: a
# child compiles under a shared lock and times under an exclusive one.
HOST_LOCK_ENV = "SPARSEDROP_BENCH_HOST_LOCK"


@contextlib.contextmanager
def host_phase(exclusive: bool):
    """Hold the children's host lock (shared to compile, exclusive to time); no-op outside --gpus."""
    path = os.environ.get(HOST_LOCK_ENV)
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- models and batches
def make_model(name: str, p: float, args, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    try:
        # Built directly on the device: initialising 110-125M parameters on the host takes seconds.
        with torch.device(args.device):
            model = build_model(name, size=args.size, attn="sdpa", dropout=p).to(args.device)
    except Exception:  # noqa: BLE001 - a library version that dislikes a default device: build on the host
        torch.manual_seed(seed)
        model = build_model(name, size=args.size, attn="sdpa", dropout=p).to(args.device)
    return model.train()


def make_batch(model: torch.nn.Module, name: str, shape: tuple, args, seed: int) -> dict[str, torch.Tensor]:
    batch_size, seq, dec_seq = shape
    batch = example_batch(model, batch=batch_size, seq=seq, device=args.device, seed=seed)
    if dec_seq is not None:
        # example_batch gives seq // 2 decoder tokens; the benchmark sets the decoder length itself.
        gen = torch.Generator().manual_seed(seed + 1)
        batch["labels"] = torch.randint(1, model.config.vocab_size, (batch_size, dec_seq), generator=gen).to(args.device)
    return batch


def shape_str(shape: tuple) -> str:
    batch_size, seq, dec_seq = shape
    return f"{batch_size}x{seq}" + (f"/{dec_seq}" if dec_seq else "")


def sparsedrop_options(args) -> dict:
    return {"block_size": args.block_size, "inner": args.inner}


# --------------------------------------------------------------------------- explain
def explain_model(name: str, shape: tuple, args, out_dir: Path, stem: str) -> tuple[dict, sd.ExplainReport]:
    """Sites rewritten / total at the default p, as CSV fields, and the report; the full table
    goes to a text file."""
    model = make_model(name, DEFAULT_P, args, args.seed)
    batch = make_batch(model, name, shape, args, args.seed)
    # No "inner": explain then runs the rewritten graph eagerly; the decisions are the same.
    options = {"block_size": args.block_size}
    try:
        with host_phase(exclusive=False), harness.bf16_autocast(args.device):  # it traces: host work like a compile
            report = sd.explain(model, **batch, options=options)
    finally:
        del model, batch
        free_memory(args.device)
    done = Counter(s.kind for s in report.rewritten)
    why = Counter(s.reason or "?" for s in report.skipped)
    detail = "rewritten: " + (", ".join(f"{k} {n}" for k, n in sorted(done.items())) or "none")
    if why:
        detail += "; left: " + ", ".join(f"{n} {r}" for r, n in why.most_common())
    path = out_dir / f"{stem}_sites_{name}.txt"
    path.write_text(f"{name} (size={args.size}, p={DEFAULT_P}, block_size={args.block_size}, batch {shape_str(shape)})\n"
                    f"{report}\n")
    log(f"  explain {name}: {len(report.rewritten)}/{len(report.sites)} dropout sites rewritten ({detail}); table: {path}")
    return {"sites_rewritten": len(report.rewritten), "sites_total": len(report.sites), "sites_detail": detail}, report


def flops_by_module(name: str, shape: tuple, args) -> tuple[dict[str, int], dict[str, int]]:
    """Matmul and attention FLOPs of one eager forward + backward, per module (ideal_speedup.py)."""
    model = make_model(name, DEFAULT_P, args, args.seed)
    batch = make_batch(model, name, shape, args, args.seed)
    try:
        with harness.bf16_autocast(args.device):
            return ideal.module_flops(model, lambda: model(**batch).loss.backward())
    finally:
        del model, batch
        free_memory(args.device)


def set_ideal(rows: list[dict], model: str, p: float, sd_row: dict, report, flops) -> None:
    """The sparsedrop row's skipped shares (from explain's sites at p) and ideal speed-up, from
    the Inductor rows of the same model: at p (step, kernel times) and at p = 0 if measured."""
    base = find(rows, model, p, "inductor")
    if report is None or flops is None or not (ok(base) and base.get("matmul_ms") is not None):
        return
    mm_share, attn_share = ideal.skipped_shares(report.sites, p, *flops)
    sd_row.update(matmul_skip_share=round(mm_share, 4), attention_skip_share=round(attn_share, 4))
    p0 = find(rows, model, 0.0, "inductor")
    if p == 0:
        t_base, basis = float(base["median_ms"]), "p = 0: nothing to skip"
    elif ok(p0):
        t_base, basis = float(p0["median_ms"]), "inductor p=0 step"
    else:
        t_base, basis = float(base["median_ms"]), "inductor step at p (dropout work not subtracted)"
    sd_row["ideal_speedup"] = round(ideal.ideal_speedup(float(base["median_ms"]), t_base, float(base["matmul_ms"]),
                                                        float(base["attention_ms"]), mm_share, attn_share), 3)
    sd_row["ideal_basis"] = basis


def timed_steps(step, args, cudagraphs: bool, row: dict) -> tuple[list[float], list[torch.Tensor]]:
    """Run args.steps timed steps: (step times in ms, losses); GPU memory fields go into row."""
    if args.device == "cuda":
        row["base_mem_mb"] = round(torch.cuda.memory_allocated() / 2**20)
        torch.cuda.reset_peak_memory_stats()
    times, losses = time_calls(step, args.steps, args.device)  # CUDA events on the GPU
    if args.device == "cuda" and not cudagraphs:
        # Under CUDA graphs the replays allocate nothing (their buffers were taken from the
        # graphs' private pool while recording), so a peak over replayed steps would leave
        # the activations out (2-3 GB read for T5/BERT/GPT-2 on an H200): no figure at all.
        row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return times, losses


# --------------------------------------------------------------------------- compile time
def compile_phases() -> dict[str, float]:
    """Seconds spent so far in each timed phase of torch.compile (torch._dynamo's own counters,
    cumulative per process; the backend adds sparsedrop.run_passes)."""
    return {k: sum(v) for k, v in torch._dynamo.utils.compilation_time_metrics.items()}


def log_compile_phases(backend: str, before: dict[str, float], top: int = 12) -> None:
    """Where the first step's compile went: the phases that grew most since ``before`` (nested
    phases overlap, so they do not add up)."""
    grown = sorted(((v - before.get(k, 0.0), k) for k, v in compile_phases().items()), reverse=True)
    log(f"  compile phases ({backend}, s): " + ", ".join(f"{k} {s:.1f}" for s, k in grown[:top] if s >= 0.05))


# --------------------------------------------------------------------------- one timed run
def prepare_training(name: str, backend: str, p: float, shape: tuple, args) -> tuple:
    """Build a fresh model, compile it with ``backend`` and run the warm-up steps.
    Returns (step, row, first loss, objects to keep alive while timing)."""
    device = args.device
    mem_before = torch.cuda.memory_allocated() if device == "cuda" else 0
    model = make_model(name, p, args, args.seed)
    params_m = sum(t.numel() for t in model.parameters()) / 1e6
    batch = make_batch(model, name, shape, args, args.seed)
    # fused AdamW: one kernel per step, the same for both backends, so the optimizer does not blur the comparison.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device == "cuda" else {}))
    cudagraphs = args.mode == "reduce-overhead"
    # The default mode compiles exactly as before the --mode option, so its rows stay comparable.
    # torch.compile refuses mode= together with options=, so sparsedrop takes its mode in options.
    mode_kw = {} if args.mode == "default" else {"mode": args.mode}
    if backend == "sparsedrop":
        compiled = torch.compile(model, backend="sparsedrop", options={**sparsedrop_options(args), **mode_kw})
    else:
        compiled = torch.compile(model, backend=args.baseline, **mode_kw)

    def step() -> torch.Tensor:
        # bf16 autocast, fwd + bwd + AdamW; under CUDA graphs each step marks a new iteration.
        loss = train_step(lambda: compiled(**batch).loss, opt, autocast=device, cudagraphs=cudagraphs)
        # A CUDA-graph output lives in the graph's memory pool, which the next replay overwrites;
        # the copy keeps the recorded loss. Without CUDA graphs no copy, as before.
        return loss.clone() if cudagraphs else loss

    row = {"params_m": round(params_m, 1)}
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # the counters outlive reset()
    skips_before = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    torch.manual_seed(args.seed)  # the same dropout draws for both backends where the masks match
    with host_phase(exclusive=False):
        phases_before = compile_phases()
        t0 = time.perf_counter()
        first = step()  # compiles forward and backward
        harness.sync(device)
        row["compile_s"] = round(time.perf_counter() - t0, 1)
        log_compile_phases(backend, phases_before)
        for _ in range(args.warmup - 1):  # kernel tuners and the allocator settle here
            step()
        harness.sync(device)
    row["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    if cudagraphs:  # a graph Inductor could not capture runs uncaptured, and the step times the host again
        skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips_before
        log(f"  CUDA graphs: {skips} graph(s) not captured" + (" (TORCH_LOGS=cudagraphs prints why)" if skips else ""))
    if device == "cuda":  # this run's resident memory: weights, gradients, AdamW state, caches
        row["base_mem_mb"] = round((torch.cuda.memory_allocated() - mem_before) / 2**20)
    return step, row, first, (compiled, opt, model, batch)


def kernel_fields(step, backend: str, device: str, row: dict) -> None:
    """GPU kernel time per step (both backends: a step far slower than it is host-bound), and
    the baseline's matmul and attention time (ideal_speedup.py)."""
    matmul_ms, attention_ms, row["gpu_ms"] = (round(t, 3) for t in ideal.kernel_ms(step, device))
    if backend != "sparsedrop":
        row["matmul_ms"], row["attention_ms"] = matmul_ms, attention_ms


def finish_row(row: dict, times: list[float], losses: list, first) -> dict:
    row.update(median_ms=round(statistics.median(times), 3), min_ms=round(min(times), 3), max_ms=round(max(times), 3),
               steps=len(times), loss_first=round(first.item(), 5), loss_last=round(losses[-1].item(), 5))
    return row


def time_training(name: str, backend: str, p: float, shape: tuple, args) -> dict:
    """Compile, warm up, then time args.steps training steps of a freshly built model."""
    device = args.device
    torch._dynamo.reset()
    free_memory(device)
    held = None
    try:
        step, row, first, held = prepare_training(name, backend, p, shape, args)
        with host_phase(exclusive=True):
            times, losses = timed_steps(step, args, args.mode == "reduce-overhead", row)
            kernel_fields(step, backend, device, row)
        return finish_row(row, times, losses, first)
    finally:
        del held
        torch._dynamo.reset()
        free_memory(device)


def time_pair_interleaved(name: str, p: float, shape: tuple, args) -> dict[str, dict]:
    """Both backends' rows, timed in alternating rounds: each backend's model is compiled and
    warmed up, then ``args.rounds`` rounds each time a share of the steps of one backend and
    then of the other (the order flips every round). A step that is bound by the host (small
    batches) moves with the host's speed, which drifts over minutes on a shared machine; run one
    after the other, the two backends would see different hosts. Peak memory: this backend's
    resident memory plus the most its steps allocated on top of everything resident."""
    device = args.device
    torch._dynamo.reset()
    free_memory(device)
    runs: dict[str, tuple] = {}
    try:
        for backend in BACKENDS:
            log(f"  {backend}: compiling ...")
            runs[backend] = prepare_training(name, backend, p, shape, args)
        times = {b: [] for b in BACKENDS}
        losses = {b: [] for b in BACKENDS}
        transient = dict.fromkeys(BACKENDS, 0)
        rounds = max(1, min(args.rounds, args.steps))
        with host_phase(exclusive=True):
            for r in range(rounds):
                n = args.steps // rounds + (1 if r < args.steps % rounds else 0)
                for backend in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
                    if device == "cuda":
                        torch.cuda.synchronize()
                        resident = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    t, out = time_calls(runs[backend][0], n, device)
                    if device == "cuda":
                        transient[backend] = max(transient[backend], torch.cuda.max_memory_allocated() - resident)
                    times[backend] += t
                    losses[backend] += out
            for backend in BACKENDS:
                kernel_fields(runs[backend][0], backend, device, runs[backend][1])
        rows = {}
        for backend, (_, row, first, _) in runs.items():
            if device == "cuda":
                row["peak_mem_mb"] = row["base_mem_mb"] + round(transient[backend] / 2**20)
            rows[backend] = finish_row(row, times[backend], losses[backend], first)
        return rows
    finally:
        runs.clear()
        torch._dynamo.reset()
        free_memory(device)


def failure(exc: Exception, model: str) -> str:
    """A failed run's error field (and its log lines)."""
    # Inductor may wrap an OOM raised while it compiles in its own exception type.
    oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
    error = f"out of memory; lower the batch (--{model}-batch)" if oom else f"{type(exc).__name__}: {short(exc)}"
    log(f"  FAILED: {error}")
    if not oom:
        log("".join(traceback.format_exc().splitlines(keepends=True)[-12:]))
    return error


# --------------------------------------------------------------------------- main loop
def settings(info: dict, args, model: str) -> dict:
    """The columns that make two rows one experiment (SETTING_KEYS among them)."""
    b, s, d = args.shapes[model]  # every model's, so rows of models not run now are judged too
    return {**info, "batch": b, "seq": s, "dec_seq": d, "compiler": args.inner, "mode": args.mode,
            "block_size": args.block_size}


def same_settings(row: dict, info: dict, args) -> bool:
    return row.get("model") in args.shapes and all(
        str(row.get(k)) == str(settings(info, args, row["model"])[k]) for k in SETTING_KEYS)


def load_rows(csv_path: Path, info: dict, args) -> list[dict]:
    """The rows of csv_path measured with the current settings; the file goes to .prev.csv if it holds others."""
    # Rows of earlier runs with the same settings stay in the file (so runs over subsets of models
    # and p add up to one figure); rows of other settings or versions would mix two experiments.
    existing = [] if args.fresh else read_rows(csv_path)
    rows = [r for r in existing if same_settings(r, info, args)]
    if csv_path.exists() and (args.fresh or len(rows) < len(existing)):
        prev = csv_path.with_name(csv_path.stem + ".prev.csv")
        csv_path.replace(prev)
        log(f"the previous {csv_path.name} is now {prev.name} ({len(existing) - len(rows) if not args.fresh else 'all'} "
            "row(s) of other settings or versions not carried over)")
    if rows:
        log(f"{len(rows)} row(s) of earlier runs with these settings kept in {csv_path.name}; "
            + ("pairs already measured are skipped (--resume)" if args.resume else "pairs run now replace theirs"))
    return rows


def planned_pairs(args, rows: list[dict]) -> list[tuple[str, float]]:
    """(model, p) pairs to run, in order; under --resume without those the rows already hold."""
    # p-major: every model's headline comes first. A --gpus child gets its share as --pairs.
    plan = args.pairs or [(m, p) for p in args.ps for m in args.models]
    return [(m, p) for m, p in plan if not (args.resume and all(ok(find(rows, m, p, b)) for b in BACKENDS))]


def plot_title(info: dict, args) -> str:
    return (f"{info['gpu']}, torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}; "
            f"bf16 autocast, block {args.block_size}, mode {args.mode}")


def run(args) -> int:
    device = args.device
    info, slug = env_info(device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = file_stem(slug, args.mode)
    csv_path = out_dir / f"{stem}.csv"
    shapes = args.shapes
    log(f"{info['gpu']}  torch {info['torch']}  transformers {info['transformers']}  triton {info['triton']}  "
        f"cuda {info['cuda']}")
    what = (f"pairs {' '.join(f'{m}:{p:g}' for m, p in args.pairs)}" if args.pairs
            else f"models {' '.join(args.models)}; p {' '.join(f'{p:g}' for p in args.ps)}")
    log(f"{what}; block_size {args.block_size}; compiler {args.inner}; mode {args.mode}; "
        f"{args.warmup} warm-up + {args.steps} timed steps; budget {args.budget_min or 'none'} min")

    rows = load_rows(csv_path, info, args)
    sites: dict[str, dict] = {}
    reports: dict[str, object] = {}  # explain's report per model, for the ideal speed-up
    flops: dict[str, tuple] = {}
    for r in rows if args.resume else []:  # without --resume, explain runs again with the current code
        if r.get("sites_total") is not None:
            sites.setdefault(r["model"], {k: r[k] for k in ("sites_rewritten", "sites_total", "sites_detail")})

    title = plot_title(info, args)
    start = T0
    pair_s: dict[str, list[float]] = {}
    skipped: list[tuple[str, float]] = []
    for model, p in planned_pairs(args, rows):
        if args.budget_min:
            # The last pair of this model is the best guess (later compiles reuse cached kernels);
            # a model not yet run is guessed from the slowest pair so far, which had explain in it too.
            seen = pair_s.get(model) or [max((t for ts in pair_s.values() for t in ts), default=0.0)]
            elapsed = time.perf_counter() - start
            if elapsed + seen[-1] > args.budget_min * 60:
                skipped.append((model, p))
                log(f"[{elapsed:5.0f} s] skip {model} p={p:g}: ~{seen[-1]:.0f} s more would pass the "
                    f"{args.budget_min} min budget")
                continue
        t_pair = time.perf_counter()
        shape = shapes[model]
        if model not in sites:
            log(f"[{t_pair - start:5.0f} s] {model}: explain at p={DEFAULT_P}")
            try:
                sites[model], reports[model] = explain_model(model, shape, args, out_dir, stem)
            except Exception as exc:  # noqa: BLE001 - the timing is still worth having
                sites[model] = {"sites_rewritten": None, "sites_total": None,
                                "sites_detail": f"explain failed: {type(exc).__name__}: {short(exc)}"}
                log(f"  explain {model} FAILED: {sites[model]['sites_detail']}")
            try:
                flops[model] = flops_by_module(model, shape, args)
            except Exception as exc:  # noqa: BLE001 - only the ideal speed-up needs it
                log(f"  FLOP count of {model} FAILED (no ideal speed-up): {type(exc).__name__}: {short(exc)}")
        timed: dict[str, dict] = {}
        if args.interleave:
            log(f"[{time.perf_counter() - start:5.0f} s] {model} batch {shape_str(shape)} p={p:g}, both backends "
                f"interleaved over {args.rounds} rounds")
            try:
                timed = time_pair_interleaved(model, p, shape, args)
            except Exception as exc:  # noqa: BLE001 - one failing pair must not end the benchmark
                timed = dict.fromkeys(BACKENDS, {"error": failure(exc, model)})
            torch._dynamo.reset()
            free_memory(device)
        for backend in BACKENDS:
            row = {**settings(info, args, model), "model": model, "p": p, "backend": backend, **sites[model],
                   "timing": "interleaved" if args.interleave else "sequential",
                   "time_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
            if args.interleave:
                row.update(timed[backend])
            else:
                log(f"[{time.perf_counter() - start:5.0f} s] {model} batch {shape_str(shape)} p={p:g} {backend}: compiling ...")
                try:
                    row.update(time_training(model, backend, p, shape, args))
                except Exception as exc:  # noqa: BLE001 - one failing run must not end the benchmark
                    row["error"] = failure(exc, model)
                # Outside the except block: the traceback no longer pins the failed run's tensors.
                torch._dynamo.reset()
                free_memory(device)
            set_ratios(row, find(rows, model, p, "inductor") if backend == "sparsedrop" else row)
            put(rows, row)
            # Every sparsedrop row of the model again: the Inductor p = 0 row may have just come.
            for r in [r for r in rows if r["model"] == model and r["backend"] == "sparsedrop" and ok(r)]:
                try:
                    set_ideal(rows, model, float(r["p"]), r, reports.get(model), flops.get(model))
                except Exception as exc:  # noqa: BLE001 - the measured rows stand without it
                    log(f"  ideal speed-up of {model} p={r['p']} not computed: {type(exc).__name__}: {short(exc)}")
            write_rows(rows, csv_path)
            if ok(row):
                log(f"  {row['median_ms']:.1f} ms/step (min {row['min_ms']:.1f}), peak {fmt(row.get('peak_mem_mb'), '.0f')} MB, "
                    f"compile+first step {row['compile_s']} s, {row['graphs']} graph(s)"
                    + (f", {row['speedup_vs_inductor']:.2f}x vs inductor" if backend == "sparsedrop" and
                       row.get("speedup_vs_inductor") else ""))
                if device == "cuda" and backend == "inductor" and row["median_ms"] < TARGET_STEP_MS:
                    log(f"  note: under {TARGET_STEP_MS:.0f} ms per step; --{model}-batch larger would time more GPU work")
        pair_s.setdefault(model, []).append(time.perf_counter() - t_pair)
        plot(rows, out_dir, stem, title)

    log(f"\ndone in {time.perf_counter() - start:.0f} s; results: {csv_path}")
    plots = [out_dir / f"{stem}_{kind}.png" for kind in ("time", "memory")]
    log(f"plots: {', '.join(str(p) for p in plots if p.exists()) or 'none'}")
    print_table(rows, [m for m in MODELS if any(r["model"] == m for r in rows)])
    if skipped:
        log(f"\nnot run (time budget): {', '.join(f'{m} p={p:g}' for m, p in skipped)}")
        log("continue with the same arguments plus --resume")
    return 1 if any(r.get("error") for r in rows) else 0


# --------------------------------------------------------------------------- several GPUs
def split_pairs(pairs: list[tuple[str, float]], n: int) -> list[list[tuple[str, float]]]:
    """Greedy balance: each pair, in plan order, goes to the share with the least guessed time so far."""
    shares: list[list[tuple[str, float]]] = [[] for _ in range(n)]
    load = [0.0] * n
    for model, p in pairs:
        i = min(range(n), key=lambda j: load[j])  # ties: the lowest index, so GPU 0 gets the first headline
        shares[i].append((model, p))
        load[i] += PAIR_COST_S[model]
    return shares


def visible_devices(n: int) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each child: the parent's own list where it has one."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in parent.split(",") if d.strip()] if parent else []
    return [ids[i] if i < len(ids) else str(i) for i in range(n)]


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError as exc:
        return f"(no log: {exc})\n"


def stop_children(procs: dict[int, subprocess.Popen], grace_s: float = 60.0) -> None:
    """SIGTERM first (a child then writes its CSV and prints its table), SIGKILL after grace_s."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.perf_counter() + grace_s
    for proc in procs.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def merge_children(rows: list[dict], child_dirs: dict[int, Path], stem: str, out_dir: Path, info: dict,
                   args) -> list[dict]:
    """Add each child's rows to rows (put() replaces a pair's row) and copy its site tables up."""
    for i, child_dir in child_dirs.items():
        path = child_dir / f"{stem}.csv"
        if not path.exists():
            others = sorted(f.name for f in child_dir.glob("model_*.csv"))
            log(f"gpu{i}: no {path.name}" + (f" (the folder holds {', '.join(others)}: another GPU model?)" if others
                                             else " (no pair finished there)"))
            continue
        taken = 0
        for r in read_rows(path):
            if same_settings(r, info, args):  # always, unless the code or the versions changed mid-run
                r["_run"] = f"gpu{i}"  # which process measured it; write_rows leaves the key out
                put(rows, r)
                taken += 1
        log(f"gpu{i}: {taken} row(s) from {path}")
        for sites_file in child_dir.glob(f"{stem}_sites_*.txt"):
            shutil.copy2(sites_file, out_dir / sites_file.name)
    # A ratio compares two rows of one process; where a child replaced only one row of a pair (it
    # was stopped between the two backends), the pair's rows come from two runs and get no ratio.
    for r in rows:
        if r["backend"] != "sparsedrop":
            continue
        base = find(rows, r["model"], float(r["p"]), "inductor")
        src, base_src = r.get("_run"), base.get("_run") if base is not None else None
        if src is None and base_src is None:
            continue  # a pair no child touched: as the CSV has it
        set_ratios(r, base if base is not None and base_src == src else None)
    return rows


def run_parallel(args) -> int:
    """--gpus N: run this script once per GPU on a share of the pairs, then merge the children's CSVs."""
    info, slug = env_info(args.device)  # the children's GPUs are taken to be of the parent's GPU 0 model
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = file_stem(slug, args.mode)
    csv_path = out_dir / f"{stem}.csv"
    log(f"{info['gpu']} x {args.gpus}  torch {info['torch']}  transformers {info['transformers']}  "
        f"triton {info['triton']}  cuda {info['cuda']}; mode {args.mode}; budget {args.budget_min or 'none'} min per GPU")
    rows = load_rows(csv_path, info, args)
    plan = planned_pairs(args, rows)
    shares = split_pairs(plan, args.gpus)
    devices = visible_devices(args.gpus)
    # N children compiling at once would each start a pool of min(32, cores) Inductor compile
    # workers; a share of the cores each keeps the host from thrashing.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS") or str(max(1, cores // args.gpus))

    # The children's host lock (see host_phase): a temporary file, removed when the driver ends.
    lock_fd, lock_path = tempfile.mkstemp(prefix="sparsedrop_bench_", suffix=".lock")
    os.close(lock_fd)
    start = time.perf_counter()
    procs: dict[int, subprocess.Popen] = {}
    child_dirs: dict[int, Path] = {}
    running: set[int] = set()
    interrupted = False

    def report(i: int) -> None:
        log(f"\n[{time.perf_counter() - start:5.0f} s] gpu{i} ended with exit code {procs[i].returncode}; "
            f"last lines of {child_dirs[i] / 'log.txt'}:")
        log(tail(child_dirs[i] / "log.txt").rstrip())

    try:
        for i, share in enumerate(shares):
            if not share:
                continue  # fewer pairs than GPUs
            child_dir = out_dir / f"gpu{i}"
            child_dir.mkdir(parents=True, exist_ok=True)
            child_dirs[i] = child_dir
            # The parent's arguments, then the driver's own: argparse keeps an option's last value.
            # --fresh: a child's folder only ever holds this run's pairs, so an old row there can never
            # be merged over a newer one in the main CSV.
            argv = [*args.argv, "--gpus", "1", "--pairs", ",".join(f"{m}:{p:g}" for m, p in share),
                    "--out", str(child_dir), "--fresh"]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": devices[i], "TORCHINDUCTOR_COMPILE_THREADS": threads,
                   "PYTHONUNBUFFERED": "1", HOST_LOCK_ENV: lock_path}
            guess = sum(PAIR_COST_S[m] for m, _ in share)
            log(f"gpu{i} (CUDA_VISIBLE_DEVICES={devices[i]}): {' '.join(f'{m}:{p:g}' for m, p in share)} "
                f"(~{guess:.0f} s); log {child_dir / 'log.txt'}")
            with (child_dir / "log.txt").open("w") as fh:  # the child holds its own copy of the handle
                procs[i] = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], env=env,
                                            stdout=fh, stderr=subprocess.STDOUT, cwd=os.getcwd())
            running.add(i)
        if not procs:
            log("nothing to run" + (" (--resume: every planned pair is in the CSV)" if args.resume else ""))
        while running:
            for i in sorted(running):
                if procs[i].poll() is not None:
                    running.discard(i)
                    report(i)
            time.sleep(1.0)
    except KeyboardInterrupt:
        interrupted = True
        log("\ninterrupted: stopping the children, then merging what they finished")
    finally:
        stop_children(procs)  # no-op for children that ended; never leaves one running on a GPU
        with contextlib.suppress(OSError):
            os.remove(lock_path)
    for i in sorted(running if interrupted else ()):
        report(i)  # the ones just stopped: their logs end with the table of what they finished

    if child_dirs:  # else the CSV stays as it was
        rows = merge_children(rows, child_dirs, stem, out_dir, info, args)
        write_rows(rows, csv_path)
        plot(rows, out_dir, stem, plot_title(info, args))
    log(f"\ndone in {time.perf_counter() - start:.0f} s; results: {csv_path}")
    plots = [out_dir / f"{stem}_{kind}.png" for kind in ("time", "memory")]
    log(f"plots: {', '.join(str(p) for p in plots if p.exists()) or 'none'}")
    print_table(rows, [m for m in MODELS if any(r["model"] == m for r in rows)])
    missing = [(m, p) for m, p in plan if not all(ok(find(rows, m, p, b)) for b in BACKENDS)]
    if missing:
        log(f"\nnot measured: {', '.join(f'{m} p={p:g}' for m, p in missing)}")
        log("continue with the same arguments plus --resume")
    if interrupted:
        return 130
    failed = any(proc.returncode for proc in procs.values()) or any(r.get("error") for r in rows)
    return 1 if failed else 0


def parse_pairs(text: str) -> list[tuple[str, float]]:
    """--pairs t5:0.1,bert:0.5 (what a --gpus parent hands each child)."""
    pairs = []
    for item in filter(None, text.split(",")):
        model, _, p = item.partition(":")
        try:
            value = float(p)
        except ValueError:
            value = None
        if model not in MODELS or value is None or not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: expected model:p with model in {', '.join(MODELS)} "
                                             "and p in [0, 1), e.g. t5:0.1")
        pairs.append((model, value))
    return pairs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--ps", nargs="+", type=float, default=list(DEFAULT_PS),
                        help="dropout p for every dropout, run in this order (default: %(default)s)")
    for model, (b, s, d) in SHAPES.items():
        parser.add_argument(f"--{model}-batch", type=int, default=b, help=f"default {b}")
        parser.add_argument(f"--{model}-seq", type=int, default=s, help=f"{'encoder length, ' if d else ''}default {s}")
        if d is not None:
            parser.add_argument(f"--{model}-dec-seq", type=int, default=d, help=f"decoder (label) length, default {d}")
    parser.add_argument("--block-size", type=int, default=None, help="sparsedrop mask block (default 128; 32 with --smoke)")
    parser.add_argument("--inner", choices=("inductor", "aot_eager", "eager"), default="inductor",
                        help="compiler after the rewrite; the baseline backend is the same compiler without it")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first; the first one compiles")
    parser.add_argument("--budget-min", type=float, default=7.0,
                        help="do not start a (model, p) pair that would end later than this; 0 = no limit")
    parser.add_argument("--resume", action="store_true",
                        help="skip (model, p) pairs the CSV already holds for these settings; run the rest")
    parser.add_argument("--fresh", action="store_true",
                        help="start a new CSV (the old one becomes .prev.csv) instead of adding to it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for CSV, plots, site tables (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of the script: demo-size models, tiny batches, aot_eager, 2 timed steps")
    parser.add_argument("--mode", choices=MODES, default="default",
                        help="Inductor compile mode of both backends; reduce-overhead records CUDA graphs "
                             "(results in model_<gpu>_<mode>.csv; with --smoke: Inductor on the CPU, which "
                             "skips the graphs, a plumbing check of some minutes)")
    parser.add_argument("--sequential", dest="interleave", action="store_false",
                        help="time one backend after the other (each after its own compile) instead of in "
                             "alternating rounds; --mode reduce-overhead always runs this way")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds the timed steps are split into (default %(default)s)")
    parser.add_argument("--gpus", type=int, default=1,
                        help="split the pairs over this many GPUs, one child process each, then merge their CSVs")
    # A --gpus child's share, instead of the models x ps product; the pairs run in this order.
    parser.add_argument("--pairs", type=parse_pairs, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a --gpus parent hands them to its children

    if args.smoke:
        # Times mean nothing here: this checks the plumbing (both backends, explain, CSV, plots, resume).
        args.device, args.size, args.shapes = "cpu", "demo", dict(SMOKE_SHAPES)
        args.inner, args.steps, args.warmup = "aot_eager", 2, 1
        if args.mode == "reduce-overhead":
            # The mode is Inductor's: compile with it. On the CPU Inductor skips the CUDA graphs, so
            # this checks the plumbing (mode option, step marks, loss copies, file names) only.
            args.inner = "inductor"
        args.block_size = args.block_size or 32  # several blocks per matrix at the smoke sizes
        if args.ps == list(DEFAULT_PS):
            args.ps = [0.1, 0.0]  # two points make a line; each CPU compile takes seconds
        args.out = args.out or tempfile.mkdtemp(prefix="bench_model_smoke_")
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_model.py times GPU training steps and needs a CUDA GPU; --smoke checks the script on CPU")
        args.device, args.size = "cuda", "base"
        args.shapes = {m: (getattr(args, f"{m}_batch"), getattr(args, f"{m}_seq"), getattr(args, f"{m}_dec_seq", None))
                       for m in MODELS}
        args.out = args.out or str(ROOT / "benchmarks" / "results")
        args.block_size = args.block_size or 128
    if args.block_size < 1:
        parser.error(f"--block-size {args.block_size}: expected a positive int, e.g. 128")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the first warm-up step compiles)")
    bad = [p for p in args.ps if not 0 <= p < 1]
    if bad:
        parser.error(f"--ps {bad}: dropout p must be in [0, 1)")
    if args.mode != "default" and args.inner != "inductor":
        parser.error(f"--mode {args.mode} is an Inductor mode; --inner {args.inner} has none: use --inner inductor "
                     "or --mode default")
    if args.mode == "reduce-overhead" and not args.smoke and args.warmup < 3:
        # Step 1 compiles and runs the CUDA-graph warm-up, step 2 records: time only replays.
        parser.error(f"--warmup {args.warmup}: --mode reduce-overhead needs at least 3 so the timed steps are "
                     "CUDA-graph replays")
    if args.gpus < 1:
        parser.error(f"--gpus {args.gpus}: expected at least 1")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: expected at least 1")
    # Two models' CUDA-graph trees alternating in one process would re-record; time them apart.
    args.interleave = args.interleave and args.mode == "default"
    if args.device == "cuda" and args.gpus > torch.cuda.device_count():
        parser.error(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPU(s) visible")
    # The baseline is the compiler the sparsedrop backend hands its graph to, without the rewrite.
    args.baseline = args.inner
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")  # fp32 leftovers (loss, norms) the same way for both
    # Library chatter would push the result table out of a tail-only log.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()

    def on_term(signum, frame):  # a job timeout: stop, but still print the table of what finished
        # Once: a --gpus parent passes the job's SIGTERM on, which must not cut this table short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    with contextlib.suppress(KeyboardInterrupt):
        return run_parallel(args) if args.gpus > 1 else run(args)
    # A Ctrl-C reaches a --gpus parent's children too, and the parent then sends them SIGTERM.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log("\ninterrupted: the CSV holds every pair that finished")
    _, slug = env_info(args.device)
    rows = read_rows(Path(args.out) / f"{file_stem(slug, args.mode)}.csv")
    print_table(rows, [m for m in MODELS if any(r["model"] == m for r in rows)])
    return 130


if __name__ == "__main__":
    sys.exit(main())

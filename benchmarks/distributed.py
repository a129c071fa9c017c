"""Training step time per GPU under DDP and FSDP2: backend="sparsedrop" vs backend="inductor", 1 vs 2 GPUs.

Question: does the sparsedrop backend keep its speed-up over Inductor when a model trains on
several GPUs, and do both backends scale? GPT-2 small and T5-base (6+6 layers) from configs,
every dropout at p = 0.1, bf16 autocast, fused AdamW; weak scaling: the per-GPU batch is fixed
(bench_model.py's shapes: GPT-2 24 x 1024, T5 64 x 512 / 128), so N GPUs train on N times the
samples per step. Each rank draws its masks from its own seed (--seed + rank).

On the two-GPU machine (one call, both launches, about 8 minutes; NCCL's NVLink multicast off):

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 1 benchmarks/distributed.py --budget-min 5; NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 benchmarks/distributed.py --budget-min 3

On the lent GPU machine add --out "$OUT" to both launches, so the CSV and plot come back. The
same command again with --resume measures only what a budget left out. CPU check of this
script (gloo, tiny models, aot_eager for both backends, a temporary --out unless one is given):

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/distributed.py --device cpu --tiny

Each launch runs, for each engine (DDP: the model wrapped, then compiled, DDPOptimizer on as by
default; FSDP2: fully_shard per transformer block, then the root, then compiled), each model and
each backend: build the model from the same seed, compile, --warmup untimed steps (the first
compiles), then --steps timed steps, CUDA events on every rank. A (model, engine) pair, both
backends, is not started when it would end past --budget-min (rank 0 decides for all ranks). Rows go to
benchmarks/results/distributed_<gpu>.csv, keyed by (model, engine, backend, gpus); runs with
the same settings and versions add up in it (a launch with 2 GPUs completes a file a launch with 1
GPU started), and distributed_<gpu>.png is drawn from all its rows after every run.

Columns: median_ms is rank 0's median step time; max_rank_ms the slowest rank's median;
samples_per_s = gpus x batch / max_rank_ms x 1000; speedup_vs_inductor compares the two backends
at the same (model, engine, gpus); scaling_vs_1gpu is samples_per_s over the same (model, engine,
backend) row at 1 GPU (target >= 1.9). sites_rewritten / sites_seen count the dropouts in the
compiled graphs as the backend saw them while compiling (a graph reused by several layers counts
once); losses are the mean over ranks of each timed step's loss.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

T0 = time.perf_counter()  # the budget counts the imports too

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model as bm  # its model, batch, timing and CSV helpers; registers the backend)

from sparsedrop_compile import harness, report
from sparsedrop_compile.models import transformer_blocks

MODELS = ("gpt2", "t5")
ENGINES = ("ddp", "fsdp2")
BACKENDS = bm.BACKENDS  # the baseline first, so a sparsedrop row gets its speed-up at once
P = bm.DEFAULT_P
# Seconds one run takes on one H200 before any cache is warm (compile, warm-up, timed steps): the
# budget's first guess for a run not yet seen; measured runs replace it.
RUN_COST_S = {("gpt2", "ddp"): 40.0, ("gpt2", "fsdp2"): 25.0, ("t5", "ddp"): 50.0, ("t5", "fsdp2"): 30.0}
TINY_SHAPES = {"gpt2": bm.SMOKE_SHAPES["gpt2"], "t5": bm.SMOKE_SHAPES["t5"]}

FIELDS = [
    "gpu", "torch", "transformers", "triton", "cuda", "nccl", "model", "engine", "backend", "gpus", "params_m",
    "batch_per_gpu", "seq", "dec_seq", "p", "compiler", "block_size", "median_ms", "min_ms", "max_ms", "max_rank_ms",
    "steps", "samples_per_s", "speedup_vs_inductor", "scaling_vs_1gpu", "peak_mem_mb", "compile_s",
    "sites_rewritten", "sites_seen", "loss_first", "loss_last", "losses", "error", "time_utc",
]
TEXT_FIELDS = ("gpu", "torch", "transformers", "triton", "cuda", "nccl", "model", "engine", "backend", "compiler",
               "losses", "error", "time_utc")
# Rows of another launch stay in the CSV only when these match the current settings.
SETTING_KEYS = ("gpu", "torch", "triton", "transformers", "batch_per_gpu", "seq", "dec_seq", "p", "compiler", "block_size")


def log(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        bm.log(*args)


# --------------------------------------------------------------------------- one run
def wrap(model: torch.nn.Module, engine: str, args) -> torch.nn.Module:
    """The model under its engine, in each engine's usual order (the caller compiles the result)."""
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[args.local_rank] if args.device == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def gather_float(value: float) -> list[float]:
    out = [0.0] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def run_one(name: str, engine: str, backend: str, args) -> dict:
    """Build, wrap, compile and train ``name`` for args.warmup + args.steps steps on this rank's batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch._dynamo.reset()
    bm.free_memory(args.device)
    model = bm.make_model(name, P, args, args.seed)  # the same weights on every rank
    params_m = sum(t.numel() for t in model.parameters()) / 1e6
    batch = bm.make_batch(model, name, args.shapes[name], args, args.seed + rank)  # each rank its own shard
    wrapped = wrap(model, engine, args)
    options = bm.sparsedrop_options(args)
    compiled = (torch.compile(wrapped, backend="sparsedrop", options=options) if backend == "sparsedrop"
                else torch.compile(wrapped, backend=args.baseline))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if args.device == "cuda" else {}))

    def step() -> torch.Tensor:
        return harness.train_step(lambda: compiled(**batch).loss, opt, autocast=args.device)

    row = {"params_m": round(params_m, 1)}
    seen = report.ExplainReport()
    try:
        torch.manual_seed(args.seed + rank)  # each rank its own masks, reproducibly
        t0 = time.perf_counter()
        with report.recording(seen):
            step()  # compiles forward and backward
        harness.sync(args.device)
        row["compile_s"] = round(time.perf_counter() - t0, 1)
        for _ in range(args.warmup - 1):
            step()
        harness.sync(args.device)
        dist.barrier()
        times, losses = bm.timed_steps(step, args, False, row)
        medians = gather_float(statistics.median(times))
        mean_losses = [sum(v) / world for v in zip(*[gather_float(loss.item()) for loss in losses])] if losses else []
        row.update(median_ms=round(statistics.median(times), 3), min_ms=round(min(times), 3), max_ms=round(max(times), 3),
                   max_rank_ms=round(max(medians), 3), steps=len(times),
                   samples_per_s=round(world * args.shapes[name][0] / max(medians) * 1e3, 2),
                   loss_first=round(mean_losses[0], 5), loss_last=round(mean_losses[-1], 5),
                   losses=" ".join(f"{v:.5f}" for v in mean_losses),
                   sites_rewritten=len(seen.rewritten) if backend == "sparsedrop" else None,
                   sites_seen=len(seen.sites) if backend == "sparsedrop" else None)
        if args.profile_dir:
            profile_steps(step, Path(args.profile_dir) / f"profile_{name}_{engine}_{backend}_{world}gpu.txt", args)
    finally:
        compiled = wrapped = opt = model = batch = None  # freed before the next run builds its model
        torch._dynamo.reset()
        bm.free_memory(args.device)
    return row


def profile_steps(step, path: Path, args, steps: int = 3) -> None:
    """Three more steps on every rank (their collectives need all ranks), rank 0 under torch's
    profiler: its tables by GPU time and by the host's own time go to ``path``."""
    profiling = dist.get_rank() == 0
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch.profiler.profile(activities=activities) if profiling else contextlib.nullcontext() as prof:
        for _ in range(steps):
            step()
        harness.sync(args.device)
    if profiling:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = prof.key_averages()
        sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        path.write_text(f"# {steps} steps, rank 0, by {sort}\n{table.table(sort_by=sort, row_limit=45)}\n"
                        f"# by self CPU time\n{table.table(sort_by='self_cpu_time_total', row_limit=30)}\n")
        log(f"  profile of {steps} steps: {path}")


# --------------------------------------------------------------------------- results file
def key(row: dict) -> tuple:
    return row["model"], row["engine"], row["backend"], int(row["gpus"])


def find(rows: list[dict], model: str, engine: str, backend: str, gpus: int) -> dict | None:
    return next((r for r in rows if key(r) == (model, engine, backend, gpus)), None)


def set_ratios(rows: list[dict]) -> None:
    """Speed-up over Inductor (same model, engine, GPUs) and scaling over 1 GPU (same model, engine, backend)."""
    for r in rows:
        r["speedup_vs_inductor"] = r["scaling_vs_1gpu"] = None
        if not bm.ok(r):
            continue
        base = find(rows, r["model"], r["engine"], "inductor", int(r["gpus"]))
        if bm.ok(base):
            r["speedup_vs_inductor"] = round(float(base["max_rank_ms"]) / float(r["max_rank_ms"]), 3)
        one = find(rows, r["model"], r["engine"], r["backend"], 1)
        if bm.ok(one):
            r["scaling_vs_1gpu"] = round(float(r["samples_per_s"]) / float(one["samples_per_s"]), 3)


def settings(info: dict, args, model: str) -> dict:
    batch, seq, dec_seq = args.shapes[model]
    return {**info, "batch_per_gpu": batch, "seq": seq, "dec_seq": dec_seq, "p": P, "compiler": args.inner,
            "block_size": args.block_size}


def load_rows(path: Path, info: dict, args) -> list[dict]:
    """The rows of earlier launches with these settings; a file holding others moves to .prev.csv."""
    existing = [] if args.fresh else bm.read_rows(path, TEXT_FIELDS)
    rows = [r for r in existing if r.get("model") in args.shapes
            and all(str(r.get(k)) == str(settings(info, args, r["model"])[k]) for k in SETTING_KEYS)]
    if path.exists() and (args.fresh or len(rows) < len(existing)):
        prev = path.with_name(path.stem + ".prev.csv")
        path.replace(prev)
        log(f"the previous {path.name} is now {prev.name} (rows of other settings or versions)")
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return
    models = [m for m in MODELS if any(r["model"] == m and bm.ok(r) for r in rows)]
    if not models:
        return
    groups = [(engine, gpus) for engine in ENGINES for gpus in (1, 2)]
    colors = {"inductor": "tab:gray", "sparsedrop": "tab:blue"}
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.0), squeeze=False)
    width = 0.38
    for ax, model in zip(axes[0], models):
        for i, backend in enumerate(BACKENDS):
            labelled = False
            for j, (engine, gpus) in enumerate(groups):
                r = find(rows, model, engine, backend, gpus)
                if not bm.ok(r):
                    continue
                x, ms = j + (i - 0.5) * width, float(r["max_rank_ms"])
                ax.bar(x, ms, width, color=colors[backend], label=None if labelled else backend)
                labelled = True
                if backend == "sparsedrop" and r.get("speedup_vs_inductor"):
                    ax.annotate(f"{float(r['speedup_vs_inductor']):.2f}x", (x, ms), textcoords="offset points",
                                xytext=(0, 2), ha="center", fontsize=7, color=colors[backend])

        ref = next(r for r in rows if r["model"] == model and bm.ok(r))
        shape = f"{ref['batch_per_gpu']}x{ref['seq']}" + (f"/{ref['dec_seq']}" if ref.get("dec_seq") else "")
        ax.set_xticks(range(len(groups)), [tick(rows, model, e, g) for e, g in groups], fontsize=7)
        ax.set_xlabel("scaling: samples/s over 1 GPU, inductor / sparsedrop (target >= 1.9)", fontsize=7)
        ax.set_ylabel("training step, ms (slowest rank's median)")
        ax.set_title(f"{model} ({ref['params_m']}M params), {shape} per GPU, p={P}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def tick(rows: list[dict], model: str, engine: str, gpus: int) -> str:
    """An x label of the plot: engine, GPUs and, past 1 GPU, each backend's scaling."""
    label = f"{engine.upper()}\n{gpus} GPU{'s' if gpus > 1 else ''}"
    scales = [find(rows, model, engine, b, gpus) for b in BACKENDS]
    if gpus > 1 and any(r is not None and r.get("scaling_vs_1gpu") for r in scales):
        label += "\nscaling " + " / ".join(bm.fmt(r.get("scaling_vs_1gpu") if r else None, ".2f") for r in scales)
    return label


def print_table(rows: list[dict]) -> None:
    log("\nstep ms (slowest rank's median; fwd+bwd+AdamW, bf16 autocast); samples/s over all GPUs; "
        "speed-up = inductor / sparsedrop; scaling = samples/s over the 1-GPU row")
    log(f"{'model':5s} {'engine':6s} {'gpus':>4s} {'inductor':>9s} {'sparsedrop':>10s} {'speedup':>7s} "
        f"{'ind smp/s':>9s} {'sd smp/s':>9s} {'ind scale':>9s} {'sd scale':>8s} {'sites':>7s}")
    for model in MODELS:
        for engine in ENGINES:
            for gpus in (1, 2):
                ind, spd = (find(rows, model, engine, b, gpus) for b in BACKENDS)
                if ind is None and spd is None:
                    continue
                get = lambda r, k: r.get(k) if bm.ok(r) else None
                sites = f"{get(spd, 'sites_rewritten')}/{get(spd, 'sites_seen')}" if bm.ok(spd) else "-"
                log(f"{model:5s} {engine:6s} {gpus:4d} {bm.fmt(get(ind, 'max_rank_ms'), '9.1f'):>9s} "
                    f"{bm.fmt(get(spd, 'max_rank_ms'), '10.1f'):>10s} {bm.fmt(get(spd, 'speedup_vs_inductor'), '6.2f') + 'x':>7s} "
                    f"{bm.fmt(get(ind, 'samples_per_s'), '9.1f'):>9s} {bm.fmt(get(spd, 'samples_per_s'), '9.1f'):>9s} "
                    f"{bm.fmt(get(ind, 'scaling_vs_1gpu'), '9.2f'):>9s} {bm.fmt(get(spd, 'scaling_vs_1gpu'), '8.2f'):>8s} "
                    f"{sites:>7s}")
    for r in rows:
        if r.get("error"):
            log(f"FAILED {r['model']} {r['engine']} {r['backend']} {r['gpus']} GPU(s): {r['error']}")


# --------------------------------------------------------------------------- main loop
def decide(value):
    """Rank 0's value, on every rank (so all ranks run, or skip, the same runs)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def measure(model: str, engine: str, backend: str, info: dict, args) -> dict:
    """One run as a CSV row; on rank 0 with the first error of any rank."""
    rank = dist.get_rank()
    row = {**settings(info, args, model), "model": model, "engine": engine, "backend": backend,
           "gpus": dist.get_world_size(),
           "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
        row.update(run_one(model, engine, backend, args))
    except Exception as exc:  # noqa: BLE001 - one failing run must not end the benchmark
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
        row["error"] = "out of memory" if oom else f"{type(exc).__name__}: {bm.short(exc)}"
        bm.log(f"  rank {rank} FAILED: {row['error']}")
        if not oom:
            bm.log("".join(traceback.format_exc().splitlines(keepends=True)[-12:]))
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, row.get("error"))
    row["error"] = row.get("error") or next((f"rank {i}: {e}" for i, e in enumerate(errors) if e), None)
    return row


def report_row(row: dict) -> None:
    if not bm.ok(row):
        return
    sd = row["backend"] == "sparsedrop"
    log(f"  {row['max_rank_ms']:.1f} ms/step (slowest rank), {row['samples_per_s']:.1f} samples/s, "
        f"compile+first step {row['compile_s']} s"
        + (f", {row['speedup_vs_inductor']:.2f}x vs inductor" if sd and row.get("speedup_vs_inductor") else "")
        + (f", scaling {row['scaling_vs_1gpu']:.2f}x over 1 GPU" if row["gpus"] > 1 and row.get("scaling_vs_1gpu") else "")
        + (f", sites {row['sites_rewritten']}/{row['sites_seen']}" if sd else ""))


def run(args) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    info, slug = bm.env_info(args.device)
    info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else "none"
    out_dir = Path(args.out)
    csv_path, png_path = out_dir / f"distributed_{slug}.csv", out_dir / f"distributed_{slug}.png"
    title = (f"{info['gpu']}, torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}, "
             f"nccl {info['nccl']}; bf16 autocast, block {args.block_size}, compiler {args.inner}")
    rows: list[dict] = []
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = load_rows(csv_path, info, args)
    log(f"{info['gpu']} x {world}  torch {info['torch']}  transformers {info['transformers']}  triton {info['triton']}  "
        f"nccl {info['nccl']}; models {' '.join(args.models)}; engines {' '.join(args.engines)}; p {P}; "
        f"{args.warmup} warm-up + {args.steps} timed steps; budget {args.budget_min or 'none'} min")
    # (model, engine) pairs, each with the backends still to run; a budget skips a pair whole, so
    # no speed-up is left without its baseline.
    plan = [((model, engine), list(BACKENDS)) for engine in args.engines for model in args.models]
    if args.resume:
        plan = decide([(pair, [b for b in backends if not bm.ok(find(rows, *pair, b, world))])
                       for pair, backends in plan] if rank == 0 else None)
        plan = [(pair, backends) for pair, backends in plan if backends]
    run_s: dict[tuple, float] = {}
    skipped = []
    for (model, engine), backends in plan:
        first_guess = RUN_COST_S[(model, engine)] if args.device == "cuda" else max(run_s.values(), default=0.0)
        guess = run_s.get((model, engine), first_guess) * len(backends)
        elapsed = time.perf_counter() - T0
        if decide(bool(args.budget_min) and elapsed + guess > args.budget_min * 60):
            skipped.append(f"{model} {engine}")
            log(f"[{elapsed:5.0f} s] skip {model} {engine}: ~{guess:.0f} s more would pass the {args.budget_min} min budget")
            continue
        for backend in backends:
            t_run = time.perf_counter()
            log(f"[{t_run - T0:5.0f} s] {model} {engine} {backend} on {world} {args.device.upper()}(s): compiling ...")
            row = measure(model, engine, backend, info, args)
            run_s[(model, engine)] = time.perf_counter() - t_run
            if rank == 0:
                rows = [r for r in rows if key(r) != key(row)] + [row]
                set_ratios(rows)
                bm.write_rows(rows, csv_path, FIELDS)
                plot(rows, png_path, title)
                report_row(row)
            dist.barrier()
    log(f"\ndone in {time.perf_counter() - T0:.0f} s; results: {csv_path}, plot: {png_path}")
    if rank == 0:
        print_table(rows)
    if skipped:
        log(f"\nnot run (time budget): {', '.join(skipped)}; the same command with --resume runs them")
    failed = rank == 0 and any(r.get("error") for r in rows if int(r["gpus"]) == world)
    return 1 if decide(failed) else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: NCCL, one GPU per rank; cpu: gloo (a check of the script, with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches, aot_eager, 2 timed steps")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    for model in MODELS:
        b = bm.SHAPES[model][0]
        parser.add_argument(f"--{model}-batch", type=int, default=b, help=f"per-GPU batch, default {b}")
    parser.add_argument("--block-size", type=int, default=None, help="sparsedrop mask block (default 128; 32 with --tiny)")
    parser.add_argument("--inner", choices=("inductor", "aot_eager", "eager"), default=None,
                        help="compiler after the rewrite, and the baseline backend (default inductor; aot_eager with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 15; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, the first compiles (default 3; 1 with --tiny)")
    parser.add_argument("--budget-min", type=float, default=0.0,
                        help="do not start a run that would end later than this many minutes after the launch; 0 = no limit")
    parser.add_argument("--resume", action="store_true", help="skip runs the CSV already holds for this many GPUs")
    parser.add_argument("--fresh", action="store_true", help="start a new CSV (the old one becomes .prev.csv)")
    parser.add_argument("--profile-dir", default=None,
                        help="after each run, profile 3 more steps (rank 0) and write the tables here")
    parser.add_argument("--seed", type=int, default=0, help="weights from this seed; rank r draws its masks from seed + r")
    parser.add_argument("--out", default=None, help="folder for the CSV and plot (default benchmarks/results; "
                                                    "a temporary folder with --device cpu)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs CUDA GPUs; --device cpu --tiny checks the script on the CPU")
    if args.tiny:
        args.size, args.shapes = "tiny", dict(TINY_SHAPES)
        args.inner, args.steps, args.warmup = args.inner or "aot_eager", args.steps or 2, args.warmup or 1
        args.block_size = args.block_size or 32
    else:
        args.size = "base"
        args.shapes = {m: (getattr(args, f"{m}_batch"), *bm.SHAPES[m][1:]) for m in MODELS}
        args.inner, args.steps, args.warmup = args.inner or "inductor", args.steps or 15, args.warmup or 3
        args.block_size = args.block_size or 128
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the first warm-up step compiles)")
    args.baseline = args.inner  # the baseline is the compiler sparsedrop hands its graphs to, without the rewrite
    args.out = args.out or (str(bm.ROOT / "benchmarks" / "results") if args.device == "cuda"
                            else tempfile.mkdtemp(prefix="bench_distributed_"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit("run under torchrun, e.g. torchrun --standalone --nproc-per-node 2 benchmarks/distributed.py "
                 "(see the docstring)")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines
    args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(args.local_rank)
        torch.set_float32_matmul_precision("high")  # fp32 leftovers (loss, norms) the same way for both
    else:
        torch.set_num_threads(1)  # as torchrun sets for 2+ ranks; 1 rank would take every core and contend
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=5))
    if args.device == "cuda" and dist.get_world_size() > torch.cuda.device_count():
        sys.exit(f"{dist.get_world_size()} ranks but {torch.cuda.device_count()} GPU(s) visible")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        return run(args)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

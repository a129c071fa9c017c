"""bench_model.py's results: the CSV's columns, reading and writing its rows, the speed-up and
memory ratios of a pair, the plots and the printed table. Shared with distributed.py through
bench_model, which imports everything here."""
from __future__ import annotations

import math
from pathlib import Path

from sparsedrop_compile import harness

MODELS = ("t5", "bert", "gpt2")
DEFAULT_P = 0.1  # every dropout's default in T5, BERT and GPT-2
BACKENDS = ("inductor", "sparsedrop")  # the baseline first: a sparsedrop row gets its speed-up at once

FIELDS = [
    "gpu", "torch", "transformers", "triton", "cuda", "model", "params_m", "batch", "seq", "dec_seq", "p",
    "backend", "compiler", "mode", "block_size", "median_ms", "min_ms", "max_ms", "steps", "speedup_vs_inductor",
    "peak_mem_mb", "base_mem_mb", "mem_ratio_vs_inductor", "compile_s", "graphs", "loss_first", "loss_last",
    "sites_rewritten", "sites_total", "sites_detail",
    # gpu_ms: all GPU kernel time per step (a profile of 3 steps): a median_ms far above it waits on the host.
    # issue 12's physical limit (see ideal_speedup.py): the Inductor row's matmul / attention kernel
    # time per step, the sparsedrop row's skipped shares of that work and the limit's speed-up
    "gpu_ms", "matmul_ms", "attention_ms", "matmul_skip_share", "attention_skip_share", "ideal_speedup", "ideal_basis",
    "timing", "error", "time_utc",
]
# Rows of an earlier run stay in the CSV only when these match the current settings.
SETTING_KEYS = ("torch", "triton", "transformers", "batch", "seq", "dec_seq", "compiler", "mode", "block_size")
# Columns read back as text; the others are numbers.
TEXT_FIELDS = ("gpu", "torch", "transformers", "triton", "cuda", "model", "backend", "compiler", "mode",
               "sites_detail", "ideal_basis", "timing", "error", "time_utc")



def log(*args) -> None:
    print(*args, flush=True)


# --------------------------------------------------------------------------- results file
def read_rows(path: Path, text_fields: tuple[str, ...] = TEXT_FIELDS) -> list[dict]:
    rows = harness.read_csv(path)
    for r in rows:  # numbers back to numbers, so rows from a file and from this run mix
        for k, v in r.items():
            if v in ("", None):
                r[k] = None
            elif k not in text_fields:
                try:
                    r[k] = float(v) if any(c in v for c in ".enN") else int(v)
                except ValueError:
                    pass
        # Files written before --mode existed have no such column; they were all default-mode runs.
        r["mode"] = r.get("mode") or "default"
    return rows


def write_rows(rows: list[dict], path: Path, fields: list[str] = FIELDS) -> None:
    harness.write_csv(path, rows, fields)  # atomic: a kill mid-write never leaves half a file


def ok(row: dict | None) -> bool:
    return row is not None and not row.get("error") and isinstance(row.get("median_ms"), (int, float))


def find(rows: list[dict], model: str, p: float, backend: str) -> dict | None:
    for r in rows:
        if r["model"] == model and r["backend"] == backend and math.isclose(float(r["p"]), p, abs_tol=1e-9):
            return r
    return None


def put(rows: list[dict], row: dict) -> None:
    old = find(rows, row["model"], row["p"], row["backend"])
    if old is not None:
        rows.remove(old)
    rows.append(row)


def set_ratios(row: dict, base: dict | None) -> None:
    """Speed-up and memory ratio of a sparsedrop row against its inductor row (the baseline itself: 1.0)."""
    row["speedup_vs_inductor"] = row["mem_ratio_vs_inductor"] = None
    if ok(row) and ok(base):
        row["speedup_vs_inductor"] = round(float(base["median_ms"]) / float(row["median_ms"]), 3)
        if row.get("peak_mem_mb") and base.get("peak_mem_mb"):
            row["mem_ratio_vs_inductor"] = round(float(row["peak_mem_mb"]) / float(base["peak_mem_mb"]), 3)


# --------------------------------------------------------------------------- plots and table
def plot(rows: list[dict], out_dir: Path, stem: str, title: str) -> None:
    plt = harness.pyplot()
    if plt is None:
        return
    models = [m for m in MODELS if any(r["model"] == m and ok(r) for r in rows)]
    if not models:
        return
    styles = {"inductor": ("s--", "tab:gray"), "sparsedrop": ("o-", "tab:blue")}

    fig, axes = plt.subplots(1, len(models), figsize=(4.3 * len(models), 3.9), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model and ok(r)]
        for backend, (style, color) in styles.items():
            pts = sorted((float(r["p"]), float(r["median_ms"])) for r in sub if r["backend"] == backend)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, color=color, label=backend)
        for r in sub:
            if r["backend"] == "sparsedrop" and r.get("speedup_vs_inductor"):
                ax.annotate(f"{float(r['speedup_vs_inductor']):.2f}x", (float(r["p"]), float(r["median_ms"])),
                            textcoords="offset points", xytext=(0, -13), ha="center", fontsize=7, color="tab:blue")
        r0 = sub[0]
        shape = f"{r0['batch']}x{r0['seq']}" + (f"/{r0['dec_seq']}" if r0.get("dec_seq") else "")
        ax.set_title(f"{model} ({r0['params_m']}M params), batch {shape}", fontsize=9)
        ax.set_xlabel("dropout p (every dropout)")
        ax.set_ylabel("training step, median ms")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    harness.save_figure(fig, out_dir / f"{stem}_time.png")

    # Peak memory at the default p (the headline setting), one pair of bars per model.
    if not any(ok(r) and r.get("peak_mem_mb") is not None for r in rows):
        return  # CPU smoke runs measure no GPU memory
    fig, ax = plt.subplots(figsize=(1.9 * len(models) + 2.5, 3.9))
    width = 0.38
    for i, backend in enumerate(BACKENDS):
        for j, model in enumerate(models):
            r = find(rows, model, DEFAULT_P, backend)
            if not ok(r) or r.get("peak_mem_mb") is None:
                continue
            gb = float(r["peak_mem_mb"]) / 1024
            ax.bar(j + (i - 0.5) * width, gb, width, color=styles[backend][1], label=backend if j == 0 else None)
            ax.annotate(f"{gb:.1f}", (j + (i - 0.5) * width, gb), textcoords="offset points", xytext=(0, 2),
                        ha="center", fontsize=7)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel(f"peak GPU memory per step, GiB (p={DEFAULT_P})")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    harness.save_figure(fig, out_dir / f"{stem}_memory.png")


def short(exc: BaseException) -> str:
    """One line of an error, without Dynamo's advice on how to get more of it."""
    text = str(exc).split("Set TORCHDYNAMO_VERBOSE")[0]
    return " ".join(text.split())[:300]


def fmt(x, spec: str) -> str:
    return format(float(x), spec) if isinstance(x, (int, float)) and x == x else "-"


def print_table(rows: list[dict], models: list[str]) -> None:
    log("\nmedian training-step ms (fwd+bwd+AdamW, bf16 autocast); peak GPU MB; speed-up = inductor / sparsedrop")
    log(f"{'model':5s} {'batch':>12s} {'p':>4s} {'inductor':>9s} {'sparsedrop':>10s} {'speedup':>7s} {'ideal':>6s} "
        f"{'mem ind':>8s} {'mem sd':>8s} {'mem x':>6s} {'compile s':>10s} {'gpu ms ind/sd':>14s}")
    for model in models:
        sub = sorted({float(r["p"]) for r in rows if r["model"] == model})
        for p in sub:
            ind, spd = find(rows, model, p, "inductor"), find(rows, model, p, "sparsedrop")
            ref = ind or spd
            shape = f"{ref['batch']}x{ref['seq']}" + (f"/{ref['dec_seq']}" if ref.get("dec_seq") else "")
            get = lambda r, k: r.get(k) if ok(r) else None  # noqa: E731
            compile_s = f"{fmt(get(ind, 'compile_s'), '.0f')}/{fmt(get(spd, 'compile_s'), '.0f')}"
            log(f"{model:5s} {shape:>12s} {p:4.1f} {fmt(get(ind, 'median_ms'), '9.1f'):>9s} "
                f"{fmt(get(spd, 'median_ms'), '10.1f'):>10s} {fmt(get(spd, 'speedup_vs_inductor'), '6.2f') + 'x':>7s} "
                f"{fmt(get(spd, 'ideal_speedup'), '5.2f') + 'x':>6s} "
                f"{fmt(get(ind, 'peak_mem_mb'), '8.0f'):>8s} {fmt(get(spd, 'peak_mem_mb'), '8.0f'):>8s} "
                f"{fmt(get(spd, 'mem_ratio_vs_inductor'), '6.2f'):>6s} {compile_s:>10s} "
                f"{fmt(get(ind, 'gpu_ms'), '.1f') + '/' + fmt(get(spd, 'gpu_ms'), '.1f'):>14s}")
    for model in models:
        r = next((r for r in rows if r["model"] == model and r.get("sites_total") is not None), None)
        if r is not None:
            log(f"{model}: {r['sites_rewritten']}/{r['sites_total']} dropout sites rewritten at p={DEFAULT_P} "
                f"({r['sites_detail']})")
    for model in models:
        p0 = [find(rows, model, 0.0, b) for b in BACKENDS]
        if all(ok(r) for r in p0):
            a, b = (float(r["loss_first"]) for r in p0)
            log(f"{model} p=0 check: first-step loss inductor {a:.4f}, sparsedrop {b:.4f} (rel. diff {abs(a - b) / abs(a):.1e}), "
                f"time ratio {float(p0[0]['median_ms']) / float(p0[1]['median_ms']):.3f}")
    for r in rows:
        if r.get("error"):
            log(f"FAILED {r['model']} p={r['p']} {r['backend']}: {r['error']}")

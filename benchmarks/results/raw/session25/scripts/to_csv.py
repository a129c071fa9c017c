"""Session 25: the per-kernel A/B tables of calls 2 and 5 as one CSV and a plot.

    python benchmarks/results/raw/session25/scripts/to_csv.py   # -> benchmarks/results/unaligned_rows_nvidia-h200.{csv,png}
"""
import csv, os, re

RAW = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(RAW, "..", "..", "unaligned_rows_nvidia-h200")
GPU, TORCH, TRITON = "NVIDIA H200", "2.11.0+cu130", "3.6.0"
rows = []
# call 5: the aligned copy of the weight on and off (forward, dX), dW as it runs
pat5 = re.compile(r"(\d+x\d+x\d+) p=([\d.]+): fwd copy ([\d.]+) \(([\d.]+), copy_y=\w+\) no copy ([\d.]+) \(([\d.]+)\)  "
                  r"dX copy ([\d.]+) \(([\d.]+), copy_y=\w+\) no copy ([\d.]+) \(([\d.]+)\)  dW ([\d.]+) \(([\d.]+), [^)]*\)  "
                  r"sum x cuBLAS: copy ([\d.]+) no copy ([\d.]+)")
for line in open(os.path.join(RAW, "call5_copy_ab.log")):
    m = pat5.search(line)
    if not m:
        continue
    shape, p = m.group(1), float(m.group(2))
    for kernel, new, new_r, old, old_r in (("fwd", *m.group(3, 4, 5, 6)), ("dx", *m.group(7, 8, 9, 10)),
                                           ("sum", None, m.group(13), None, m.group(14))):
        change = "aligned copy of the weight" if shape != "8192x4000x4000" else \
            "aligned copy of the weight, forced (rows 8000 bytes apart: the committed 32-byte test copies none)"
        rows.append(dict(gpu=GPU, torch=TORCH, triton=TRITON, call=5, change=change, shape=shape,
                         p=p, kernel=kernel, new_us=new or "", old_us=old or "", new_vs_cublas=new_r, old_vs_cublas=old_r))
# call 2, part (2): dW with whole 128 x 128 tiles (new) against the big tiles' stream-K (old)
pat2 = re.compile(r"(\d+x\d+x\d+) p=([\d.]+): dX new .*dW new ([\d.]+) \(([\d.]+), (\S+)\) old ([\d.]+) \(([\d.]+), (\S+)\)")
for line in open(os.path.join(RAW, "call2_alignment_probe.log")):
    m = pat2.search(line)
    if not m or m.group(5) == m.group(8):  # the rule changed nothing there
        continue
    rows.append(dict(gpu=GPU, torch=TORCH, triton=TRITON, call=2, change=f"dW {m.group(5)} (new) against {m.group(8)} (old)",
                     shape=m.group(1), p=float(m.group(2)), kernel="dw", new_us=m.group(3), old_us=m.group(6),
                     new_vs_cublas=m.group(4), old_vs_cublas=m.group(7)))
with open(OUT + ".csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
print(f"{len(rows)} rows -> {OUT}.csv")

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
groups = [(r["shape"], r["kernel"], r["change"]) for r in rows]
groups = sorted(set(groups), key=groups.index)
ncols = 5
nrows = -(-len(groups) // ncols)
fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.8 * nrows), sharey=True)
axes = axes.flatten()
for ax in axes[len(groups):]:
    ax.set_visible(False)
for ax, (shape, kernel, change) in zip(axes, groups):
    sel = [r for r in rows if (r["shape"], r["kernel"], r["change"]) == (shape, kernel, change)]
    ps = [r["p"] for r in sel]
    ax.plot(ps, [float(r["old_vs_cublas"]) for r in sel], "o--", color="tab:gray", label="before")
    ax.plot(ps, [float(r["new_vs_cublas"]) for r in sel], "o-", color="tab:blue", label="after")
    ax.plot(ps, [1 - p for p in ps], ":", color="black", label="ideal (1 - p)")
    title = "fwd+dX+dW" if kernel == "sum" else kernel
    how = " (tiles)" if sel[0]["call"] == 2 else (" (copy, forced)" if "forced" in change else " (copy)")
    ax.set_title(f"{shape} {title}{how}", fontsize=8)
    ax.set_xlabel("p")
    ax.grid(alpha=0.3)
for ax in axes[::ncols]:
    ax.set_ylabel("time / cuBLAS")
axes[0].legend(fontsize=7)
fig.suptitle(f"Hopper kernels: the aligned copy of a weight with unaligned rows (copy), dW tiles on aligned rows (tiles); session 25 ({GPU}, torch {TORCH}, triton {TRITON}, bf16)", fontsize=9)
fig.tight_layout()
fig.savefig(OUT + ".png", dpi=110)
print(f"plot -> {OUT}.png")

"""Session 26: results/snake_deal_nvidia-h200.{csv,png} from call 1's log (the snake deal of
whole tiles against the plain deal, each kernel alone beside cuBLAS; means of three masks)."""
import csv, os, re, sys
here = os.path.dirname(os.path.abspath(__file__))
log = os.path.join(here, "..", "call1_snake_probe.log")
out = os.path.join(here, "..", "..", "..", "snake_deal_nvidia-h200")
gpu, torch_v, triton_v = None, None, None
rows = []
pat = re.compile(r"^(\d+x\d+x\d+) p=([\d.]+) (fwd|dw) \[(\d+x\d+) sk=(\w+)\] cuBLAS ([\d.]+)  snake ([\d.]+) \(([\d.]+)\)"
                 r"  in-order ([\d.]+) \(([\d.]+)\)  snake/in-order ([\d.]+)")
for line in open(log):
    if line.startswith("GPU "):
        parts = line.split()
        gpu, torch_v, triton_v = " ".join(parts[1:-2]), parts[-2], parts[-1]
    m = pat.match(line)
    if m:
        shape, p, kernel, tile, sk, cublas, sn, sn_r, io, io_r, ratio = m.groups()
        rows.append(dict(gpu=gpu, torch=torch_v, triton=triton_v, shape=shape, p=float(p), kernel=kernel, tile=tile,
                         stream_k=sk == "True", cublas_us=float(cublas), snake_us=float(sn), in_order_us=float(io),
                         snake_vs_cublas=float(sn_r), in_order_vs_cublas=float(io_r), snake_vs_in_order=float(ratio)))
with open(out + ".csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
for ax, kernel in zip(axes, ("fwd", "dw")):
    for shape in dict.fromkeys(r["shape"] for r in rows):
        pts = [(r["p"], r["snake_vs_in_order"]) for r in rows if r["shape"] == shape and r["kernel"] == kernel]
        sk = any(r["stream_k"] for r in rows if r["shape"] == shape and r["kernel"] == kernel)
        ax.plot(*zip(*pts), marker="o", label=shape + (" (stream-K: not dealt)" if sk else ""))
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_title({"fwd": "forward (dsd)", "dw": "weight gradient (dsd_tn)"}[kernel])
    ax.set_xlabel("p")
    ax.legend(fontsize=7)
axes[0].set_ylabel("time, snake deal / deal in order")
fig.suptitle(f"Whole tiles of ranked lines dealt in a snake order ({gpu}, torch {torch_v}, triton {triton_v}; "
             "CUDA-graph medians, mean of 3 masks)", fontsize=9)
fig.tight_layout()
fig.savefig(out + ".png", dpi=110)
print(len(rows), "rows ->", out + ".csv")


# results/tile_group_nvidia-h200.{csv,png}: the tile-group size of the whole-tile schedule, call 4
# (GROUP 2 / 4 / 8, forward and weight gradient, ten problems) and call 5 (the square tiles' 4
# against 8 on the committed tree, p = 0 to 0.5)
out = os.path.join(here, "..", "..", "..", "tile_group_nvidia-h200")
rows = []
pat4 = re.compile(r"^(\d+x\d+x\d+) p=([\d.]+) (fwd|dw) \[(\d+x\d+), R \d+ C \d+, tiles across (\d+)\] cuBLAS ([\d.]+): (.*)$")
for line in open(os.path.join(here, "..", "call4_group_probe.log")):
    m = pat4.match(line)
    if m:
        shape, p, kernel, tile, across, cublas, rest = m.groups()
        for g, t in re.findall(r"GROUP (\d+) ([\d.]+) \(", rest):
            rows.append(dict(gpu=gpu, torch=torch_v, triton=triton_v, call=4, shape=shape, p=float(p), kernel=kernel,
                             tile=tile, tiles_across=int(across), group=int(g), cublas_us=float(cublas), us=float(t),
                             vs_cublas=round(float(t) / float(cublas), 4)))
pat5 = re.compile(r"^(\d+x\d+x\d+) p=([\d.]+) (fwd|dw) cuBLAS ([\d.]+): group 4 ([\d.]+) .*group 8 ([\d.]+) ")
for line in open(os.path.join(here, "..", "call5_group_ab.log")):
    m = pat5.match(line)
    if m:
        shape, p, kernel, cublas, g4, g8 = m.groups()
        for g, t in ((4, g4), (8, g8)):
            rows.append(dict(gpu=gpu, torch=torch_v, triton=triton_v, call=5, shape=shape, p=float(p), kernel=kernel,
                             tile="128x128", tiles_across=None, group=g, cublas_us=float(cublas), us=float(t),
                             vs_cublas=round(float(t) / float(cublas), 4)))
with open(out + ".csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
c5 = [r for r in rows if r["call"] == 5]
for shape, kernel in dict.fromkeys((r["shape"], r["kernel"]) for r in c5):
    pts = {g: [(r["p"], r["us"]) for r in c5 if r["shape"] == shape and r["kernel"] == kernel and r["group"] == g]
           for g in (4, 8)}
    axes[0].plot([p for p, _ in pts[4]], [a / b for (_, a), (_, b) in zip(pts[4], pts[8])], marker="o",
                 label=f"{shape} {kernel}, 128 x 128 tiles")
axes[0].axhline(1.0, color="grey", lw=0.8)
axes[0].set_xlabel("p")
axes[0].set_ylabel("time, group 4 / group 8")
axes[0].set_title("call 5: the square tiles' group (committed: 4)")
axes[0].legend(fontsize=7)
c4 = [r for r in rows if r["call"] == 4 and r["p"] == 0.5]
labels = list(dict.fromkeys((r["shape"], r["kernel"], r["tile"]) for r in c4))
for i, g in enumerate((2, 4, 8)):
    vals = [next(r["us"] for r in c4 if (r["shape"], r["kernel"], r["tile"]) == lab and r["group"] == g) /
            next(r["us"] for r in c4 if (r["shape"], r["kernel"], r["tile"]) == lab and r["group"] == 8) for lab in labels]
    axes[1].bar([j + (i - 1) * 0.27 for j in range(len(labels))], vals, width=0.27, label=f"group {g}")
axes[1].set_xticks(range(len(labels)))
axes[1].set_xticklabels([f"{s}\n{k} {t}" for s, k, t in labels], fontsize=6, rotation=45, ha="right")
axes[1].set_ylim(0.85, 1.1)
axes[1].axhline(1.0, color="grey", lw=0.8)
axes[1].set_ylabel("time / group 8, p = 0.5")
axes[1].set_title("call 4: groups 2 / 4 / 8, whole tiles")
axes[1].legend(fontsize=7)
fig.suptitle(f"Tile-group size of the whole-tile schedule ({gpu}, torch {torch_v}, triton {triton_v}; "
             "CUDA-graph medians, mean of 3 masks)", fontsize=9)
fig.tight_layout()
fig.savefig(out + ".png", dpi=110)
print(len(rows), "rows ->", out + ".csv")

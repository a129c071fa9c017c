"""Session 27: results/hopper_ab_session27_nvidia-h200.{csv,png} from the A/B logs of calls 2-5
and 8 (each variant's time with the L2 flushed between graph replays, 'gapped', and back to back,
'sustained', beside the cuBLAS product it replaces; means of three fresh masks per p, one at p = 0)."""
import csv, os, re
here = os.path.dirname(os.path.abspath(__file__))
raw = os.path.join(here, "..")
out = os.path.join(raw, "..", "..", "hopper_ab_session27_nvidia-h200")
CALLS = {  # log, what the call compared
    2: ("call2_tiles.log", "tile and schedule (default / forced)"),
    3: ("call3_halves.log", "two consumer partitions / one (not adopted)"),
    4: ("call4_prefetch.log", "list entry read before / after the stage wait; square stages"),
    5: ("call5_stages.log", "square tiles 5 / 4 stages; ping-pong 5 / 4"),
    8: ("call8_tileinfo.log", "next tile's info read before the MMAs / after (not adopted)"),
}
line_pat = re.compile(r"^(?:(\w+) )?(\d+x\d+x\d+) (fwd|dW|dX)(?: \[([^\]]+)\])? p=([\d.]+) cuBLAS ([\d.]+)/([\d.]+): (.*)$")
var_pat = re.compile(r"(?:^|\)\s+)([A-Za-z][\w/ ]*?) ([\d.]+)/([\d.]+) \(")
rows = []
for call, (log, what) in CALLS.items():
    for line in open(os.path.join(raw, log)):
        if line.startswith("GPU "):
            parts = line.split()
            gpu, torch_v, triton_v = " ".join(parts[1:-2]), parts[-2], parts[-1]
        m = line_pat.match(line.strip())
        if not m:
            continue
        cfg, shape, kernel, tile, p, cub_g, cub_s, rest = m.groups()
        for name, g, s in var_pat.findall(rest):
            rows.append(dict(gpu=gpu, torch=torch_v, triton=triton_v, call=call, compared=what, config=cfg or "",
                             shape=shape, kernel=kernel, tile=tile or "", p=float(p), variant=name.strip(),
                             cublas_gapped_us=float(cub_g), cublas_sustained_us=float(cub_s),
                             gapped_us=float(g), sustained_us=float(s),
                             gapped_vs_cublas=round(float(g) / float(cub_g), 4),
                             sustained_vs_cublas=round(float(s) / float(cub_s), 4)))
with open(out + ".csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt


def ratio(call, new, old, cfg=None):
    """{(shape, kernel): [(p, gapped new/old, sustained new/old)]}"""
    got = {}
    pick = [r for r in rows if r["call"] == call and (cfg is None or r["config"] == cfg)]
    for r in pick:
        if r["variant"] != new:
            continue
        o = next(q for q in pick if q["variant"] == old and q["shape"] == r["shape"] and q["kernel"] == r["kernel"]
                 and q["p"] == r["p"])
        got.setdefault((r["shape"], r["kernel"]), []).append(
            (r["p"], r["gapped_us"] / o["gapped_us"], r["sustained_us"] / o["sustained_us"]))
    return got


panels = [
    ("list entry read before the stage wait / after (call 4, adopted)", ratio(4, "read_before", "read_after")),
    ("square tiles, 5 stages / 4 (call 5, adopted)", ratio(5, "stages 5", "stages 4", "square")),
    ("ping-pong tiles, 5 stages / 4 (call 5, not adopted)", ratio(5, "stages 5", "stages 4", "pingpong")),
    ("two consumer partitions / one (call 3, not adopted)", ratio(3, "two partitions", "one")),
    ("next tile's info before the MMAs / after (call 8, not adopted)", ratio(8, "info_before", "info_after")),
]
fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), sharey=True)
for ax, (title, data) in zip(axes, panels):
    for i, ((shape, kernel), pts) in enumerate(data.items()):
        colour = f"C{i % 10}"
        ax.plot([p for p, _, _ in pts], [g for _, g, _ in pts], marker="o", color=colour, label=f"{shape} {kernel}")
        ax.plot([p for p, _, _ in pts], [s for _, _, s in pts], marker="x", ls=":", color=colour)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("p")
    ax.legend(fontsize=6)
axes[0].set_ylabel("time ratio (solid: L2 flushed between replays; dotted: back to back)")
fig.suptitle(f"Hopper kernels, session 27 A/B ({gpu}, torch {torch_v}, triton {triton_v}; CUDA-graph medians, "
             "mean of 3 fresh masks per p)", fontsize=9)
fig.tight_layout()
fig.savefig(out + ".png", dpi=110)
print(len(rows), "rows ->", out + ".csv")

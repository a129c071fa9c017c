"""Session 28: results/hopper_ab_session28_nvidia-h200.{csv,png} from the A/B logs of calls 1,
4, 5 and 8 and the time-against-p curve of call 1 (each variant's time with the L2 flushed
between graph replays, 'gapped', and back to back, 'sustained', beside the cuBLAS product it
replaces; means of three fresh masks per p, one at p = 0 and p = 1)."""
import csv, os, re
here = os.path.dirname(os.path.abspath(__file__))
raw = os.path.join(here, "..")
out = os.path.join(raw, "..", "..", "hopper_ab_session28_nvidia-h200")
CALLS = {  # log, what the call compared
    1: ("call1_ab.log", "whole listed tiles in turns (ping-pong) / one cooperative tile (not adopted)"),
    4: ("call4_hostdesc.log", "descriptors built on the host / in the kernel (adopted)"),
    5: ("call5_pdl.log", "programmatic dependent launch after the lists / ordinary launch (not adopted)"),
    8: ("call8_zeros.log", "sdd's zero tiles stored before the MMAs / after (not adopted)"),
}
line_pat = re.compile(r"^(\d+x\d+x\d+) (fwd|dW|dX) p=([\d.]+) cuBLAS ([\d.]+)/([\d.]+): (.*)$")
var_pat = re.compile(r"(?:^|\)\s+)([A-Za-z][\w/ ]*?)(?:\([^)]*\))? ([\d.]+)/([\d.]+) \(")
rows = []


def header(line):
    parts = line.split()
    return " ".join(parts[1:-2]), parts[-2], parts[-1]


def row(call, what, shape, kernel, p, cub_g, cub_s, name, g, s):
    rows.append(dict(gpu=gpu, torch=torch_v, triton=triton_v, call=call, compared=what, shape=shape, kernel=kernel,
                     p=float(p), variant=name.strip(), cublas_gapped_us=float(cub_g), cublas_sustained_us=float(cub_s),
                     gapped_us=float(g), sustained_us=float(s),
                     gapped_vs_cublas=round(float(g) / float(cub_g), 4),
                     sustained_vs_cublas=round(float(s) / float(cub_s), 4)))


for call, (log, what) in CALLS.items():
    for line in open(os.path.join(raw, log)):
        if line.startswith("GPU "):
            gpu, torch_v, triton_v = header(line)
        m = line_pat.match(line.strip())
        if m:
            shape, kernel, p, cub_g, cub_s, rest = m.groups()
            for name, g, s in var_pat.findall(rest):
                row(call, what, shape, kernel, p, cub_g, cub_s, name, g, s)
# call 1's curve: each T5 product's time against p, p = 0 to 1
curve_what = "time against p (the part that does not shrink with the kept work)"
for line in open(os.path.join(raw, "call1_curve.log")):
    if line.startswith("GPU "):
        gpu, torch_v, triton_v = header(line)
    m = re.match(r"^T5 (fwd|dX|dW) cuBLAS ([\d.]+)/([\d.]+)$", line.strip())
    if m:
        kernel, cub_g, cub_s = m.groups()
    m = re.match(r"^p=([\d.]+): (.*)$", line.strip())
    if m:
        for name, g, s in var_pat.findall(m.group(2)):
            row(1, curve_what, "8192x768x3072", kernel, m.group(1), cub_g, cub_s, name, g, s)
with open(out + ".csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt


def ratio(call, new, old):
    """{(shape, kernel): [(p, gapped new/old, sustained new/old)]}"""
    got = {}
    pick = [r for r in rows if r["call"] == call and r["compared"] != curve_what]
    for r in pick:
        if r["variant"] != new:
            continue
        o = next(q for q in pick if q["variant"] == old and q["shape"] == r["shape"] and q["kernel"] == r["kernel"]
                 and q["p"] == r["p"])
        got.setdefault((r["shape"], r["kernel"]), []).append(
            (r["p"], r["gapped_us"] / o["gapped_us"], r["sustained_us"] / o["sustained_us"]))
    return got


panels = [
    ("host-built descriptors / built in the kernel (call 4, adopted)", ratio(4, "host", "device")),
    ("PDL after the lists / ordinary launch (call 5, not adopted)", ratio(5, "pdl", "plain")),
    ("zero tiles first / last (call 8, not adopted)", ratio(8, "zeros_first", "zeros_last")),
    ("listed tiles in turns / cooperative (call 1, not adopted)", ratio(1, "pingpong", "default")),
]
fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 4.6))
for ax, (title, data) in zip(axes, panels):
    for i, ((shape, kernel), pts) in enumerate(data.items()):
        colour = f"C{i % 10}"
        ax.plot([p for p, _, _ in pts], [g for _, g, _ in pts], marker="o", color=colour, label=f"{shape} {kernel}")
        ax.plot([p for p, _, _ in pts], [s for _, _, s in pts], marker="x", ls=":", color=colour)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("p")
    ax.set_ylabel("time ratio (solid: L2 flushed; dotted: back to back)", fontsize=7)
    ax.legend(fontsize=5)
ax = axes[-1]
for i, kernel in enumerate(("fwd", "dX", "dW")):
    pts = [(r["p"], r["gapped_vs_cublas"]) for r in rows
           if r["compared"] == curve_what and r["kernel"] == kernel and r["variant"] == "default"]
    ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", color=f"C{i}", label=f"T5 {kernel}")
ax.plot([0, 1], [1, 0], color="grey", ls="--", lw=0.8, label="ideal (1 - p) x cuBLAS")
ax.set_title("T5 products against p, x cuBLAS dense (call 1, L2 flushed)", fontsize=8)
ax.set_xlabel("p")
ax.legend(fontsize=6)
fig.suptitle(f"Hopper kernels, session 28 ({gpu}, torch {torch_v}, triton {triton_v}; CUDA-graph medians, "
             "mean of 3 fresh masks per p)", fontsize=9)
fig.tight_layout()
fig.savefig(out + ".png", dpi=110)
print(len(rows), "rows ->", out + ".csv")

"""Session 24's per-kernel logs (calls 2 and 4) as one CSV and a plot:
benchmarks/results/portable_loads_nvidia-h200.{csv,png}. Values exactly as logged (CUDA-graph
medians in us, one H200); run from the repository root."""
import csv, re
from pathlib import Path

RAW = Path("benchmarks/results/raw/session24")
OUT = Path("benchmarks/results/portable_loads_nvidia-h200")
rows = []
for call, name in (("call2", "call2_sweep.log"), ("call4", "call4_sweep_align.log")):
    text = (RAW / name).read_text().splitlines()
    gpu, torch_v, triton_v = re.match(r"GPU (.+) (\S+) (\S+)$", text[0]).groups()
    for line in text[1:]:
        if call == "call2":
            m = re.match(r"(\d+)x(\d+)x(\d+) p=([\d.]+): cublas fwd/dx/dw ([\d.]+)/([\d.]+)/([\d.]+) \| tma ([\d.]+)/([\d.]+)/([\d.]+) .*\| ptr ([\d.]+)/([\d.]+)/([\d.]+)", line)
            if not m:
                continue
            M, N, K, p, *v = m.groups()
            dtype = "bfloat16"
            variants = {"tma": v[3:6], "pointer_no_hint": v[6:9]}
        else:
            m = re.match(r"(\w+) (\d+)x(\d+)x(\d+) p=([\d.]+): cublas ([\d.]+)/([\d.]+)/([\d.]+) \| (.*)", line)
            if not m:
                continue
            dtype, M, N, K, p, *rest = m.groups()
            v = rest[:3]
            variants = {}
            for part in rest[3].split(" | "):
                key, times = re.match(r"(\w+) ([\d./]+) ", part).groups()
                variants[{"tma": "tma", "ptr": "pointer_hint", "ptr_noalign": "pointer_no_hint"}[key]] = times.split("/")
        cublas = v[:3]
        for variant, times in variants.items():
            for kernel, t, c in zip(("fwd_dsd", "dx_sdd", "dw_dsd_tn"), times, cublas):
                rows.append(dict(gpu=gpu, torch=torch_v, triton=triton_v, source=f"session24 {call}", dtype=dtype,
                                 shape=f"{M}x{N}x{K}", p=p, kernel=kernel, variant=variant, us=t, cublas_us=c))
OUT.with_suffix(".csv").parent.mkdir(parents=True, exist_ok=True)
with open(OUT.with_suffix(".csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(14, 5))
# left: call 2, pointer / TMA time per kernel at p = 0.1 and 0.5 over shapes
c2 = [r for r in rows if r["source"].endswith("call2")]
# 6000x2000x3000 is the right panel; 16384x768x768 is launch-bound (pointer loads either way)
shapes = sorted({r["shape"] for r in c2 if r["shape"] not in ("6000x2000x3000", "16384x768x768")}, key=lambda s: [int(x) for x in s.split("x")])
for i, kernel in enumerate(("fwd_dsd", "dx_sdd", "dw_dsd_tn")):
    for p, marker in (("0.1", "o"), ("0.5", "s")):
        ratio = []
        for s in shapes:
            t = {r["variant"]: float(r["us"]) for r in c2 if r["shape"] == s and r["p"] == p and r["kernel"] == kernel}
            ratio.append(t["pointer_no_hint"] / t["tma"])
        axes[0].plot(range(len(shapes)), ratio, marker=marker, color=f"C{i}", label=f"{kernel}, p={p}")
axes[0].axhline(1.0, color="grey", lw=0.8)
axes[0].set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
axes[0].set_ylabel("pointer loads / TMA loads (time)")
axes[0].set_title("Portable kernels alone, bf16 (below 1: pointer faster)")
axes[0].legend(fontsize=7)
# right: call 4, the three kernels' sum against cuBLAS at 6000x2000x3000
c4 = [r for r in rows if r["source"].endswith("call4") and r["shape"] in ("6000x2000x3000",)]
labels, vals = [], []
for dtype in ("bfloat16", "float32"):
    for variant in ("tma", "pointer_hint", "pointer_no_hint"):
        for p in ("0.0", "0.1", "0.5"):
            sel = [r for r in c4 if r["dtype"] == dtype and r["variant"] == variant and r["p"] == p]
            if sel:
                labels.append(f"{dict(bfloat16='bf16', float32='fp32')[dtype]} {variant} p={p}")
                vals.append(sum(float(r["us"]) for r in sel) / sum(float(r["cublas_us"]) for r in sel))
axes[1].barh(range(len(vals)), vals, color=["C3" if "no_hint" in l else "C0" if "tma" in l else "C2" for l in labels])
axes[1].set_yticks(range(len(vals)), labels, fontsize=7)
axes[1].set_xscale("log")
axes[1].axvline(1.0, color="grey", lw=0.8)
axes[1].set_xlabel("three kernels' time / cuBLAS's three products (log)")
axes[1].set_title("6000x2000x3000: the alignment hint")
fig.suptitle(f"{rows[0]['gpu']}, torch {rows[0]['torch']}, triton {rows[0]['triton']}, CUDA-graph medians")
fig.tight_layout()
fig.savefig(OUT.with_suffix(".png"), dpi=110)
print(len(rows), "rows")

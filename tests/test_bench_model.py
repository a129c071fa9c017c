"""benchmarks/bench_model.py end to end on CPU (its --smoke mode: demo-size models, aot_eager, 2 steps):
both backends compiled, timed in alternating rounds (the default) or one after the other, rows
and ratios written. The GPU figures come from the same code paths."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"


def _rows(out_dir: Path) -> list[dict]:
    (csv_path,) = out_dir.glob("model_*.csv")
    with open(csv_path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("timing", ["interleaved", "sequential"])
def test_smoke_run_writes_both_backends_rows_with_their_timing(tmp_path, timing):
    args = [sys.executable, str(_SCRIPT), "--smoke", "--models", "bert", "--ps", "0.1",
            "--rounds", "2", "--out", str(tmp_path)] + (["--sequential"] if timing == "sequential" else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(tmp_path)
    assert sorted(r["backend"] for r in rows) == ["inductor", "sparsedrop"]
    for r in rows:
        assert r["timing"] == timing and not r["error"], r
        assert int(r["steps"]) == 2 and float(r["median_ms"]) > 0 and float(r["compile_s"]) >= 0
    sd_row = next(r for r in rows if r["backend"] == "sparsedrop")
    assert int(sd_row["sites_rewritten"]) > 0 and float(sd_row["speedup_vs_inductor"]) > 0
    assert "compile phases (sparsedrop, s)" in proc.stdout


def test_cuda_graph_mode_reports_graphs_it_could_not_capture(tmp_path):
    """Under --mode reduce-overhead the log says how many compiled graphs Inductor left outside
    CUDA graphs (a step then times the host again); on CPU tensors none can be captured."""
    args = [sys.executable, str(_SCRIPT), "--smoke", "--models", "bert", "--ps", "0.1",
            "--mode", "reduce-overhead", "--out", str(tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "CUDA graphs:" in line]
    assert lines and all("graph(s) not captured" in line for line in lines), proc.stdout[-3000:]
    assert any(not line.strip().startswith("CUDA graphs: 0 ") for line in lines), lines

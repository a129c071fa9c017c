"""The regularisation study (benchmarks/regularisation.py) at its tiny size on CPU.

The study runs once (every task, the four arms, 2 p values, 1 seed, a few steps; aot_eager);
the tests check what it wrote, that the block and both arms' compiled models really drop whole
blocks (the both arm on the linears' outputs too), and the summary arithmetic (best p,
time-to-quality) on rows made up for the purpose.
"""
import csv
import importlib.util
import math
import platform
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "regularisation.py"
PS = (0.3, 0.6)
ARMS = ("none", "element", "block", "both")
BLOCK_ARMS = ("block", "both")


def _load_script():
    spec = importlib.util.spec_from_file_location("regularisation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reg():
    return _load_script()


@pytest.fixture(scope="module")
def study(reg, tmp_path_factory):
    out = tmp_path_factory.mktemp("regularisation")
    # One intra-op thread: these ops are tiny, and two threads on a shared small CPU stall
    # each other far more than they gain.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = reg.main(["--task", "all", "--size", "tiny", "--device", "cpu", "--seeds", "1",
                       "--arms", *ARMS, "--ps", *map(str, PS), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return rc, out / "regularisation_cpu_tiny"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_study_writes_one_row_per_run(reg, study):
    rc, stem = study
    assert rc == 0
    rows = _rows(Path(f"{stem}.csv"))
    assert list(rows[0]) == reg.RUN_FIELDS
    runs = {(r["task"], r["arm"], float(r["p"])) for r in rows}
    expected = {(t, "none", 0.0) for t in reg.TASKS} | {(t, a, p) for t in reg.TASKS for a in ("element", *BLOCK_ARMS) for p in PS}
    assert runs == expected and len(rows) == len(expected)
    for r in rows:
        where = f"{r['task']} {r['arm']} p={r['p']}"
        assert r["error"] == "", where
        assert math.isfinite(float(r["best_val_loss"])) and math.isfinite(float(r["final_train_loss"])), where
        assert float(r["median_step_ms"]) > 0 and float(r["train_s"]) > 0, where
        assert r["python"] == platform.python_version() and r["device"] == "cpu" and r["torch"], where
        cfg = reg.SIZES[r["task"]]["tiny"]
        evals = r["eval_steps"].split(";")
        assert len(evals) == len(r["eval_train_s"].split(";")) == len(r["eval_val"].split(";")) == math.ceil(cfg.steps / cfg.eval_every)
        assert r["best_step"] in evals and float(r["best_step"]).is_integer()
        if r["task"] == "gpt":
            assert r["corpus"].startswith(f"python {platform.python_version()} stdlib"), r["corpus"]
        else:
            assert 0 <= float(r["best_val_acc"]) <= 1, where
        if r["arm"] in BLOCK_ARMS:
            # Every dropout of the block and both arms became block dropout: none stayed element-wise.
            assert int(r["sites_rewritten"]) == int(r["sites_total"]) > 0, where
            assert r["compiler"] == "sparsedrop" and r["block_size"] == "x".join(map(str, cfg.block_size)), where
        else:
            assert r["compiler"] == "aot_eager" and r["block_size"] == "", where
        assert r["model"].endswith("+output dropout") == (r["arm"] == "both"), where
    # The both arm has the block arm's dropouts plus one on the output of each linear but the head.
    sites = {(r["task"], r["arm"]): int(r["sites_total"]) for r in rows if r["arm"] in BLOCK_ARMS}
    for task in reg.TASKS:
        cfg = reg.SIZES[task]["tiny"]
        assert sites[task, "both"] - sites[task, "block"] == (2 if task == "digits-mlp" else 4 * cfg.layers), task
    curves = _rows(Path(f"{stem}_curves.csv"))
    assert len(curves) == sum(len(r["eval_steps"].split(";")) for r in rows)
    assert all(math.isfinite(float(c["val_loss"])) and math.isfinite(float(c["train_loss"])) for c in curves)


def test_study_writes_summary_plot_and_site_tables(reg, study):
    _, stem = study
    md = Path(f"{stem}.md").read_text()
    assert "| task | arm | best p |" in md and "time-to-quality (gpt)" in md
    for task in reg.TASKS:
        assert f"| {task} | block | " in md and f"| {task} | both | " in md
        sites = Path(f"{stem}_sites_{task}.txt").read_text()
        assert "rewritten" in sites and " no " not in sites  # explain's table, no site left as it was
        assert "yes (both)" not in sites  # the block arm: input side only
        both = Path(f"{stem}_sites_{task}_both.txt").read_text()
        assert "rewritten" in both and " no " not in both and "yes (both)" in both
    mlp_both = Path(f"{stem}_sites_digits-mlp_both.txt").read_text()
    assert "both (aot_eager, mode default), output:" in mlp_both and "both (aot_eager, mode default), input grad:" in mlp_both
    assert Path(f"{stem}.png").stat().st_size > 10_000


@pytest.mark.parametrize("task", ["digits-mlp", "digits-vit", "gpt"])
def test_block_arm_rewrites_every_dropout(reg, task):
    cfg = reg.SIZES[task]["tiny"]
    report = reg.explain_task(task, cfg, 0.3, "cpu")
    assert report.rewritten and not report.skipped, str(report)
    kinds = {s.kind for s in report.sites}
    assert kinds == ({"linear"} if task == "digits-mlp" else {"linear", "attention"})
    # A dropout before each linear (the ViT's patch embedding has none) and one per attention.
    linears = {"digits-mlp": 3, "digits-vit": 4 * cfg.layers + 1, "gpt": 4 * cfg.layers + 1}[task]
    assert sum(s.kind == "linear" for s in report.sites) == linears


@pytest.mark.parametrize("task", ["digits-mlp", "digits-vit", "gpt"])
def test_both_arm_rewrites_both_sides_of_every_linear(reg, task):
    """explain on the both arm's model: every dropout block-dropped, each linear with a dropout
    on its output fused on both sides (both rows say so), the head on its input side only."""
    cfg = reg.SIZES[task]["tiny"]
    report = reg.explain_task(task, cfg, 0.6, "cpu", "both")
    assert report.rewritten and not report.skipped, str(report)
    both = reg.both_sided_dropouts(task, cfg)
    linears = 2 if task == "digits-mlp" else 4 * cfg.layers
    assert len(both) == 2 * linears
    for site in report.sites:
        if site.kind == "attention":
            assert site.side is None, str(report)
        elif site.module_path in both:
            assert site.side == "both" and site.block_size == cfg.block_size, str(report)
        else:  # the head's input dropout, the one linear without an output dropout
            head = "layers.2.drop" if task == "digits-mlp" else "head.drop"
            assert site.module_path == head and site.side == "input", str(report)
    assert {s.module_path for s in report.sites if s.side == "both"} == both


@pytest.fixture(scope="module")
def unit_zeros(reg):
    cfg = reg.SIZES["digits-mlp"]["tiny"]
    return {arm: reg.unit_blocks(arm, cfg, 0.5, "cpu", "aot_eager", "default") for arm in ("element", "both")}


@pytest.mark.parametrize("side", ["output", "input_grad"])
def test_compiled_both_arm_drops_whole_blocks_on_both_sides(unit_zeros, side):
    """The both arm's first MLP unit (dropout -> linear -> dropout), compiled: the zeros of its
    output (the output mask) and of x's gradient (the input mask) are whole tiles, new at every
    call; scattered elements under element dropout."""
    both = unit_zeros["both"][side]
    assert both["partial_tiles"] == 0, both
    assert 0 < both["dropped_fraction"] < 1 and both["masks_vary"], both
    element = unit_zeros["element"][side]
    assert element["partial_tiles"] > 0 and element["dropped_fraction"] == 0, element


def test_compiled_block_arm_drops_whole_blocks(reg):
    """x's gradient is zero exactly where the first layer's dropout mask is: whole tiles in the
    block arm (and new tiles at every call), scattered elements in the element arm."""
    cfg = reg.SIZES["digits-mlp"]["tiny"]
    block = reg.input_grad_blocks("block", cfg, 0.5, "cpu", "aot_eager", "default")
    assert block["partial_tiles"] == 0, block
    assert 0 < block["dropped_fraction"] < 1 and block["masks_vary"], block
    element = reg.input_grad_blocks("element", cfg, 0.5, "cpu", "aot_eager", "default")
    assert element["partial_tiles"] > 0 and element["dropped_fraction"] == 0, element


def test_summary_best_p_and_time_to_quality(reg):
    """Best p by the mean over seeds; time-to-quality per seed against the element arm's best."""
    def run(arm, p, seed, losses, times):
        return {"task": "gpt", "arm": arm, "p": p, "seed": seed, "error": "", "best_val_loss": min(losses),
                "best_train_s": times[losses.index(min(losses))], "eval_val": ";".join(map(str, losses)),
                "eval_train_s": ";".join(map(str, times))}

    rows = [
        run("element", 0.2, 0, [2.0, 1.5, 1.6], [1.0, 2.0, 3.0]), run("element", 0.2, 1, [2.0, 1.4, 1.5], [1.0, 2.0, 3.0]),
        run("element", 0.4, 0, [2.0, 1.7, 1.6], [1.0, 2.0, 3.0]), run("element", 0.4, 1, [2.0, 1.7, 1.6], [1.0, 2.0, 3.0]),
        run("block", 0.3, 0, [1.5, 1.3, 1.2], [0.5, 1.0, 1.5]), run("block", 0.3, 1, [1.9, 1.8, 1.45], [0.5, 1.0, 1.5]),
        {"task": "gpt", "arm": "block", "p": 0.5, "seed": 0, "error": "boom"},
    ]
    assert reg.best_p(rows, "gpt", "element") == 0.2 and reg.best_p(rows, "gpt", "block") == 0.3
    ttq = reg.time_to_quality(rows)
    # Seed 0: target 1.5 reached at 0.5 s against 2.0 s; seed 1: target 1.4 never reached.
    assert ttq["ratios"] == [0.25] and ttq["missed"] == [1] and ttq["seeds"] == 2


def test_arms_default_and_unknown(reg, capsys):
    """The both arm runs on request; the default stays the three arms the GPU budget is for."""
    assert reg.parse_args([]).arms == ["none", "element", "block"]
    assert reg.parse_args(["--arms", "both"]).arms == ["both"]
    with pytest.raises(SystemExit):
        reg.parse_args(["--arms", "none", "sideways"])
    assert "expected one of none, element, block, both" in capsys.readouterr().err


def test_cli_runs_the_study_as_a_benchmark():
    from sparsedrop_compile.cli import BENCHMARKS

    assert BENCHMARKS["regularisation"] == "regularisation.py"
    assert (ROOT / "benchmarks" / BENCHMARKS["regularisation"]).is_file()

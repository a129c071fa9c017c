"""sparsedrop_compile.harness, what the benchmarks, the demo and the training tests share: the
training step equals the loop it replaced, the CPU timer, environment columns, CSV and plots."""
import copy
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparsedrop_compile import harness


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


@pytest.mark.parametrize("autocast,clip", [(None, 0.0), ("cpu", 0.0), (None, 0.05)])
def test_train_step_is_the_loop_it_replaced(autocast, clip):
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    a, b = _model(), _model()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "cpu"):
            loss = nn.functional.mse_loss(a(x).float(), y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(a.parameters(), clip)
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        got = harness.train_step(lambda: nn.functional.mse_loss(b(x).float(), y), opt_b, autocast=autocast, clip=clip)
        assert not got.requires_grad and torch.equal(got, loss.detach())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb) and pb.grad is None


def test_time_calls_on_cpu_returns_times_and_results():
    calls = iter(range(3))
    times, outs = harness.time_calls(lambda: next(calls), 3, "cpu")
    assert outs == [0, 1, 2] and len(times) == 3 and all(t >= 0 for t in times)


def test_environment_columns_in_the_order_asked():
    env = harness.environment("cpu", ("torch", "cuda", "python", "triton", "transformers"), cpu="cpu-smoke")
    assert list(env) == ["gpu", "torch", "cuda", "python", "triton", "transformers"]
    assert env["gpu"] == "cpu-smoke" and env["torch"] == torch.__version__ and env["python"] == platform.python_version()
    assert env["cuda"] == (torch.version.cuda or "none")
    with pytest.raises(ValueError, match="no field 'numpy'"):
        harness.versions("numpy")


@pytest.mark.parametrize("name,slug", [("NVIDIA H200", "nvidia-h200"), ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
                                       ("cpu-smoke", "cpu-smoke"), ("cpu-interpreter", "cpu-interpreter"), ("??", "gpu")])
def test_slug(name, slug):
    assert harness.slug(name) == slug


def test_csv_round_trip(tmp_path):
    path = tmp_path / "r.csv"
    assert harness.read_csv(path) == []
    harness.write_csv(path, [{"a": 1, "b": 2.5}, {"a": 3, "c": "x"}])  # columns: every key, first seen first
    assert harness.read_csv(path) == [{"a": "1", "b": "2.5", "c": ""}, {"a": "3", "b": "", "c": "x"}]
    harness.write_csv(path, [{"a": 1, "b": 2, "extra": 0}], ["b", "a"])  # given columns; others left out
    assert path.read_text().splitlines() == ["b,a", "2,1"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]  # no temporary file left behind


def test_save_figure(tmp_path):
    plt = harness.pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    harness.save_figure(fig, tmp_path / "f.png", dpi=50)
    assert (tmp_path / "f.png").stat().st_size > 0 and not plt.get_fignums()


def test_import_needs_no_matplotlib():
    code = "import sys, sparsedrop_compile.harness; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)

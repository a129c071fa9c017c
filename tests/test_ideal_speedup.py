"""benchmarks/ideal_speedup.py: issue 12's physical limit of a step under block dropout, from
explain's sites, FLOPs per module and the baseline's kernel times."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sparsedrop_compile as sd
from sparsedrop_compile.report import Site

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "ideal_speedup.py"
_spec = importlib.util.spec_from_file_location("ideal_speedup", _PATH)
ideal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ideal)


def _site(kind, side=None, consumers=(), producer=None, module_path="", rewritten=True):
    return Site(0, "n", "loc", module_path, 0.3, kind, list(consumers), rewritten, None, side=side, producer=producer)


def test_site_fractions_per_side():
    sites = [
        _site("linear", "input", ["linear a.q", "linear a.k"]),
        _site("linear", "both", ["linear ffn.wo"]),  # the dropout before wo
        _site("linear", "both", ["add"], producer="linear ffn.wo"),  # the dropout after wo
        _site("linear", "output", ["add"], producer="linear a.o"),
        _site("attention", module_path="a"),
        _site("linear", "input", ["linear skipped"], rewritten=False),
    ]
    mm, attn = ideal.site_fractions(sites, 0.3)
    assert mm == pytest.approx({"a.q": 0.3, "a.k": 0.3, "a.o": 0.3, "ffn.wo": 1 - 0.7**2})
    assert attn == pytest.approx({"a": 3 / 7 * 0.3})


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
        self.drop = torch.nn.Dropout(0.25)

    def forward(self, x):
        return self.down(self.drop(F.relu(self.up(x))))


def test_skipped_shares_from_a_real_report_and_flop_counts():
    """One rewritten site (dropout -> down): p = 0.25 of down's FLOPs, out of both linears', are
    skipped; the limit and speed-up follow the formula."""
    model = torch.nn.Sequential(_Block()).train()
    x = torch.randn(256, 32)
    report = sd.explain(model, x, options={"block_size": 16, "output_side": False})
    assert [s.consumers for s in report.rewritten] == [["linear 0.down"]]
    mm_flops, attn_flops = ideal.module_flops(model, lambda: model(x).sum().backward())
    # down: forward, dX and dW; up (its input needs no gradient): forward and dW. Same sizes.
    assert mm_flops["0.down"] == 3 * 2 * 256 * 32 * 64 and mm_flops["0.up"] == 2 * 2 * 256 * 32 * 64
    assert attn_flops[""] == 0
    mm_share, attn_share = ideal.skipped_shares(report.sites, 0.25, mm_flops, attn_flops)
    total = mm_flops[""]
    assert mm_share == pytest.approx(0.25 * mm_flops["0.down"] / total) and attn_share == 0
    assert ideal.ideal_speedup(10.0, 9.0, 4.0, 0.0, 0.125, 0.0) == pytest.approx(10.0 / (9.0 - 0.5))
    with pytest.raises(ValueError, match="not positive"):
        ideal.ideal_speedup(10.0, 1.0, 4.0, 0.0, 0.5, 0.0)


def test_kernel_times_on_cpu_count_the_matmul_ops():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    matmul_ms, attention_ms, total_ms = ideal.kernel_ms(lambda: a @ b, "cpu", steps=2)
    assert matmul_ms > 0 and attention_ms == 0 and total_ms >= matmul_ms

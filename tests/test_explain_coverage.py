"""explain lists every dropout a forward executes: across graph breaks, in graphs that run once per
layer, and outside every compiled graph (with the reason)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsedrop_compile as sd
from sparsedrop_compile.models import build_model, example_batch

OPTS = {"block_size": 8}


def _count_dropout_calls(monkeypatch, fn, *args, **kwargs):
    """Dropout calls of one eager forward, counted by wrapping F.dropout (not the way explain does it)."""
    calls = []
    original = F.dropout

    def counting(x, p=0.5, training=True, inplace=False):
        calls.append(p)
        return original(x, p, training, inplace)

    monkeypatch.setattr(torch.nn.functional, "dropout", counting)
    try:
        fn(*args, **kwargs)
    finally:
        monkeypatch.setattr(torch.nn.functional, "dropout", original)
    return len(calls)


class Block(nn.Module):
    def __init__(self, gate=None):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.lin = nn.Linear(32, 32)
        self.gate = gate

    def forward(self, x):
        y = self.lin(self.drop(x))
        if self.gate == "print":
            print("between", end="")  # graph break inside the layer: the frame is compiled once, run per layer
        return y


class Net(nn.Module):
    def __init__(self, between):
        super().__init__()
        self.blocks = nn.ModuleList([Block("print" if between == "inside" else None) for _ in range(3)])
        self.between = between

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.between == "print":
                print("layer", i, end="")
            elif self.between == "item" and x.sum().item() > 1e9:  # data-dependent branch: a graph break
                x = x * 0
        return x


@pytest.mark.parametrize("between", ["print", "item", "inside"])
def test_every_dropout_of_a_graph_breaking_model_is_listed(between, monkeypatch):
    model = Net(between).train()
    x = torch.randn(48, 32)
    report = sd.explain(model, x, options=OPTS)
    assert len(report.sites) == _count_dropout_calls(monkeypatch, model, x) == 3
    assert all(s.rewritten and s.kind == "linear" for s in report.sites), str(report)
    # One row per block, named as model.named_modules() names it (a graph run again for the next
    # block gets that block's name).
    assert [s.module_path for s in report.sites] == ["blocks.0.drop", "blocks.1.drop", "blocks.2.drop"], str(report)


def test_dropout_outside_every_graph_is_listed_with_the_reason(monkeypatch):
    class Eager(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 32))
            self.b = nn.Sequential(nn.Dropout(0.3), nn.Linear(32, 32))

        def forward(self, x):
            return self.tail(self.a(x))

        @torch.compiler.disable
        def tail(self, x):
            return self.b(x)

    model = Eager().train()
    x = torch.randn(48, 32)
    report = sd.explain(model, x, options=OPTS)
    assert len(report.sites) == _count_dropout_calls(monkeypatch, model, x) == 2
    inside, outside = report.sites
    assert inside.rewritten and inside.module_path == "a.0"
    assert outside.graph is None and not outside.rewritten and outside.module_path == "b.0"
    assert outside.p == pytest.approx(0.3)
    assert outside.reason.startswith("ran outside any compiled graph")
    assert outside.row()[0] == "-" and "ran outside any compiled graph" in str(report)


def test_explain_replay_leaves_rng_and_buffers_as_one_forward_would():
    model = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 32), nn.BatchNorm1d(32)).train()
    twin = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 32), nn.BatchNorm1d(32)).train()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(48, 32)
    torch.manual_seed(0)
    sd.explain(model, x, options=OPTS)
    after_explain = torch.rand(4)
    torch.manual_seed(0)
    torch.compile(twin, backend="sparsedrop", options={**OPTS, "inner": "eager"})(x)
    assert torch.equal(after_explain, torch.rand(4))
    torch.testing.assert_close(model[2].running_mean, twin[2].running_mean)
    assert model[2].num_batches_tracked.item() == 1


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_hf_models_with_graph_breaks_list_every_dropout(family, monkeypatch):
    """Gradient checkpointing makes these models graph-break on transformers 5.x (HF's warning_once,
    T5's position_bias.requires_grad = True, where Dynamo then runs whole block frames eagerly)."""
    torch.manual_seed(0)
    model = build_model(family, attn="eager").train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    batch = example_batch(model, seq=32)
    report = sd.explain(model, **batch, options={"block_size": 16})
    assert len(report.sites) == _count_dropout_calls(monkeypatch, model, **batch)
    assert report.rewritten
    for site in report.sites:
        assert site.rewritten or site.reason, site.row()


_OPTION_FORMS = {
    "dict": {"block_size": 8},
    "config": sd.SparseDropConfig(block_size=8),
    "dict_inner_inductor": {"block_size": 8, "inner": "inductor"},
    "config_inner_inductor": sd.SparseDropConfig(block_size=8, inner="inductor"),
}


@pytest.mark.parametrize("form", sorted(_OPTION_FORMS))
def test_explain_runs_rewritten_graphs_eagerly_whatever_form_the_options_take(form, monkeypatch):
    """explain(options=dict) and explain(options=SparseDropConfig(...)) behave alike: the rewritten
    graph runs eagerly (no Inductor compile, also when the options name Inductor as the inner
    compiler) and the rows are the same."""
    import torch._inductor.compile_fx as compile_fx

    def no_inductor(*args, **kwargs):
        raise AssertionError("explain compiled a graph with Inductor")

    monkeypatch.setattr(compile_fx, "compile_fx", no_inductor)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(32, 24, generator=gen), torch.randn(16, 24, generator=gen)
    fn = lambda x, w: F.linear(F.dropout(x, 0.2, True), w).relu()  # noqa: E731
    report = sd.explain(fn, x, w, options=_OPTION_FORMS[form])
    assert [(s.kind, s.rewritten, s.side, s.block_size) for s in report.sites] == [("linear", True, "input", (8, 8))]

"""The dropout -> matmul pass matches each supported chain, and nothing else."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sparsedrop_compile as sd

OPTS = {"block_size": 8, "inner": "eager"}  # small blocks: enough of them over these activations (max_drop_all)


def _compile_run(fn, *args, options=OPTS, dynamic=False, fullgraph=True):
    compiled = torch.compile(fn, backend="sparsedrop", options=options, dynamic=dynamic, fullgraph=fullgraph)
    return compiled(*args)


class Chain(nn.Module):
    """dropout -> <chain> -> consumer, built per test."""

    def __init__(self, body):
        super().__init__()
        self.lin = nn.Linear(32, 24)
        self.w2 = nn.Parameter(torch.randn(32, 24))
        self.b2 = nn.Parameter(torch.randn(24))
        self.body = body

    def forward(self, x):
        return self.body(self, x)


POSITIVE = {
    "linear_2d": (lambda m, x: m.lin(F.dropout(x, 0.2, True)), (40, 32), "linear_fused"),
    "linear_3d": (lambda m, x: m.lin(F.dropout(x, 0.2, True)), (3, 20, 32), "linear_fused"),
    "linear_no_bias": (lambda m, x: F.linear(F.dropout(x, p=0.2, training=True), m.lin.weight), (3, 20, 32), "linear_fused"),
    "linear_cast": (lambda m, x: m.lin(F.dropout(x.double(), 0.2, True).to(torch.float32)), (3, 20, 32), "linear_fused"),
    "linear_float": (lambda m, x: m.lin(F.dropout(x, 0.2, True).float()), (3, 20, 32), "linear_fused"),
    "linear_type_as": (lambda m, x: m.lin(F.dropout(x.double(), 0.2, True).type_as(x)), (3, 20, 32), "linear_fused"),
    "linear_view": (lambda m, x: m.lin(F.dropout(x, 0.2, True).view(-1, 32)), (3, 20, 32), "linear_fused"),
    "linear_reshape_contig": (lambda m, x: m.lin(F.dropout(x, 0.2, True).reshape(60, 32).contiguous()), (3, 20, 32), "linear_fused"),
    "linear_scalar_mul": (lambda m, x: m.lin(F.dropout(x, 0.2, True) * 0.5), (3, 20, 32), "linear_fused"),
    "linear_scalar_rmul_div": (lambda m, x: m.lin(2.0 * F.dropout(x, 0.2, True) / 4), (3, 20, 32), "linear_fused"),
    "addmm": (lambda m, x: torch.addmm(m.b2, F.dropout(x, 0.2, True).view(-1, 32), m.w2), (3, 20, 32), "addmm_fused"),
    "mm": (lambda m, x: torch.mm(F.dropout(x, 0.2, True), m.w2), (40, 32), "mm_fused"),
    "matmul_3d": (lambda m, x: torch.matmul(F.dropout(x, 0.2, True), m.w2), (3, 20, 32), "matmul_fused"),
    "matmul_op_4d": (lambda m, x: F.dropout(x, 0.2, True) @ x.transpose(-1, -2), (2, 3, 20, 32), "matmul_fused"),
    "bmm": (lambda m, x: torch.bmm(F.dropout(x, 0.2, True), x.transpose(1, 2)), (3, 20, 32), "bmm_fused"),
    "matmul_batch_view": (lambda m, x: torch.matmul(F.dropout(x, 0.2, True).view(6, 20, 32), m.w2), (2, 3, 20, 32), "matmul_fused"),
}


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_supported_chain_matches_once(name):
    body, shape, counter = POSITIVE[name]
    model = Chain(body).train()
    _compile_run(model, torch.randn(shape))
    assert counters["sparsedrop"][counter] == 1, dict(counters["sparsedrop"])
    assert counters["sparsedrop"]["refused"] == 0


def test_several_matmul_users_share_one_mask():
    def body(m, x):
        d = F.dropout(x, 0.2, True)
        return m.lin(d), F.linear(d, m.lin.weight * 2), d + 1

    model = Chain(body).train()
    report = sd.explain(model, torch.randn(3, 20, 32), options=OPTS)
    assert counters["sparsedrop"]["linear_fused"] == 2
    (site,) = report.sites
    assert site.rewritten and site.kind == "linear"
    assert len(site.consumers) == 3  # two linears and the add


NEGATIVE = {
    "eval_flag": (lambda m, x: m.lin(F.dropout(x, 0.2, False)), "training=False"),
    "p_zero": (lambda m, x: m.lin(F.dropout(x, 0.0, True)), "p == 0"),
    "add_only": (lambda m, x: F.dropout(x, 0.2, True) + x, "no matmul consumer"),
    "layer_norm_only": (lambda m, x: F.layer_norm(F.dropout(x, 0.2, True), (32,)), "no matmul consumer"),
    "weight_operand": (lambda m, x: F.linear(x[0], F.dropout(m.lin.weight, 0.2, True)), "not its input"),
    "right_operand": (lambda m, x: torch.matmul(x, F.dropout(x, 0.2, True).transpose(-1, -2)), "no matmul consumer"),
    "transpose_between": (lambda m, x: m.lin(F.dropout(x, 0.2, True).transpose(0, 1)), "no matmul consumer"),
    "view_changes_last_dim": (lambda m, x: F.linear(F.dropout(x, 0.2, True).view(3, 40, 16), m.lin.weight[:, :16]), "no matmul consumer"),
    "inplace": (lambda m, x: m.lin(F.dropout(x.clone(), 0.2, True, True)), "inplace"),
    "tensor_mul": (lambda m, x: m.lin(F.dropout(x, 0.2, True) * x), "no matmul consumer"),
    "addmm_alpha": (lambda m, x: torch.addmm(m.b2, F.dropout(x[0], 0.2, True), m.w2, alpha=2.0), "alpha"),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_unsupported_chain_is_left_alone(name):
    body, reason = NEGATIVE[name]
    model = Chain(body).train()
    x = torch.randn(3, 20, 32)
    report = sd.explain(model, x, options=OPTS)
    fused = sum(v for k, v in counters["sparsedrop"].items() if k.endswith("_fused"))
    assert fused == 0, dict(counters["sparsedrop"])
    assert report.sites and not any(s.rewritten for s in report.sites)
    assert any(reason in (s.reason or "") for s in report.sites), [s.reason for s in report.sites]


def test_eval_mode_module_is_not_rewritten():
    model = Chain(lambda m, x: m.lin(F.dropout(x, 0.2, m.training))).eval()
    compiled = torch.compile(model, backend="sparsedrop", options=OPTS)
    x = torch.randn(40, 32)
    torch.testing.assert_close(compiled(x), model(x))
    assert sum(v for k, v in counters["sparsedrop"].items() if k.endswith("_fused")) == 0


def test_min_p_and_exclude_options_skip_sites():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Dropout(0.1), nn.Linear(32, 32))
            self.b = nn.Sequential(nn.Dropout(0.3), nn.Linear(32, 32))

        def forward(self, x):
            return self.b(self.a(x))

    x = torch.randn(48, 32)
    report = sd.explain(Two(), x, options={**OPTS, "min_p": 0.2})
    assert [s.rewritten for s in report.sites] == [False, True]
    assert "min_p" in report.sites[0].reason
    report = sd.explain(Two(), x, options={**OPTS, "exclude": ["b.*"]})
    assert [s.rewritten for s in report.sites] == [True, False]
    assert "exclude" in report.sites[1].reason
    report = sd.explain(Two(), x, options={**OPTS, "filter_fn": lambda site: site.module_path.startswith("b")})
    assert [s.rewritten for s in report.sites] == [False, True]


def test_dynamic_shapes_do_not_recompile():
    model = Chain(lambda m, x: m.lin(F.dropout(x, 0.2, True))).train()
    compiled = torch.compile(model, backend="sparsedrop", options=OPTS, dynamic=True)
    for rows in (17, 40, 91):
        assert compiled(torch.randn(2, rows, 32)).shape == (2, rows, 24)
    assert counters["sparsedrop"]["linear_fused"] == 1  # one graph for every size
    assert counters["stats"]["unique_graphs"] == 1


def test_explain_reports_location_and_consumers():
    model = nn.Sequential(nn.Dropout(0.25), nn.Linear(32, 8)).train()
    report = sd.explain(model, torch.randn(48, 32), options=OPTS)
    (site,) = report.sites
    assert site.module_path == "0" and site.p == pytest.approx(0.25)
    assert site.kind == "linear" and site.consumers == ["linear 1"]
    assert "test_pass_matching.py" not in site.location or ":" in site.location
    text = str(report)
    assert "rewritten" in text and "linear 1" in text
    assert model.training  # explain restores the mode it found


def test_debug_log_lists_sites(caplog):
    model = nn.Sequential(nn.Dropout(0.25), nn.Linear(32, 8)).train()
    with caplog.at_level("DEBUG", logger="sparsedrop_compile"):
        torch.compile(model, backend="sparsedrop", options=OPTS)(torch.randn(48, 32))
    assert any("linear 1" in r.getMessage() for r in caplog.records)

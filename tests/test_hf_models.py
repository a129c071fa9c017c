"""Real HuggingFace models from tiny configs: the expected sites are rewritten, and they train."""
import math

import pytest
import torch

import sparsedrop_compile as sd
from sparsedrop_compile.harness import train_step
from sparsedrop_compile.models import build_model, example_batch

# Small blocks and tiles, so that these small batches hold enough of them (max_drop_all).
OPTS = {"block_size": 8, "attention_block": (16, 16)}


def _paths(report, kind=None):
    return [c for s in report.sites if s.rewritten and (kind is None or s.kind == kind) for c in s.consumers]


def test_t5_sites():
    model = build_model("t5", attn="eager")
    report = sd.explain(model, **example_batch(model, seq=32), options=OPTS)  # decoder P @ V: 2 x 2 x 16 x 16
    consumers = _paths(report)
    # Every FFN's wo (2 encoder + 2 decoder layers).
    assert sum(c.endswith("DenseReluDense.wo") for c in consumers) == 4
    # Every eager P @ V: 2 encoder self, 2 decoder self, 2 cross attentions.
    assert len([s for s in report.sites if s.rewritten and s.kind == "matmul"]) == 6
    # Encoder output dropout -> every cross-attention k and v (one shared mask), decoder output -> lm_head.
    assert sum(".EncDecAttention.k" in c or ".EncDecAttention.v" in c for c in consumers) == 4
    assert "linear lm_head" in consumers
    # Residual dropouts only feed adds: not rewritten, with a reason.
    assert all(s.reason for s in report.sites if not s.rewritten)


def test_t5_gated_ffn_site():
    model = build_model("t5-gated", attn="eager")
    report = sd.explain(model, **example_batch(model), options=OPTS)
    assert sum(c.endswith("DenseReluDense.wo") for c in _paths(report, "linear")) == 4


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_bert_like_sites(family):
    model = build_model(family, attn="eager")
    report = sd.explain(model, **example_batch(model), options=OPTS)
    linear = _paths(report, "linear")
    # The embedding dropout feeds layer 0's q, k and v (and the residual add, materialised).
    assert sum(c.rsplit(".", 1)[-1] in ("query", "key", "value", "q_lin", "k_lin", "v_lin") for c in linear) == 3
    assert len([s for s in report.sites if s.rewritten and s.kind == "matmul"]) == 2  # P @ V per layer


def test_gpt2_sites():
    model = build_model("gpt2", attn="eager")
    report = sd.explain(model, **example_batch(model), options=OPTS)
    assert len([s for s in report.sites if s.rewritten and s.kind == "matmul"]) == 2
    assert not _paths(report, "linear")  # GPT-2's other dropouts feed residual adds only


def _train(family, attn, dtype, inner="aot_eager", steps=8, fullgraph=False):
    torch.manual_seed(0)
    model = build_model(family, attn=attn).train()
    batch = example_batch(model, batch=4, seq=24)
    compiled = torch.compile(model, backend="sparsedrop", options={**OPTS, "inner": inner}, fullgraph=fullgraph)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    amp = "cpu" if dtype == torch.bfloat16 else None
    return [train_step(lambda: compiled(**batch).loss, opt, autocast=amp).item() for _ in range(steps)]


@pytest.mark.parametrize(
    "family,attn,dtype",
    [
        ("t5", "eager", torch.float32),
        ("t5-gated", "eager", torch.bfloat16),
        ("bert", "eager", torch.float32),
        ("bert", "eager", torch.bfloat16),
        ("gpt2", "eager", torch.float32),
        ("gpt2", "eager", torch.bfloat16),
        ("distilbert", "eager", torch.float32),
        ("t5", "sdpa", torch.bfloat16),
        ("bert", "sdpa", torch.float32),
    ],
)
def test_models_train(family, attn, dtype):
    losses = _train(family, attn, dtype)
    assert all(math.isfinite(l) for l in losses), losses
    assert sum(losses[-2:]) / 2 < losses[0], losses
    fused = sum(v for k, v in torch._dynamo.utils.counters["sparsedrop"].items() if k.endswith("_fused"))
    assert fused > 0


@pytest.mark.parametrize("family,inner", [("t5", "inductor"), ("bert", "aot_eager")])
def test_fullgraph_compile(family, inner):
    # Inductor's C++ compile of a whole model takes minutes on 2 CPU cores: one model runs there.
    losses = _train(family, "eager", torch.float32, inner=inner, steps=3, fullgraph=True)
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0], losses
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_sdpa_attention_sites_are_rewritten(family):
    # Head dim 64 (the "demo" size), so the tile-dropout attention kernel covers these sites.
    model = build_model(family, size="demo", attn="sdpa")
    report = sd.explain(model, **example_batch(model, seq=64), options=OPTS)  # T5's decoder: 32 queries
    attention = [s for s in report.sites if s.kind == "attention"]
    expected = {"bert": 2, "gpt2": 2, "t5": 6}[family]  # self (and, for T5, cross) attention per layer
    assert len(attention) == expected and all(s.rewritten for s in attention), [(s.location, s.reason) for s in attention]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_sdpa_models_train_with_tile_dropout_attention(family):
    torch.manual_seed(0)
    model = build_model(family, size="demo", attn="sdpa").train()
    batch = example_batch(model, batch=2, seq=40)
    compiled = torch.compile(model, backend="sparsedrop", options={**OPTS, "inner": "aot_eager"})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [train_step(lambda: compiled(**batch).loss, opt).item() for _ in range(5)]
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0], losses
    assert torch._dynamo.utils.counters["sparsedrop"]["attention_fused"] == 2

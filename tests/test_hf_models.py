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
    # Residual dropouts drop a matmul's output: each attention's o (output side), each FFN's wo,
    # whose input dropout is fused into the same op (both sides, and so says the input's row).
    producers = [s.producer for s in report.sites if s.rewritten and s.producer]
    assert sum(p.endswith((".SelfAttention.o", ".EncDecAttention.o")) for p in producers) == 6
    sides = [(s.side, (s.producer or s.consumers[0]).rsplit(".", 1)[-1]) for s in report.sites if s.rewritten]
    assert sides.count(("both", "wo")) == 8 and sides.count(("output", "o")) == 6 and sides.count(("input", "SelfAttention")) == 4
    # Only the embedding dropouts (they feed a norm and the residual stream) stay, with both reasons.
    left = [s for s in report.sites if not s.rewritten]
    assert [s.module_path for s in left] == ["encoder.dropout", "decoder.dropout"]
    assert all("no matmul consumer" in s.reason and "no matmul producer: its input comes from embedding" in s.reason for s in left)


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
    # Every other dropout drops a dense layer's output on its way to the residual add.
    outputs = [s.producer.rsplit(".", 2)[-2:] for s in report.sites if s.side == "output"]
    expected = {"bert": [["output", "dense"]] * 4, "distilbert": [["ffn", "lin2"]] * 2}[family]  # DistilBERT: no dropout after out_lin
    assert outputs == expected, outputs
    assert all(s.rewritten for s in report.sites), [s.row() for s in report.sites if not s.rewritten]


def test_gpt2_sites():
    model = build_model("gpt2", attn="eager")
    report = sd.explain(model, **example_batch(model), options=OPTS)
    assert len([s for s in report.sites if s.rewritten and s.kind == "matmul"]) == 2
    assert not _paths(report, "linear")  # no dropout feeds a linear (Conv1D)
    # resid_dropout(c_proj(x)) in attention and MLP: GPT-2's Conv1D is an addmm.
    assert [s.producer.split(".", 2)[-1] for s in report.sites if s.side == "output"] == [
        "0.attn.c_proj", "0.mlp.c_proj", "1.attn.c_proj", "1.mlp.c_proj"]
    (left,) = [s for s in report.sites if not s.rewritten]  # the embedding dropout: no matmul on either side
    assert left.module_path == "transformer.drop" and "no matmul producer: its input comes from add" in left.reason


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


def test_bert_all_sites_match_block_dropout_with_the_same_masks(eager_block_dropout):
    """Tiny BERT under aot_eager, every dropout rewritten (input side: embeddings, P @ V; output
    side: the four residual dropouts) equals the eager model with each dropout replaced by block
    dropout of its input with the same keep flags (drawn in the same order): the output side's
    mask over (rows, hidden) is the input's non-batched layout. Loss and every gradient."""
    torch.manual_seed(0)
    model = build_model("bert", attn="eager").train()
    ref_model = build_model("bert", attn="eager").train()
    ref_model.load_state_dict(model.state_dict())
    batch = example_batch(model, batch=2, seq=48)
    compiled = torch.compile(model, backend="sparsedrop", options={"block_size": 16, "inner": "aot_eager"})
    torch.manual_seed(11)
    loss = compiled(**batch).loss
    loss.backward()
    fused = torch._dynamo.utils.counters["sparsedrop"]
    assert fused["linear_fused"] == 3 and fused["matmul_fused"] == 2 and fused["linear_out_fused"] == 4, dict(fused)

    eager_block_dropout((16, 16), lambda x: x.dim() == 4)  # attention probabilities: per (batch, head) matrix
    torch.manual_seed(11)
    ref_loss = ref_model(**batch).loss
    ref_loss.backward()
    eager_block_dropout.restore()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)

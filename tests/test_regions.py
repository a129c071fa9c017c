"""Dropouts inside higher-order-op bodies: activation checkpointing (torch and HF), wrap, and the
bodies the pass must leave alone (cond, autograd.Function).

The checkpoint's recomputation in backward must see the forward's mask: AOTAutograd saves the RNG
state (aot_eager: run_and_save_rng_state / run_with_rng_state) or the seed (Inductor:
inductor_seeds) of the keep sampling and replays it; the gradients below would differ otherwise.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import sparsedrop_compile as sd
from sparsedrop_compile.kernels.block_mask import apply_block_keep, sample_block_keep
from sparsedrop_compile.models import build_model, example_batch

P = 0.3
BLOCK = (8, 8)
X_SHAPE, W_SHAPE = (48, 32), (24, 32)  # 6 x 4 = 24 blocks
TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(X_SHAPE, generator=gen), torch.randn(W_SHAPE, generator=gen) / 6, torch.randn(W_SHAPE[0], generator=gen)


def _loss(out):
    return (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()


def _body(t, w, b):
    return F.linear(F.dropout(t, P, True), w, b).relu() * 2


def _reference(keep, x, w, b):
    return F.linear(apply_block_keep(x, keep, 1 / (1 - P), *BLOCK, False), w, b).relu() * 2


def _grads(fn, tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    _loss(out).backward()
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_dropout_linear_matches_reference(reentrant):
    """aot_eager: the keep sampling is the graph's first random op, so the same seed replays it."""
    tensors = _inputs()
    f = torch.compile(lambda x, w, b: checkpoint(_body, x, w, b, use_reentrant=reentrant), backend="sparsedrop",
                      options={"block_size": BLOCK, "inner": "aot_eager"})
    torch.manual_seed(5)
    got = _grads(f, tensors)
    torch.manual_seed(5)
    keep = sample_block_keep(tensors[0], P, *BLOCK, False)
    assert 0 < keep.float().mean() < 1
    expected = _grads(lambda x, w, b: _reference(keep, x, w, b), tensors)
    assert counters["sparsedrop"]["linear_fused"] == 1
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_checkpointed_dropout_under_inductor_uses_one_mask_for_forward_and_recomputation():
    """Inductor's own RNG (no fallback_random): the mask read off the materialised dropout output
    gives the reference that the output and every gradient (recomputed in backward) must equal."""
    def body(t, w, b):
        d = F.dropout(t, P, True)
        return F.linear(d, w, b).relu() * 2, d

    tensors = _inputs()
    leaves = [t.clone().requires_grad_() for t in tensors]
    f = torch.compile(lambda x, w, b: checkpoint(body, x, w, b, use_reentrant=False), backend="sparsedrop",
                      options={"block_size": BLOCK, "inner": "inductor"})
    out, dropped = f(*leaves)
    _loss(out).backward()
    keep = (dropped != 0).reshape(1, 6, 8, 4, 8)[:, :, 0, :, 0]  # x has no zeros
    assert 0 < keep.float().mean() < 1
    expected = _grads(lambda x, w, b: _reference(keep, x, w, b), tensors)
    assert counters["sparsedrop"]["linear_fused"] == 1
    for g, e in zip([out] + [t.grad for t in leaves], expected):
        torch.testing.assert_close(g, e, **TOL)


def test_explain_lists_sites_inside_regions_nested_and_wrap():
    from torch._higher_order_ops.wrap import wrap

    lin = nn.Linear(32, 24)

    def f(x):
        inner = lambda u: lin(F.dropout(u, 0.2, True))  # noqa: E731
        y = checkpoint(lambda t: checkpoint(inner, t, use_reentrant=False) * 2, x, use_reentrant=False)
        return y + wrap(lambda t: lin(F.dropout(t, 0.2, True)), x)

    report = sd.explain(f, torch.randn(X_SHAPE, requires_grad=True), options={"block_size": BLOCK})
    assert [(s.region, s.rewritten, s.kind) for s in report.sites] == [
        ("activation checkpoint > activation checkpoint", True, "linear"), ("wrap", True, "linear")]
    assert report.sites[0].node.count("wrap_body_") == 2  # the body attributes, outer first
    assert "[in activation checkpoint > activation checkpoint]" in str(report)


class _Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return F.linear(F.dropout(x, 0.2, True), w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


@pytest.mark.parametrize("case", ["autograd_function", "cond"])
def test_bodies_not_proven_safe_are_listed_and_left_alone(case):
    lin = nn.Linear(32, 24)
    if case == "cond":
        def f(x):
            return torch.cond(x.sum() > 0, lambda t: lin(F.dropout(t, 0.2, True)), lambda t: lin(t), (x,))
        hop = "cond"
    else:
        def f(x):
            return _Fn.apply(x, lin.weight)
        hop = "autograd_function_apply"
    report = sd.explain(f, torch.randn(X_SHAPE, requires_grad=True), options={"block_size": BLOCK})
    (site,) = report.sites
    assert not site.rewritten and site.region == f"{hop} body"
    assert f"inside the body of higher-order op {hop}" in site.reason
    assert sum(v for k, v in counters["sparsedrop"].items() if k.endswith("_fused")) == 0


def test_dropout_feeding_a_region_moves_into_it():
    """BERT's embedding dropout feeds layer 0's q, k, v: under checkpointing they are in the
    region's body, so the dropout is moved there and fused; the result is still block dropout."""
    lin = nn.Linear(32, 24)

    def f(x):
        d = F.dropout(x, P, True)
        return checkpoint(lambda t: lin(t).relu() * 2, d, use_reentrant=False)

    report = sd.explain(f, torch.randn(X_SHAPE), options={"block_size": BLOCK})
    (site,) = report.sites
    assert site.rewritten and site.region == "activation checkpoint" and site.kind == "linear"
    tensors = _inputs()
    g = torch.compile(lambda x, w, b: checkpoint(lambda t: F.linear(t, w, b).relu() * 2, F.dropout(x, P, True),
                                                 use_reentrant=False),
                      backend="sparsedrop", options={"block_size": BLOCK, "inner": "aot_eager"})
    torch.manual_seed(3)
    got = _grads(g, tensors)
    torch.manual_seed(3)
    keep = sample_block_keep(tensors[0], P, *BLOCK, False)
    for a, e in zip(got, _grads(lambda x, w, b: _reference(keep, x, w, b), tensors)):
        torch.testing.assert_close(a, e, **TOL)


def test_dropout_feeding_a_region_stays_outside_when_its_input_is_written_after_it():
    lin = nn.Linear(32, 24)

    def f(x):
        x = x * 1
        d = F.dropout(input=x, p=P, training=True)
        y = checkpoint(lambda t: lin(t).relu(), d, use_reentrant=False)
        x.add_(1)  # moving the dropout into the region would not change what it reads, but the
        return y, x  # fused op would save x for backward, and x is written afterwards

    report = sd.explain(f, torch.randn(X_SHAPE), options={"block_size": BLOCK})
    (site,) = report.sites
    assert not site.rewritten and site.region is None
    assert "inside the activation checkpoint region, but its input" in site.reason and "add_" in site.reason


def test_dropout_given_by_keyword_moves_into_the_region():
    lin = nn.Linear(32, 24)
    report = sd.explain(lambda x: checkpoint(lambda t: lin(t), F.dropout(input=x, p=P, training=True), use_reentrant=False),
                        torch.randn(X_SHAPE), options={"block_size": BLOCK})
    (site,) = report.sites
    assert site.rewritten and site.region == "activation checkpoint"


# --------------------------------------------------------------------------- HuggingFace
def _enable_checkpointing(model, method="activation_checkpointing_enable"):
    # transformers 5.x names it activation_checkpointing_enable where it exists (the old name warns).
    enable = getattr(model, method, None) or model.gradient_checkpointing_enable
    enable()
    assert model.is_gradient_checkpointing


def _no_cache(model):
    # With use_cache=True, HF logs a warning under checkpointing, and the logging call breaks the graph.
    for module in model.modules():
        if hasattr(module, "config"):
            module.config.use_cache = False


def _key(site):
    return (site.kind, site.rewritten, tuple(c.split(" ")[0] for c in site.consumers if c.startswith(("linear", "matmul"))))


def _same_sites(plain, ckpt):
    """Each checkpointed site matches one plain site: module path (the plain one may carry a longer
    root prefix, where a graph break moved the frame root), kind, rewritten and fused consumers."""
    left = list(plain.sites)
    for s in ckpt.sites:
        match = next((p for p in left if _key(p) == _key(s) and (p.module_path == s.module_path or p.module_path.endswith("." + s.module_path))), None)
        assert match is not None, f"no plain site like {s.row()}"
        left.remove(match)
    assert not left, [p.row() for p in left]


@pytest.mark.parametrize("method", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_hf_gradient_checkpointing_rewrites_the_same_sites(family, method):
    """Both names HF gives the switch (the old one where the new one is missing, as on 4.x)."""
    reports = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(family, attn="eager").train()
        _no_cache(model)
        if ckpt:
            _enable_checkpointing(model, method)
        reports.append(sd.explain(model, **example_batch(model, seq=32), options={"block_size": 16}))
    plain, ckpt = reports
    assert sum(s.rewritten for s in plain.sites) >= 2
    _same_sites(plain, ckpt)
    assert all(s.region == "activation checkpoint" for s in ckpt.sites if s.rewritten)


def test_checkpointed_hf_model_matches_reference_with_the_same_masks(eager_block_dropout):
    """Tiny BERT (attention dropout only, so every dropout is a rewritten P @ V site) with gradient
    checkpointing under aot_eager equals the uncheckpointed model run eagerly with block dropout of
    the same keep tiles (drawn in the same order): loss and every parameter gradient."""
    torch.manual_seed(0)
    model = build_model("bert", attn="eager")
    _no_cache(model)
    batch = example_batch(model, batch=2, seq=48)
    ref_model = build_model("bert", attn="eager")
    ref_model.load_state_dict(model.state_dict())
    for m in (model, ref_model):
        m.train()
        for name, mod in m.named_modules():
            if isinstance(mod, nn.Dropout) and not name.endswith("attention.self.dropout"):
                mod.p = 0.0  # residual/embedding dropouts off: they stay element-wise, with other RNG
    _enable_checkpointing(model)
    compiled = torch.compile(model, backend="sparsedrop", options={"block_size": 16, "inner": "aot_eager"})
    torch.manual_seed(11)
    loss = compiled(**batch).loss
    loss.backward()
    assert counters["sparsedrop"]["matmul_fused"] == 2

    eager_block_dropout((16, 16), lambda x: True)
    torch.manual_seed(11)
    ref_loss = ref_model(**batch).loss
    ref_loss.backward()
    eager_block_dropout.restore()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None:
            assert ref_params[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_hf_t5_gradient_checkpointing_rewrites_what_its_graph_breaks_allow():
    """T5 under checkpointing graph-breaks on transformers 5.x (position_bias.requires_grad = True),
    and Dynamo then runs some block frames eagerly. Every dropout rewritten without checkpointing
    is rewritten with it, or its row says why not: it ran outside every compiled graph, or its
    matmul consumer is in another graph (its only user there is the graph output)."""
    reports = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model("t5", attn="eager").train()
        _no_cache(model)
        if ckpt:
            _enable_checkpointing(model)
        reports.append(sd.explain(model, **example_batch(model, seq=32), options={"block_size": 16}))
    plain, ckpt = reports
    assert len(plain.sites) == len(ckpt.sites)
    left = list(ckpt.sites)
    for p in plain.sites:
        source = p.location.rsplit("(", 1)[-1]
        row = next((s for s in left if s.location.endswith(source) and (p.module_path.endswith(s.module_path) or s.module_path.endswith(p.module_path))), None)
        assert row is not None, p.row()
        left.remove(row)
        if p.rewritten and not row.rewritten:
            assert row.reason.startswith("ran outside any compiled graph") or row.consumers == ["graph output"], row.row()
        if row.rewritten:
            assert p.rewritten and row.kind == p.kind and row.region == "activation checkpoint", (p.row(), row.row())
    assert sum(s.rewritten for s in ckpt.sites) >= 6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_checkpointed_linear_on_gpu_under_inductor_uses_one_mask(dtype):
    """CUDA, Inductor's own RNG, Triton kernels: with dy = 1 and W > 0, dx (from the keep the
    backward recomputes) is positive exactly in kept blocks; the forward output must be block
    dropout with that same keep."""
    torch.manual_seed(0)
    rows, k, n, block = 1000, 1100, 300, (128, 128)
    x = torch.randn(rows, k, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.rand(n, k, device="cuda", dtype=dtype) + 0.1) / k**0.5
    f = torch.compile(lambda x: checkpoint(lambda t: F.linear(F.dropout(t, 0.3, True), w), x, use_reentrant=False),
                      backend="sparsedrop", options={"block_size": block})
    y = f(x)
    y.backward(torch.ones_like(y))
    keep = (x.grad.float() > 0).reshape(1, rows, k)[:, ::128, ::128]
    assert 0 < keep.float().mean() < 1 and counters["sparsedrop"]["linear_fused"] == 1
    ref = F.linear(apply_block_keep(x.detach().float(), keep, 1 / 0.7, *block, False), w.float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)

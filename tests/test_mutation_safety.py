"""In-place writes between a dropout and its matmul: such sites are left alone, and say why.

The fused op reads the dropout's input x where the matmul is, so a write to x (or to anything
sharing its memory, or to the dropout output on the way) in between would change the numbers.
Refused sites run the original graph: the result equals ``backend="aot_eager"`` with the same
seed. Safe neighbours are still rewritten and equal block dropout + the dense op.
"""
import pytest
import torch
import torch.utils.checkpoint as checkpoint
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sparsedrop_compile as sd
from sparsedrop_compile.kernels.block_mask import apply_block_keep, sample_block_keep

P = 0.3
BLOCK = (8, 8)  # (48, 32) activations: 6 x 4 = 24 blocks
OPTS = {"block_size": BLOCK, "inner": "aot_eager", "kernel": "reference"}
RELU_INPLACE = nn.ReLU(inplace=True)


def _iadd(x, h, pad):
    x += 1  # Dynamo records operator.iadd


def _doubles_its_input(t):
    t.mul_(2)
    return t * 1


def _refused_cases():
    """name -> (fn(drop, h, w, v, pad), op named in the reason, where). ``h`` is a non-leaf
    activation of shape (49, 32); ``drop`` is F.dropout (the site under test)."""

    def x_written(write, consumer=lambda d, w, v: F.linear(d, w)):
        def fn(drop, h, w, v, pad):
            x = h[1:]
            d = drop(x)
            write(x, h, pad)
            return consumer(d, w, v)
        return fn

    matmul = lambda d, w, v: torch.matmul(d, v)  # noqa: E731  (the batched-matmul consumer)

    def d_written(write, consumer=lambda d, w, v: F.linear(d, w)):
        def fn(drop, h, w, v, pad):
            d = drop(h[1:])
            write(d, pad)
            return consumer(d, w, v)
        return fn

    def relu_branch(drop, h, w, v, pad):
        x = h[1:]
        d = drop(x)
        r = RELU_INPLACE(x)  # a second branch that rectifies the dropout's input in place
        return F.linear(d, w), r.sum(-1)

    def x_written_after(drop, h, w, v, pad):
        x = h[1:] * 1.0
        y = F.linear(drop(x), w)
        x.mul_(10)
        return y, x

    def cast_step_written(drop, h, w, v, pad):
        e = drop(h[1:]).double()
        e.mul_(3)
        return F.linear(e, w.double())

    return {
        "x_mul_": (x_written(lambda x, h, pad: x.mul_(10)), "by mul_", "between the dropout and linear"),
        "x_torch_relu_": (x_written(lambda x, h, pad: torch.relu_(x)), "by relu_", "between the dropout and linear"),
        "x_iadd": (x_written(_iadd), "by iadd", "between the dropout and linear"),
        "x_iadd_dunder": (x_written(lambda x, h, pad: x.__iadd__(1)), "by __iadd__", "between the dropout and linear"),
        "x_aten_overload": (x_written(lambda x, h, pad: torch.ops.aten.mul_.Tensor(x, 10)), "by mul_.Tensor", "between the dropout and linear"),
        "x_into_checkpoint_that_writes_it": (
            x_written(lambda x, h, pad: checkpoint.checkpoint(_doubles_its_input, x, use_reentrant=False)),
            "may be mutated in place by higher-order op tag_activation_checkpoint", "between the dropout and linear"),
        "x_setitem": (x_written(lambda x, h, pad: x.__setitem__(0, 5.0)), "by setitem", "between the dropout and linear"),
        "x_hardtanh_inplace_positional": (x_written(lambda x, h, pad: F.hardtanh(x, -0.5, 0.5, True)), "hardtanh(inplace=True)", "between the dropout and linear"),
        "x_relu_module_inplace": (relu_branch, "relu(inplace=True)", "between the dropout and linear"),
        "base_add_": (x_written(lambda x, h, pad: h.add_(1)), "shares memory with the dropout input", "between the dropout and linear"),
        "x_written_after_the_matmul": (x_written_after, "by mul_", "after the dropout and its matmul"),
        "d_mul_": (d_written(lambda d, pad: d.mul_(3)), "the dropout output is mutated in place by mul_", "between the dropout and linear"),
        "d_masked_fill_": (d_written(lambda d, pad: d.masked_fill_(pad, 0)), "by masked_fill_", "between the dropout and linear"),
        "d_clamp_": (d_written(lambda d, pad: d.clamp_(max=1)), "by clamp_", "between the dropout and linear"),
        "d_view_written_before_matmul": (
            d_written(lambda d, pad: d[:, :8].zero_(), lambda d, w, v: torch.matmul(d, v)), "by zero_", "between the dropout and matmul"),
        "cast_step_written": (cast_step_written, "(on the way to linear) is mutated in place by mul_", "between the dropout and linear"),
        # the writes again with a torch.matmul consumer
        "matmul_x_mul_": (x_written(lambda x, h, pad: x.mul_(10), matmul), "by mul_", "between the dropout and matmul"),
        "matmul_x_torch_relu_": (x_written(lambda x, h, pad: torch.relu_(x), matmul), "by relu_", "between the dropout and matmul"),
        "matmul_base_add_": (x_written(lambda x, h, pad: h.add_(1), matmul), "shares memory with the dropout input", "between the dropout and matmul"),
        "matmul_d_mul_": (d_written(lambda d, pad: d.mul_(3), matmul), "the dropout output is mutated in place by mul_", "between the dropout and matmul"),
        "matmul_d_masked_fill_": (d_written(lambda d, pad: d.masked_fill_(pad, 0), matmul), "by masked_fill_", "between the dropout and matmul"),
        "matmul_d_clamp_": (d_written(lambda d, pad: d.clamp_(max=1), matmul), "by clamp_", "between the dropout and matmul"),
    }


def _inputs():
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(49, 32, generator=gen)
    w = torch.randn(12, 32, generator=gen) / 32**0.5
    v = torch.randn(32, 12, generator=gen)
    pad = torch.rand(48, 1, generator=gen) < 0.3
    return h, w, v, pad


def _run(fn, backend, options=None, seed=0):
    """Outputs and grads of (h, w, v), each run from fresh copies of the inputs."""
    h0, w0, v0, pad = _inputs()
    leaves = [t.clone().requires_grad_() for t in (h0, w0, v0)]
    compiled = torch.compile(lambda h, w, v, pad: fn(lambda t: F.dropout(t, P, True), h * 1.0, w, v, pad),
                             backend=backend, options=options, fullgraph=True)
    torch.manual_seed(seed)
    out = compiled(*leaves, pad)
    outs = out if isinstance(out, tuple) else (out,)
    sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).reshape(o.shape)).sum() for o in outs).backward()
    return list(outs) + [t.grad for t in leaves]


@pytest.mark.parametrize("name", sorted(_refused_cases()))
def test_write_between_dropout_and_matmul_is_refused_and_matches_aot_eager(name):
    fn, op, where = _refused_cases()[name]
    ours = _run(fn, "sparsedrop", OPTS)
    assert sum(v for k, v in counters["sparsedrop"].items() if k.endswith("_fused")) == 0, dict(counters["sparsedrop"])
    reference = _run(fn, "aot_eager")
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same graph ran: the same bits

    h, w, v, pad = _inputs()
    report = sd.explain(lambda h, w, v, pad: fn(lambda t: F.dropout(t, P, True), h * 1.0, w, v, pad), h, w, v, pad, options=OPTS)
    (site,) = report.sites
    assert not site.rewritten
    assert op in site.reason and where in site.reason, site.reason


def test_write_to_x_after_the_matmul_under_inner_eager_runs_as_eager():
    """Refusing matters most here: the fused op would save x for backward, and the write after
    it would make eager autograd fail (or, for an untracked write, use changed values)."""
    fn = _refused_cases()["x_written_after_the_matmul"][0]
    ours = _run(fn, "sparsedrop", {**OPTS, "inner": "eager"})
    reference = _run(fn, "eager")
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_graph_input_written_through_out_argument_is_refused():
    """x is a graph input (no grad: ``out=`` does not support autograd); a write through ``out=``
    between the dropout and the matmul leaves the site alone."""
    def fn(x, w):
        d = F.dropout(x, P, True)
        torch.mul(x, 2.0, out=x)
        return F.linear(d, w)

    x0, w, _, _ = _inputs()
    outs = []
    for backend, options in (("sparsedrop", OPTS), ("aot_eager", None)):
        x = x0[1:].clone()
        torch.manual_seed(0)
        outs.append((torch.compile(fn, backend=backend, options=options, fullgraph=True)(x, w), x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    report = sd.explain(fn, x0[1:].clone(), w, options=OPTS)
    assert "mul(out=...)" in report.sites[0].reason and "between the dropout and linear" in report.sites[0].reason


# --------------------------------------------------------------------------- safe neighbours
def _safe_cases():
    """name -> fn(drop, h, w, r): writes that cannot change what the matmul reads."""

    def other_user(drop, h, w, r):
        d = drop(h[1:])
        return F.linear(d, w), d + r

    def unrelated_write(drop, h, w, r):
        d = drop(h[1:])
        s = r * 1.0
        s.mul_(3)
        return F.linear(d, w), s

    def write_before_dropout(drop, h, w, r):
        x = h[1:]
        x.mul_(10)
        return F.linear(drop(x), w)

    def out_of_place_between(drop, h, w, r):
        x = h[1:]
        d = drop(x)
        y = x * 10
        return F.linear(d, w), y

    def checkpoint_reads_x(drop, h, w, r):
        x = h[1:]
        d = drop(x)
        y = checkpoint.checkpoint(lambda t: torch.relu(t) * 2, x, use_reentrant=False)
        return F.linear(d, w), y  # the checkpointed body provably writes none of its inputs

    return {f.__name__: f for f in (other_user, unrelated_write, write_before_dropout, out_of_place_between, checkpoint_reads_x)}


def _run_safe(fn, mode, seed=3):
    gen = torch.Generator().manual_seed(11)
    inputs = [torch.randn(49, 32, generator=gen), torch.randn(12, 32, generator=gen) / 32**0.5, torch.randn(48, 32, generator=gen)]
    h, w, r = (t.clone().requires_grad_() for t in inputs)
    torch.manual_seed(seed)
    if mode == "compiled":
        f = torch.compile(lambda h, w, r: fn(lambda t: F.dropout(t, P, True), h * 1.0, w, r), backend="sparsedrop", options=OPTS, fullgraph=True)
    else:
        keep = sample_block_keep(torch.empty(48, 32), P, *BLOCK, False)
        f = lambda h, w, r: fn(lambda t: apply_block_keep(t, keep, 1 / (1 - P), *BLOCK, False), h * 1.0, w, r)  # noqa: E731
    out = f(h, w, r)
    outs = out if isinstance(out, tuple) else (out,)
    sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).reshape(o.shape)).sum() for o in outs).backward()
    return list(outs) + [h.grad, w.grad, r.grad]


@pytest.mark.parametrize("name", sorted(_safe_cases()))
def test_safe_neighbours_are_still_rewritten(name):
    fn = _safe_cases()[name]
    ours = _run_safe(fn, "compiled")
    assert counters["sparsedrop"]["linear_fused"] == 1, dict(counters["sparsedrop"])
    reference = _run_safe(fn, "reference")
    for a, b in zip(ours, reference):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_matmul_after_a_write_to_the_dropout_output_stays_unfused_beside_a_fused_one():
    """linear_1 reads the dropout output after d.mul_: it keeps reading the materialised block
    dropout, while the linear before the write is fused; the site says which one was left."""
    def fn(drop, x, w):
        d = drop(x)
        y1 = F.linear(d, w)
        d.mul_(3)
        return y1, F.linear(d, w * 2)

    x, w, _, _ = _inputs()
    x = x[1:]
    torch.manual_seed(2)
    ours = torch.compile(lambda x, w: fn(lambda t: F.dropout(t, P, True), x, w), backend="sparsedrop", options=OPTS, fullgraph=True)(x, w)
    assert counters["sparsedrop"]["linear_fused"] == 1
    torch.manual_seed(2)
    keep = sample_block_keep(x, P, *BLOCK, False)
    reference = fn(lambda t: apply_block_keep(t, keep, 1 / (1 - P), *BLOCK, False), x, w)  # forward only: eager
    for a, b in zip(ours, reference):  # autograd refuses a write to a tensor linear saved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    (site,) = sd.explain(lambda x, w: fn(lambda t: F.dropout(t, P, True), x, w), x, w, options=OPTS).sites
    assert site.rewritten
    assert site.reason == "linear_1 not fused: the dropout output is mutated in place by mul_ (node mul_) between the dropout and linear"


def test_write_to_another_graph_input_that_aliases_x_is_refused():
    """Two graph inputs, one a view of the other: Dynamo's fake inputs share the storage, so a
    write to the base counts as a write to x."""
    def fn(base, x, w):
        d = F.dropout(x, P, True)
        base.add_(1)
        return F.linear(d, w)

    h, w, _, _ = _inputs()
    outs = []
    for backend, options in (("sparsedrop", OPTS), ("aot_eager", None)):
        base = h.clone()
        torch.manual_seed(0)
        outs.append((torch.compile(fn, backend=backend, options=options, fullgraph=True)(base, base[1:], w), base))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    base = h.clone()
    (site,) = sd.explain(fn, base, base[1:], w, options=OPTS).sites
    assert not site.rewritten
    assert site.reason.startswith("l_base_ (shares memory with the dropout input l_x_) is mutated in place by add_"), site.reason

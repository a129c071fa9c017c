"""Block dropout on a matmul's OUTPUT (``dropout(linear(x))``), and on both sides of one matmul.

The ops against plain PyTorch (block dropout by hand, then the dense op, or the dense op, then
block dropout) with the same masks; the rewrite through the backend against the same reference,
the mask read back from an identity weight, what the pass matches and refuses, and in-place writes.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sparsedrop_compile.kernels.block_mask import (
    apply_block_keep,
    expand_block_keep,
    sample_block_keep,
)
from torch._dynamo.utils import counters

import sparsedrop_compile as sd

OPS = torch.ops.sparsedrop
P = 0.3
BLOCK = (8, 8)
OPTS = {"block_size": BLOCK, "inner": "aot_eager"}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _fused():
    return sum(v for k, v in counters["sparsedrop"].items() if k.endswith("_fused"))


def _keep_over(shape, p, gen):
    """Block flags of ``shape`` (batch, row blocks, column blocks), each kept with probability 1 - p."""
    return torch.rand(shape, generator=gen) >= p


# --------------------------------------------------------------------------- the ops
def _linear_out_case(dtype=torch.float64, bias=True, both=False, shape=(3, 37, 50), n=20, block=(16, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(n, shape[-1], generator=gen).to(dtype).requires_grad_()
    b = torch.randn(n, generator=gen).to(dtype).requires_grad_() if bias else None
    torch.manual_seed(seed)
    keep = sample_block_keep(torch.empty(*shape[:-1], n), 0.4, *block, False)
    keep_in = sample_block_keep(x, 0.4, *block, False) if both else None
    return x, w, b, keep, keep_in


def _linear_out_reference(x, w, b, keep, keep_in, scale, scale_in, block):
    """Plain PyTorch: (block dropout of x,) the dense linear, then block dropout of its output."""
    xin = x * scale_in if keep_in is None else apply_block_keep(x, keep_in, scale_in, *block, False)
    return apply_block_keep(F.linear(xin, w, b), keep, scale, *block, False)


@pytest.mark.parametrize("bias,both", [(False, False), (True, True)], ids=["no_bias", "bias_both_sides"])
def test_opcheck_linear_out_family(bias, both):
    x, w, b, keep, keep_in = _linear_out_case(bias=bias, both=both)
    args = (2.0, 16, 8, "reference")
    torch.library.opcheck(OPS.linear_out.default, (x, w, b, keep, *args, keep_in, 1.25))
    grad = torch.randn(3, 37, 20, dtype=torch.float64)
    torch.library.opcheck(OPS.linear_out_grad_input.default, (grad, w.detach(), keep, *args, keep_in))
    torch.library.opcheck(OPS.linear_out_grad_weight.default, (grad, x.detach(), keep, *args, keep_in))


@pytest.mark.parametrize("both", [False, True], ids=["output", "both_sides"])
@pytest.mark.parametrize("a_shape,b_shape", [((2, 1, 21, 40), (1, 3, 40, 9))], ids=["broadcast_both"])
def test_opcheck_and_values_matmul_out_family(a_shape, b_shape, both):
    a = torch.randn(a_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(b_shape, dtype=torch.float64, requires_grad=True)
    y_shape = torch.broadcast_shapes(a_shape[:-2], b_shape[:-2]) + (a_shape[-2], b_shape[-1])
    keep = sample_block_keep(torch.empty(y_shape), 0.4, 16, 16, True)
    keep_in = sample_block_keep(a, 0.4, 16, 16, True) if both else None
    args = (1.5, 16, 16, "reference")
    torch.library.opcheck(OPS.matmul_out.default, (a, b, keep, *args, keep_in, 1.25))
    grad = torch.randn(y_shape, dtype=torch.float64)
    torch.library.opcheck(OPS.matmul_out_grad_a.default, (grad, a.detach(), b.detach(), keep, *args, keep_in))
    torch.library.opcheck(OPS.matmul_out_grad_b.default, (grad, a.detach(), b.detach(), keep, *args, keep_in))
    out = OPS.matmul_out(a, b, keep, *args, keep_in, 1.25)
    a_in = a * 1.25 if keep_in is None else apply_block_keep(a, keep_in, 1.25, 16, 16, True)
    ref = apply_block_keep(torch.matmul(a_in, b), keep, 1.5, 16, 16, True)
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad(out, (a, b), grad), torch.autograd.grad(ref, (a, b), grad)):
        torch.testing.assert_close(g, r)


def test_linear_out_op_saves_no_full_size_mask_or_output():
    x, w, b, keep, keep_in = _linear_out_case(dtype=torch.float32, both=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        OPS.linear_out(x, w, b, keep, 2.0, 16, 8, "reference", keep_in, 1.25)
    assert sorted(t.numel() for t in saved) == sorted([x.numel(), w.numel(), keep.numel(), keep_in.numel()])


def test_bad_keep_names_the_expected_shape():
    x, w, b, keep, _ = _linear_out_case(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"sparsedrop::linear_out: keep must be a bool tensor of shape \(1, 7, 3\)"):
        OPS.linear_out(x, w, b, keep[:, :4], 2.0, 16, 8, "reference")
    with pytest.raises(ValueError, match=r"linear_out \(keep_in\): keep must be a bool tensor of shape \(1, 7, 7\)"):
        OPS.linear_out(x, w, b, keep, 2.0, 16, 8, "reference", keep)
    with pytest.raises(TypeError, match="share one dtype"):
        OPS.linear_out(x, w.double(), b, keep, 2.0, 16, 8, "reference")


# Per dtype: (atol relative to the largest reference value, rtol). The kernels accumulate in fp32
# and round once to the dtype (half an ulp; bf16 a full ulp: the interpreter's conversion
# truncates); the bias gradient is a sum in the dtype (fp32 accumulation, one rounding).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


def _assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == dtype and not torch.isnan(actual).any()
    torch.testing.assert_close(actual.double(), expected, atol=atol * max(1.0, expected.abs().max().item()), rtol=rtol)


# Every dtype on linear with bias; the other variants on one dtype each (test_block_sparse_matmul
# runs each kernel's second mask in every dtype).
TRITON_OP_CASES = [("linear_bias", dt) for dt in TOL] + [("linear_both_sides", torch.bfloat16), ("matmul_batched_both", torch.float16)]


@pytest.mark.parametrize("case,dtype", TRITON_OP_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_triton_ops_against_float64_plain_pytorch(case, dtype):
    """Forward and every gradient through the Triton kernels (interpreted on CPU), odd shapes,
    against float64 plain PyTorch from the same low-precision inputs and the same masks."""
    block = (16, 16)
    gen = torch.Generator().manual_seed(3)
    both = case.endswith(("both_sides", "both"))
    if case.startswith("linear"):
        x_shape, n = ((45, 40) if "2d" in case else (2, 23, 40)), 36
        tensors = [torch.randn(x_shape, generator=gen), torch.randn(n, 40, generator=gen) / 6,
                   torch.randn(n, generator=gen) if case != "linear_2d_no_bias" else None]
        keep = _keep_over((1, 3, 3), 0.4, gen)  # 45 or 46 rows, N = 36: 3 x 3 blocks of 16
        keep_in = _keep_over((1, 3, 3), 0.4, gen) if both else None  # K = 40: 3 column blocks

        def ours(x, w, b):
            return OPS.linear_out(x, w, b, keep, 1 / 0.7, *block, "triton", keep_in, 1 / 0.6 if both else 1.0)

        def plain(x, w, b):
            xin = x if keep_in is None else apply_block_keep(x, keep_in, 1 / 0.6, *block, False)
            return apply_block_keep(F.linear(xin, w, b), keep, 1 / 0.7, *block, False)
    else:
        a_shape, b_shape = ((2, 3, 37, 40), (40, 29)) if case == "matmul_shared_b" else ((2, 3, 37, 40), (2, 3, 40, 29))
        tensors = [torch.randn(a_shape, generator=gen), torch.randn(b_shape, generator=gen) / 6]
        keep = _keep_over((6, 3, 2), 0.4, gen)  # 6 matrices of 37 x 29 outputs
        keep_in = _keep_over((6, 3, 3), 0.4, gen) if both else None  # of 37 x 40 inputs

        def ours(a, b):
            return OPS.matmul_out(a, b, keep, 1 / 0.7, *block, "triton", keep_in, 1 / 0.6 if both else 1.0)

        def plain(a, b):
            a_in = a if keep_in is None else apply_block_keep(a, keep_in, 1 / 0.6, *block, True)
            return apply_block_keep(torch.matmul(a_in, b), keep, 1 / 0.7, *block, True)
    low = [t.to(dtype).to(DEVICE).requires_grad_() if t is not None else None for t in tensors]
    wide = [t.detach().double().requires_grad_() if t is not None else None for t in low]
    keep, keep_in = keep.to(DEVICE), None if keep_in is None else keep_in.to(DEVICE)
    out, ref = ours(*low), plain(*wide)
    dout = torch.randn(out.shape, generator=gen).to(dtype).to(DEVICE)
    out.backward(dout)
    ref.backward(dout.double())
    _assert_close(out, ref, dtype)
    assert (out[ref == 0] == 0).all(), "dropped tiles must be exact zeros"
    for t, r in zip(low, wide):
        if t is not None:
            _assert_close(t.grad, r.grad, dtype)


# --------------------------------------------------------------------------- through the backend
def _several_users(drop, x, w, b):
    d = drop(F.linear(x, w, b))
    return d + 1, d.sum(-1), d * 2


def _cases():
    """name -> (fn(drop, x, w, b), x shape, w shape, y shape, batched): the dropout drops y."""
    lin = lambda drop, x, w, b: drop(F.linear(x, w, b))  # noqa: E731
    return {
        "linear_2d_ragged": (lin, (37, 40), (45, 40), (37, 45), False),
        "linear_3d": (lin, (3, 21, 40), (45, 40), (3, 21, 45), False),
        "linear_no_bias": (lambda drop, x, w, b: drop(F.linear(x, w)), (3, 21, 40), (45, 40), (3, 21, 45), False),
        "linear_view_cast_scale": (lambda drop, x, w, b: drop(F.linear(x, w, b).view(63, 45).float() * 0.5), (3, 21, 40), (45, 40), (63, 45), False),
        "addmm_conv1d": (lambda drop, x, w, b: drop(torch.addmm(b, x.view(-1, 40), w.t()).view(3, 21, 45)), (3, 21, 40), (45, 40), (3, 21, 45), False),
        "mm": (lambda drop, x, w, b: drop(torch.mm(x, w.t())), (101, 40), (45, 40), (101, 45), False),
        "matmul_broadcast_b": (lambda drop, x, w, b: drop(torch.matmul(x, w.t())), (3, 21, 40), (45, 40), (3, 21, 45), True),
        "matmul_4d": (lambda drop, x, w, b: drop(x @ w.t().reshape(1, 1, 40, 45)), (2, 3, 21, 40), (45, 40), (2, 3, 21, 45), True),
        "bmm": (lambda drop, x, w, b: drop(torch.bmm(x, w.t().expand(3, 40, 45))), (3, 21, 40), (45, 40), (3, 21, 45), True),
        "several_users": (_several_users, (3, 21, 40), (45, 40), (3, 21, 45), False),
    }


def _run(case, inner="aot_eager", dtype=torch.float32, kernel="auto", block=BLOCK, seed=0, device="cpu"):
    """Outputs and (x, w, b) grads: the backend on F.dropout, and plain PyTorch with the same mask."""
    fn, x_shape, w_shape, y_shape, batched = _cases()[case]
    gen = torch.Generator().manual_seed(1234)
    x0, w0, b0 = (t.to(device) for t in (torch.randn(x_shape, generator=gen), torch.randn(w_shape, generator=gen) / 6,
                                          torch.randn(w_shape[0], generator=gen)))
    results = []
    for mode in ("compiled", "reference"):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        torch.manual_seed(seed)
        if mode == "compiled":
            f = torch.compile(lambda x, w, b: fn(lambda t: F.dropout(t, P, True), x, w, b), backend="sparsedrop",
                              options={"block_size": block, "inner": inner, "kernel": kernel}, fullgraph=True)
        else:
            keep = sample_block_keep(torch.empty(y_shape, device=device), P, *block, batched)
            f = lambda x, w, b: fn(lambda t: apply_block_keep(t, keep, 1 / (1 - P), *block, batched), x, w, b)  # noqa: E731
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = f(x, w, b)
        outs = out if isinstance(out, tuple) else (out,)
        sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64, device=o.device).reshape(o.shape)).sum()
            for o in outs).backward()
        results.append((outs, (x.grad, w.grad, b.grad)))
    return results


@pytest.mark.parametrize("case", sorted(_cases()))
def test_backend_matches_plain_block_dropout_of_the_output(case):
    (out, grads), (ref_out, ref_grads) = _run(case)
    assert counters["sparsedrop"]["refused_output_side"] == 0 and _fused() == 1, dict(counters["sparsedrop"])
    for o, r in zip(out + grads, ref_out + ref_grads):
        if r is None:
            assert o is None
        else:
            assert o.dtype == r.dtype
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["linear_3d", "matmul_4d"])
def test_backend_under_bf16_autocast(case):
    """Under bf16 autocast the fused op returns the dtype the dense op would, and its error
    against the same computation without autocast is bf16-sized."""
    (out, grads), (ref_out, ref_grads) = _run(case, dtype=torch.bfloat16)
    (_, _), (wide_out, wide_grads) = _run(case)
    for o, r, w in zip(out + grads, ref_out + ref_grads, wide_out + wide_grads):
        if w is None:  # matmul's bias is unused
            assert o is None and r is None
            continue
        assert o.dtype == r.dtype
        err = ((o.double() - w.double()).norm() / w.double().norm()).item()
        ref_err = ((r.double() - w.double()).norm() / w.double().norm()).item()
        assert err < 1e-2 and err <= 2 * ref_err + 1e-3, (err, ref_err)


@pytest.mark.parametrize("case", ["addmm_conv1d", "matmul_broadcast_b"])
def test_triton_kernels_through_the_backend(case):
    """kernel="triton": the real kernels (on CUDA where there is one, else interpreted on CPU) in
    the compiled graph, with the graph's padded keep; blocks of 16 (tensor-core tiles), still >= 12
    blocks per output."""
    (out, grads), (ref_out, ref_grads) = _run(case, kernel="triton", block=(16, 16), device=DEVICE)
    assert _fused() == 1, dict(counters["sparsedrop"])
    for o, r in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_both_sides_of_one_linear_match_plain_pytorch():
    """T5's FFN: dropout -> wo -> dropout. Both dropouts are fused into one op; the masks are
    drawn input side first (at the first dropout), then the output's (at the matmul)."""
    gen = torch.Generator().manual_seed(7)
    h0, w0 = torch.randn(2, 24, 40, generator=gen), torch.randn(32, 40, generator=gen) / 6

    def model(drop_in, drop_out, h, w):
        return h[..., :32] + drop_out(F.linear(drop_in(torch.relu(h)), w))

    results = []
    for mode in ("compiled", "reference"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        torch.manual_seed(1)
        if mode == "compiled":
            drop = lambda t: F.dropout(t, P, True)  # noqa: E731
            out = torch.compile(lambda h, w: model(drop, drop, h, w), backend="sparsedrop", options=OPTS, fullgraph=True)(h, w)
        else:
            keep_in = sample_block_keep(h, P, *BLOCK, False)
            keep_out = sample_block_keep(torch.empty(2, 24, 32), P, *BLOCK, False)
            out = model(lambda t: apply_block_keep(t, keep_in, 1 / (1 - P), *BLOCK, False),
                        lambda t: apply_block_keep(t, keep_out, 1 / (1 - P), *BLOCK, False), h, w)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out, h.grad, w.grad))
    assert counters["sparsedrop"]["both_sides_fused"] == 1 and counters["sparsedrop"]["linear_fused"] == 1
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    report = sd.explain(lambda h, w: model(lambda t: F.dropout(t, P, True), lambda t: F.dropout(t, P, True), h, w), h0, w0,
                        options={"block_size": BLOCK})
    assert [(s.rewritten, s.side) for s in report.sites] == [(True, "both"), (True, "both")]
    assert "yes (both)" in str(report)


def test_identity_weight_reads_the_mask_back():
    """y = x @ I, so the output is the block-dropped x: blocks over (rows, N) with rows all
    leading dims, each all zero or x / (1-p) exactly, about p of them dropped."""
    torch.manual_seed(0)
    x = torch.randn(4, 37, 64) + 3.0  # no zeros in x
    f = torch.compile(lambda x: F.dropout(F.linear(x, torch.eye(64)), P, True), backend="sparsedrop",
                      options={"block_size": BLOCK, "inner": "eager"})
    outs = [f(x).reshape(148, 64) for _ in range(4)]
    assert counters["sparsedrop"]["linear_out_fused"] == 1
    dropped = []
    for out in outs:
        flags = out.reshape(1, 148, 64)[:, ::8, ::8] != 0  # 148 = 18 * 8 + 4 rows: a ragged last block
        mask = expand_block_keep(flags, 148, 64, *BLOCK)[0]
        torch.testing.assert_close(out, torch.where(mask, x.reshape(148, 64) / (1 - P), 0.0), rtol=1e-6, atol=1e-6)
        dropped.append(1 - flags.float().mean().item())
    # 4 x 19 x 8 = 608 blocks: the dropped fraction is p within ~4 standard errors (0.019 each).
    assert abs(sum(dropped) / len(dropped) - P) < 0.08, dropped
    assert len(set(dropped)) > 1  # new flags every call


def test_identity_weight_batched_matmul_masks_each_matrix():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 20, 16) + 3.0
    f = torch.compile(lambda x: F.dropout(x @ torch.eye(16), 0.5, True), backend="sparsedrop", options={"block_size": BLOCK, "inner": "eager"})
    out = f(x)
    assert counters["sparsedrop"]["matmul_out_fused"] == 1
    flags = (out.reshape(6, 20, 16) != 0)[:, ::8, ::8]  # per matrix: 3 x 2 blocks, the last row block ragged
    torch.testing.assert_close(out.reshape(6, 20, 16), torch.where(expand_block_keep(flags, 20, 16, *BLOCK), x.reshape(6, 20, 16) * 2, 0.0))
    assert 0 < flags.float().mean() < 1


# --------------------------------------------------------------------------- what is matched, what is refused
class Lin(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.lin = nn.Linear(32, 24)
        self.body = body

    def forward(self, x):
        return self.body(self, x)


def _y_has_another_user(m, x):
    y = m.lin(x)
    return F.dropout(y, 0.2, True), y.sum()


def _y_add_(m, x):
    y = m.lin(x)
    y.add_(1)
    return F.dropout(y, 0.2, True)


def _y_view_zero_(m, x):
    y = m.lin(x)
    y[:, :4].zero_()
    return F.dropout(y, 0.2, True)


REFUSED = {
    "y_has_another_user": (_y_has_another_user, "the matmul output has other users (sum)"),
    "y_add_": (_y_add_, "is mutated in place by add_"),
    "y_view_zero_": (_y_view_zero_, "is mutated in place by zero_"),
    "view_changes_last_dim": (lambda m, x: F.dropout(m.lin(x).view(40, 3, 8), 0.2, True), "changes the output's last 1 dim(s)"),
    "transpose_between": (lambda m, x: F.dropout(m.lin(x).t(), 0.2, True), "no matmul producer: its input comes from t"),
    "layer_norm_between": (lambda m, x: F.dropout(F.layer_norm(m.lin(x), (24,)), 0.2, True), "no matmul producer: its input comes from layer_norm"),
    "graph_input": (lambda m, x: F.dropout(x, 0.2, True) * 2, "no matmul producer: its input comes from a graph input"),
    "eval_flag": (lambda m, x: F.dropout(m.lin(x), 0.2, False), "training=False"),
    "p_zero": (lambda m, x: F.dropout(m.lin(x), 0.0, True), "p == 0"),
    "inplace_dropout": (lambda m, x: F.dropout(m.lin(x), 0.2, True, True), "inplace dropout"),
    "matmul_1d": (lambda m, x: F.dropout(x @ m.lin.weight[0, :32], 0.2, True), "operands are not at least 2-D"),
    "addmm_alpha": (lambda m, x: F.dropout(torch.addmm(m.lin.bias, x, m.lin.weight.t(), alpha=2.0), 0.2, True), "addmm with beta, alpha"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_sites_are_left_alone_and_say_why(name):
    body, reason = REFUSED[name]
    report = sd.explain(Lin(body).train(), torch.randn(40, 32), options={"block_size": 8})
    assert _fused() == 0, dict(counters["sparsedrop"])
    (site,) = report.sites
    assert not site.rewritten and site.side is None and reason in site.reason, site.reason


def test_writes_to_the_matmul_output_are_refused_and_run_as_aot_eager():
    def fn(x, w):
        y = F.linear(x, w)
        y.add_(1)
        return F.dropout(y, P, True)

    x, w = torch.randn(48, 32), torch.randn(24, 32)
    outs = []
    for backend, options in (("sparsedrop", OPTS), ("aot_eager", None)):
        torch.manual_seed(0)
        outs.append(torch.compile(fn, backend=backend, options=options, fullgraph=True)(x, w))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # the same graph ran


def test_write_to_the_dropout_output_after_it_is_safe():
    """d.mul_ after the dropout: in both graphs d is a fresh tensor the op does not save, so the
    site is rewritten and the write acts on the block-dropped output as it would on the original."""
    def fn(drop, x, w, b):
        d = drop(F.linear(x, w, b))
        d.mul_(3)
        return d + 1

    gen = torch.Generator().manual_seed(4)
    x0, w0, b0 = torch.randn(48, 32, generator=gen), torch.randn(24, 32, generator=gen), torch.randn(24, generator=gen)
    results = []
    for mode in ("compiled", "reference"):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        torch.manual_seed(5)
        if mode == "compiled":
            out = torch.compile(lambda x, w, b: fn(lambda t: F.dropout(t, P, True), x, w, b), backend="sparsedrop", options=OPTS)(x, w, b)
        else:
            keep = sample_block_keep(torch.empty(48, 24), P, *BLOCK, False)
            out = fn(lambda t: apply_block_keep(t, keep, 1 / (1 - P), *BLOCK, False), x, w, b)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append([out, x.grad, w.grad, b.grad])
    assert counters["sparsedrop"]["linear_out_fused"] == 1
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_options_output_side_min_p_exclude_and_filter_fn():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
            self.da, self.db = nn.Dropout(0.1), nn.Dropout(0.3)

        def forward(self, x):
            return x + self.db(self.b(x + self.da(self.a(x))))

    x = torch.randn(48, 32)
    sites = sd.explain(Two(), x, options={"block_size": 8}).sites
    assert [(s.rewritten, s.side, s.producer) for s in sites] == [(True, "output", "linear a"), (True, "output", "linear b")]
    sites = sd.explain(Two(), x, options={"block_size": 8, "output_side": False}).sites
    assert not any(s.rewritten for s in sites)
    assert all(s.reason.endswith("output side off (option output_side=False)") for s in sites), [s.reason for s in sites]
    assert sites[0].reason.startswith("no matmul consumer: users are add")  # the input side's reason stays
    assert [s.rewritten for s in sd.explain(Two(), x, options={"block_size": 8, "min_p": 0.2}).sites] == [False, True]
    sites = sd.explain(Two(), x, options={"block_size": 8, "exclude": ["b"]}).sites  # the matmul's path counts
    assert [s.rewritten for s in sites] == [True, False] and "exclude='b'" in sites[1].reason
    sites = sd.explain(Two(), x, options={"block_size": 8, "filter_fn": lambda s: s.side != "output"}).sites
    assert not any(s.rewritten for s in sites) and sites[0].reason.endswith("; excluded by option filter_fn")
    with pytest.raises(ValueError, match="output_side='no': expected True or False"):
        sd.SparseDropConfig.from_options({"output_side": "no"})


def test_too_few_output_blocks_stay_element_wise():
    model = nn.Sequential(nn.Linear(32, 16), nn.Dropout(0.3)).train()
    (site,) = sd.explain(model, torch.randn(16, 32)).sites  # one 128 x 128 block over the (16, 16) output
    assert not site.rewritten and "the whole matmul output is k=1" in site.reason
    (site,) = sd.explain(model, torch.randn(16, 32), options={"block_size": 4}).sites
    assert site.rewritten and site.blocks == 16


def test_dynamic_shapes_do_not_recompile():
    lin = nn.Linear(32, 24)
    compiled = torch.compile(lambda x: F.dropout(lin(x), 0.2, True), backend="sparsedrop", options={"block_size": 8, "inner": "aot_eager"},
                             dynamic=True)
    for rows in (40, 17, 91):
        assert compiled(torch.randn(2, rows, 32)).shape == (2, rows, 24)
    assert counters["sparsedrop"]["linear_out_fused"] == 1 and counters["stats"]["unique_graphs"] == 1


def test_p_zero_leaves_the_graph_unchanged_and_matches_inductor_to_the_bit():
    """With every dropout at p = 0 no site is rewritten, the graph the inner compiler gets is
    Dynamo's, and training losses equal backend="inductor"'s bit for bit."""
    from sparsedrop_compile.backend import run_passes

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 48), nn.Dropout(0.0), nn.ReLU(), nn.Dropout(0.0), nn.Linear(48, 32), nn.Dropout(0.0)).train()

    codes = []

    def recording(gm, example_inputs):
        before = gm.code
        run_passes(gm, sd.SparseDropConfig(block_size=8), example_inputs)
        codes.append((before, gm.code))
        return gm.forward

    x = torch.randn(64, 32)
    torch.compile(make(), backend=recording)(x)
    assert codes and all(before == after for before, after in codes)
    losses = []
    for backend, options in (("sparsedrop", {"block_size": 8}), ("inductor", None)):
        torch._dynamo.reset()
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        compiled = torch.compile(model, backend=backend, options=options)
        run = []
        for _ in range(3):
            loss = compiled(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1] and losses[0][-1] < losses[0][0], losses


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_zero_size_operands_behave_as_the_dense_ops(kernel):
    """With a zero among rows, K and N no element of x reaches a non-empty output, so the op equals
    plain block dropout of the dense linear (the bias alone where K = 0), gradients included."""
    device = DEVICE if kernel == "triton" else "cpu"
    for x_shape, n in (((0, 20), 3), ((5, 0), 3), ((5, 20), 0), ((2, 0, 20), 3)):
        gen = torch.Generator().manual_seed(0)
        tensors = [torch.randn(x_shape, generator=gen), torch.randn(n, x_shape[-1], generator=gen), torch.randn(n, generator=gen)]
        y_shape = (*x_shape[:-1], n)
        keep = sample_block_keep(torch.empty(y_shape), P, 16, 16, False).to(device)
        results = []
        for ours in (True, False):
            leaves = [t.to(device).requires_grad_() for t in tensors]
            if ours:
                out = OPS.linear_out(*leaves, keep, 2.0, 16, 16, kernel)
            else:
                out = apply_block_keep(F.linear(*leaves), keep, 2.0, 16, 16, False)
            out.backward(torch.ones_like(out))
            results.append([out] + [t.grad for t in leaves])
        for a, b in zip(*results):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=0)

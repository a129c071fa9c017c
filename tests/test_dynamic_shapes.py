"""Dynamic shapes: the rewrite must not add guards, so no more graphs than aot_eager compiles.

Also the keep-mask ops the passes emit (sparsedrop::keep_from_uniform, sparsedrop::block_dropout)
against their plain-PyTorch references.
"""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sparsedrop_compile  # noqa: F401  (registers the ops)
from sparsedrop_compile.kernels.block_mask import apply_block_keep, fit_keep, padded, sample_block_keep
from sparsedrop_compile.kernels.flash_attention import sample_attention_keep
from sparsedrop_compile.mask_ops import sample_keep, sample_tile_keep


# --------------------------------------------------------------------------- the mask ops
@pytest.mark.parametrize("batched", [False, True])
def test_graph_keep_sampling_draws_the_references_flags(batched):
    x = torch.randn(3, 37, 45)
    torch.manual_seed(4)
    ours = sample_keep(x, 0.3, 16, 8, batched)
    torch.manual_seed(4)
    ref = sample_block_keep(x, 0.3, 16, 8, batched)
    assert ours.dtype == torch.bool and ours.shape == padded(ref.shape)  # the graph's keep is padded
    assert torch.equal(fit_keep(ours, ref.shape), ref)
    q, k = torch.randn(2, 3, 77, 16), torch.randn(2, 3, 50, 16)
    torch.manual_seed(5)
    ours = sample_tile_keep(q, k, 0.3, 32, 16)
    torch.manual_seed(5)
    ref = sample_attention_keep(q, k, 0.3, 32, 16)
    assert ours.shape == padded(ref.shape) and torch.equal(fit_keep(ours, ref.shape), ref)


@pytest.mark.parametrize("batched", [False, True])
def test_block_dropout_op_equals_apply_block_keep_with_gradients(batched):
    x = torch.randn(3, 45, 37).transpose(1, 2)  # a non-contiguous input
    keep = sample_block_keep(x, 0.4, 16, 8, batched)
    padded_keep = torch.zeros(padded(keep.shape), dtype=torch.bool)
    padded_keep[..., : keep.shape[-2], : keep.shape[-1]] = keep  # the extra blocks are ignored
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    out = torch.ops.sparsedrop.block_dropout(a, padded_keep, 1 / 0.6, 16, 8, batched)
    ref = apply_block_keep(b, keep, 1 / 0.6, 16, 8, batched)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def _pad(keep, fill):
    out = torch.full(padded(keep.shape), fill, dtype=torch.bool)
    out[..., : keep.shape[-2], : keep.shape[-1]] = keep
    return out


def test_ops_take_the_padded_keep_the_graph_draws_and_refuse_other_shapes():
    x, w = torch.randn(3, 37, 45, requires_grad=True), torch.randn(12, 45, requires_grad=True)
    keep = sample_block_keep(x, 0.4, 16, 8, False)
    outs = []
    for k in (keep, _pad(keep, True), _pad(keep, False)):  # whatever the padding holds
        y = torch.ops.sparsedrop.linear(x, w, None, k, 1.5, 16, 8, "reference")
        outs.append([y] + list(torch.autograd.grad(y.sum(), (x, w))))
    for other in outs[1:]:
        for a, b in zip(other, outs[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    q, kk, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    tiles = sample_attention_keep(q, kk, 0.3, 16, 16)
    args = (q, kk, v, None)
    ref = torch.ops.sparsedrop.attention(*args, tiles, 0.3, False, None, False, 16, 16, "post_softmax", "reference")
    got = torch.ops.sparsedrop.attention(*args, _pad(tiles, True), 0.3, False, None, False, 16, 16, "post_softmax", "reference")
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape \(1, 7, 6\)"):
        torch.ops.sparsedrop.linear(x, w, None, keep[:, :-1], 1.5, 16, 8, "reference")


def test_opcheck_mask_ops():
    x = torch.randn(37, 45, requires_grad=True)
    keep = sample_block_keep(x, 0.4, 16, 8, False)
    torch.library.opcheck(torch.ops.sparsedrop.block_dropout.default, (x, keep, 2.0, 16, 8, False))
    torch.library.opcheck(torch.ops.sparsedrop.keep_from_uniform.default, (torch.rand(1, 3, 6), 0.3))
    # the opaque references the two ops fall back to off the GPU
    # (no autograd of their own: the ops above differentiate)
    torch.library.opcheck(torch.ops.sparsedrop.reference_block_dropout.default, (x.detach(), keep, 2.0, 16, 8, False))
    torch.library.opcheck(torch.ops.sparsedrop.reference_keep_from_uniform.default, (torch.rand(1, 3, 6), 0.3))


# --------------------------------------------------------------------------- graph counts
def _graphs(fn, inputs, backend, sparsedrop_options=None):
    torch._dynamo.reset()
    counters.clear()
    opts = {"block_size": 8, "inner": "aot_eager", "attention_block": (16, 16), **(sparsedrop_options or {})}
    options = {"options": opts} if backend == "sparsedrop" else {}
    compiled = torch.compile(fn, backend=backend, dynamic=True, **options)
    for args in inputs:
        compiled(*args)
    return counters["stats"]["unique_graphs"], sum(v for k, v in counters["sparsedrop"].items() if k.endswith("_fused"))


# Enough blocks at every size that the whole-activation rule (max_drop_all) keeps each site.
def _pv(s):
    return torch.randn(4, 4, s, s), torch.randn(4, 4, s, 16)


def _qkv(s):
    return tuple(torch.randn(4, 4, s, 64) for _ in range(3))


CASES = {
    "linear_rows": (lambda x, w: F.linear(F.dropout(x, 0.2, True), w), lambda s: (torch.randn(s, 256), torch.randn(24, 256))),
    "linear_k": (lambda x, w: F.linear(F.dropout(x, 0.2, True), w), lambda s: (torch.randn(128, s), torch.randn(24, s))),
    "linear_rows_and_k": (lambda x, w: F.linear(F.dropout(x, 0.2, True), w), lambda s: (torch.randn(16 * s, s + 3), torch.randn(24, s + 3))),
    "batched_pv": (lambda p, v: F.dropout(p, 0.2, True) @ v, _pv),
    "attention": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.2), _qkv),
    # the output side: the mask over linear's (rows, N) output
    "linear_out_rows": (lambda x, w, b: F.dropout(F.linear(x, w, b), 0.2, True),
                        lambda s: (torch.randn(s, 64), torch.randn(256, 64), torch.randn(256))),
    "linear_out_n": (lambda x, w: F.dropout(F.linear(x, w), 0.2, True), lambda s: (torch.randn(128, 64), torch.randn(s, 64))),
    "matmul_out": (lambda a, b: F.dropout(a @ b, 0.2, True), _pv),
    # the dropped tensor read besides the linear: materialised (sparsedrop::block_dropout), the
    # linear still block-sparse
    "linear_rows_read_too": (lambda x, w: (lambda d: F.linear(d, w).sum() + d.sum())(F.dropout(x, 0.2, True)),
                             lambda s: (torch.randn(s, 256), torch.randn(24, 256))),
    # both sides: one linear, its input and output masks
    "both_sides": (lambda x, w: F.dropout(F.linear(F.dropout(x, 0.2, True), w), 0.2, True),
                   lambda s: (torch.randn(s, 256), torch.randn(256, 256))),
}
# Fused-site counters each case adds: both sides counts the input side's linear, the output
# side's linear_out and the both-sides fusion.
FUSED = {"both_sides": 3}
# Sizes on both sides of one block (8 for matmuls, 16 for attention tiles), in a mixed order.
SIZES = (8, 13, 3, 32, 64, 17, 5, 2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_more_graphs_than_aot_eager(case):
    fn, make = CASES[case]
    inputs = [make(s) for s in SIZES]
    ours, fused = _graphs(fn, inputs, "sparsedrop")
    theirs, _ = _graphs(fn, inputs, "aot_eager")
    assert fused == FUSED.get(case, 1) and ours == theirs == 1


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_no_more_graphs_than_aot_eager_on_cuda(case):
    """The same on CUDA, where the ops are traced into (triton_op): the Triton launchers' host
    code sees the symbolic sizes and must add no guard. Blocks of 16 (the kernels' minimum);
    max_drop_all off, since at the smallest sizes a few blocks cover the whole activation."""
    fn, make = CASES[case]
    # fp32 attention stays on SDPA on CUDA (the Triton attention kernel is fp16/bf16)
    dtype = torch.float16 if case == "attention" else torch.float32
    inputs = [[t.to("cuda", dtype) for t in make(s)] for s in SIZES]
    options = {"block_size": 16, "attention_block": (16, 16), "max_drop_all": 1.0}
    ours, fused = _graphs(fn, inputs, "sparsedrop", options)
    theirs, _ = _graphs(fn, inputs, "aot_eager")
    assert fused == FUSED.get(case, 1) and ours == theirs == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_hf_encoder_with_varying_sequence_length_compiles_as_often_as_aot_eager(device):
    from sparsedrop_compile.models import build_model, example_batch

    counts = []
    for backend in ("sparsedrop", "aot_eager"):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = build_model("bert", size="demo", attn="sdpa").train().to(device)
        options = {"options": {"block_size": 16, "attention_block": (16, 16), "inner": "aot_eager"}} if backend == "sparsedrop" else {}
        compiled = torch.compile(model, backend=backend, **options)
        for seq in (24, 40, 9, 57, 33):
            # fp16 on CUDA: fp32 attention stays on SDPA there (the Triton attention is fp16/bf16)
            with torch.autocast("cuda", torch.float16, enabled=device == "cuda"):
                loss = compiled(**example_batch(model, batch=4, seq=seq, device=device)).loss
            loss.backward()
        counts.append(counters["stats"]["unique_graphs"])
        if backend == "sparsedrop":
            assert counters["sparsedrop"]["attention_fused"] >= 2
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("d,kernel,dynamic", [
    pytest.param(64, "triton", False, id="d64-triton"),
    pytest.param(80, "auto", True, id="d80-auto-dynamic"),
    pytest.param(80, "triton", True, id="d80-triton-dynamic", marks=pytest.mark.interpret),  # as it ran, not yet on a GPU
])
def test_padded_tiles_reach_the_triton_attention_kernels_through_the_backend(d, kernel, dynamic):
    """kernel="triton" (on CUDA, else interpreted on CPU): the compiled graph's padded keep tiles
    are cut to size before the kernels read them; forward and gradients equal the reference with
    the same tiles. Also head dim 80 (padded to 128 in the kernels) with dynamic shapes (the head
    dim is specialised, the sequence is not), and through kernel="auto" (the reference on CPU)."""
    from sparsedrop_compile.kernels import flash_attention as fa

    gen = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(2, 2, 40, d, generator=gen).half().to(device) for _ in range(3))
    block = (16, 32)
    options = {"attention_block": block, "kernel": kernel, "inner": "aot_eager"}
    f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.3), backend="sparsedrop",
                      options=options, dynamic=dynamic)
    results = []
    for compiled in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(9)
        if compiled:
            out = f(*leaves)
        else:
            keep = fa.sample_attention_keep(*leaves[:2], 0.3, *block)
            out = fa.reference_attention(*(t.float() for t in leaves), None, keep, 0.3, block=block)
        out.float().sum().backward()
        results.append([out] + [t.grad for t in leaves])
    assert counters["sparsedrop"]["attention_fused"] == 1
    for a, b in zip(*results):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 4e-3 * scale  # a few fp16 ulp of the largest value


_TRACED_OPS_SCRIPT = r"""
import sys
import torch
from torch._dynamo.utils import counters
from sparsedrop_compile.kernels import runtime
assert not runtime.INTERPRET  # the ops are triton_ops, traced into as on a CUDA machine
sys.path.insert(0, sys.argv[1])
from test_dynamic_shapes import CASES, SIZES  # the cases of the tests above
def graphs(fn, make, backend):
    torch._dynamo.reset()
    counters.clear()
    opts = {"options": {"block_size": 8, "inner": "aot_eager", "attention_block": (16, 16)}} if backend == "sparsedrop" else {}
    compiled = torch.compile(fn, backend=backend, dynamic=True, **opts)
    for s in SIZES:  # forward and backward: the gradient ops are traced into too
        compiled(*[t.requires_grad_() for t in make(s)]).sum().backward()
    return counters["stats"]["unique_graphs"], sum(v for k, v in counters["sparsedrop"].items() if k.endswith("_fused"))
for name in sorted(CASES):
    ours, fused = graphs(*CASES[name], "sparsedrop")
    theirs, _ = graphs(*CASES[name], "aot_eager")
    print(name, ours, theirs, fused)
"""


def test_no_more_graphs_than_aot_eager_when_the_ops_are_traced_into():
    """On a CUDA build the ops are triton_ops, whose bodies torch.compile traces with symbolic
    sizes (under the interpreter, as in the tests above, they are opaque). Without the
    interpreter this runs that tracing on CPU tensors, whose calls take the opaque references:
    the ops' own checks (keep shapes, layouts) must add no guard either."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _TRACED_OPS_SCRIPT, tests_dir], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    assert [r[0] for r in rows] == sorted(CASES), out.stdout
    for name, ours, theirs, fused in rows:
        assert int(fused) == FUSED.get(name, 1) and int(ours) == int(theirs) == 1, (name, ours, theirs, fused)


@pytest.mark.parametrize("size_class", ["launch-bound", "large"])
@pytest.mark.parametrize("dynamic_dims", ["rows", "k", "n", "all"])
def test_traced_launchers_add_no_guard(monkeypatch, dynamic_dims, size_class):
    """The three matmul launchers on fake tensors with symbolic sizes (as torch.compile traces
    them on a GPU) add no guard to the shape env, also when every tensor handed to a kernel is
    cloned, as functionalising the launch does (a tensor with a dim that is a bare block count
    would guard on that count being 1: one recompile per side of one block)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from sparsedrop_compile.kernels import block_sparse_matmul_triton as bsm, kept_blocks
    from sparsedrop_compile.kernels.block_mask import cdiv

    class CloningLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: [t.clone() for t in args if isinstance(t, torch.Tensor)]

    monkeypatch.setattr(bsm, "launch", lambda kernel: CloningLaunch())
    monkeypatch.setattr(kept_blocks, "launch", lambda kernel: CloningLaunch())  # the kept-block lists
    if size_class == "large":  # kept-block lists and the persistent sdd (runtime.launch_bound)
        from sparsedrop_compile.kernels import runtime

        monkeypatch.setattr(runtime, "LAUNCH_BOUND_WORK", 0)
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    which = {"rows": (1, 0, 0), "k": (0, 1, 0), "n": (0, 0, 1), "all": (1, 1, 1)}[dynamic_dims]
    dims = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC if d else DimDynamic.STATIC for d in which])
    sizes = mode.from_tensor(torch.empty(40, 72, 24), symbolic_context=dims)
    with mode:
        M, K, N = sizes.shape
        a, g, b_kn = torch.randn(1, M, K), torch.randn(1, M, N), torch.randn(1, K, N)
        keep = torch.ones(1, cdiv(M, 16) + 1, cdiv(K, 16) + 1, dtype=torch.bool)  # padded, as graphs draw them
        out_keep = torch.ones(1, cdiv(M, 16) + 1, cdiv(N, 16) + 1, dtype=torch.bool)
        calls = {
            "dsd": lambda: bsm.dsd(a, b_kn, keep, 1.25, (16, 16), _supported=True),
            "dsd out_keep": lambda: bsm.dsd(a, b_kn, keep, 1.25, (16, 16), out_keep=out_keep, _supported=True),
            "sdd": lambda: bsm.sdd(g, b_kn, keep, 1.25, (16, 16), _supported=True),
            "sdd reduce_keep": lambda: bsm.sdd(g, b_kn, keep, 1.25, (16, 16), reduce_keep=out_keep, _supported=True),
            "dsd_tn": lambda: bsm.dsd_tn(a, g, keep, 1.25, (16, 16), False, _supported=True),
            "dsd_tn batched": lambda: bsm.dsd_tn(a, g, keep, 1.25, (16, 16), True, _supported=True),
            "dsd_tn grad_keep": lambda: bsm.dsd_tn(a, g, keep, 1.25, (16, 16), False, grad_keep=out_keep, _supported=True),
        }
        for name, call in calls.items():
            call()
            assert not env.guards, (name, [str(guard.expr) for guard in env.guards])


@pytest.mark.parametrize("mask", [None, "bool, broadcast over heads and queries", "float, broadcast over heads"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_traced_attention_launchers_add_no_guard(monkeypatch, mask, layout):
    """The attention launchers, forward and backward, on fake tensors with a symbolic sequence
    length and every kernel argument cloned (as functionalising a traced launch does) add no
    guard. The tile classes of a bool mask once had a dim that was a bare tile count (1 for a
    mask broadcast over queries): the clone guarded on the key tiles being more than one, and a
    BERT batch shorter than one attention block recompiled on CUDA."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from sparsedrop_compile.kernels import flash_attention_triton as fat
    from sparsedrop_compile.kernels.block_mask import cdiv

    class CloningLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: [t.clone() for t in args if isinstance(t, torch.Tensor)]

    monkeypatch.setattr(fat, "launch", lambda kernel: CloningLaunch())
    monkeypatch.setattr(fat, "interpreting", lambda: False)  # the GPU path, as torch.compile traces it there
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    dims = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC])
    sizes = mode.from_tensor(torch.empty(40), symbolic_context=dims)
    with mode:
        (S,) = sizes.shape
        B, H, D = 4, 2, 64
        if layout == "bhsd":
            q, k, v = (torch.empty(B, H, S, D, dtype=torch.float16) for _ in range(3))
        else:  # head-split views of a projection's output, as HF models make them
            q, k, v = (torch.empty(B, S, H * D, dtype=torch.float16).view(B, S, H, D).transpose(1, 2) for _ in range(3))
        keep = torch.ones(B, H, cdiv(S, 16) + 1, cdiv(S, 16) + 1, dtype=torch.bool)  # padded, as graphs draw it
        attn_mask = None
        if mask is not None and mask.startswith("bool"):
            attn_mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        elif mask is not None:
            attn_mask = torch.zeros(B, 1, S, S, dtype=torch.float16)
        args = (attn_mask, keep, 0.1, False, None, False, (16, 16), "dropout")
        out, lse = fat.attention_forward(q, k, v, *args)
        assert not env.guards, ("forward", [str(guard.expr) for guard in env.guards])
        fat.attention_backward(torch.empty_like(out), q, k, v, out, lse, *args, attn_mask is not None)
        assert not env.guards, ("backward", [str(guard.expr) for guard in env.guards])

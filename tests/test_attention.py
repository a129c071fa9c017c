"""Tile dropout inside attention: the reference, the Triton kernels (interpreted on CPU), the ops.

The reference is checked against plain SDPA (every tile kept) and against a hand-built element
mask; the kernels and the ops are checked against the reference in fp32, with tolerances of a
few units in the last place of the input dtype, scaled by the largest value compared.
"""
from __future__ import annotations

import math

import pytest
import torch

import sparsedrop_compile as sd
import torch.nn.functional as F

import sparsedrop_compile  # noqa: F401  (registers the ops)
from sparsedrop_compile.attention_ops import sparse_dropout_attention
from sparsedrop_compile.kernels import flash_attention as fa
from sparsedrop_compile.kernels import flash_attention_triton as fat
from sparsedrop_compile.kernels import runtime

# Largest error allowed, as a fraction of the largest reference value: about 4 ulp of the dtype.
REL_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}


def assert_close_scaled(actual, expected, dtype, what=""):
    expected = expected.float()
    scale = max(expected.abs().max().item(), 1e-6)
    err = (actual.float() - expected).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"{what}: max error {err:.3g} > {REL_TOL[dtype]} x {scale:.3g}"


def make_inputs(b=1, hq=2, hkv=None, sq=77, sk=77, d=64, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = hq if hkv is None else hkv
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    grad = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    return q, k, v, grad, g


def random_keep(q, k, p, block, g):
    return torch.rand(fa.attention_keep_shape(q.shape, k.shape, block), generator=g) >= p


def run_op(inputs, keep, p, causal, scale, gqa, block, mode, kernel, grad):
    """Forward + backward through sparsedrop::attention; returns out and grads of q, k, v, mask."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = torch.ops.sparsedrop.attention(*leaves, keep, p, causal, scale, gqa, block[0], block[1], mode, kernel)
    out.backward(grad.to(out.dtype))
    return [out] + [t.grad if t is not None and t.is_floating_point() else None for t in leaves]


def upcast(t):
    return t.float() if t is not None and t.is_floating_point() else t


# --------------------------------------------------------------------------- keep tiles
def test_keep_shape_counts_ragged_tiles():
    assert fa.attention_keep_shape((2, 4, 77, 64), (2, 2, 300, 64), (32, 64)) == (2, 4, 3, 5)
    q, k = torch.zeros(2, 4, 77, 64), torch.zeros(2, 4, 300, 64)
    keep = fa.sample_attention_keep(q, k, 0.25, 32, 64)
    assert keep.dtype == torch.bool and keep.shape == (2, 4, 3, 5)


def test_keep_fraction_is_one_minus_p():
    q = k = torch.zeros(8, 16, 1024, 8)
    torch.manual_seed(0)
    keep = fa.sample_attention_keep(q, k, 0.3, 16, 16)  # 131072 tiles
    assert abs(keep.float().mean().item() - 0.7) < 0.01


def test_keep_sampling_traces_with_dynamic_shapes():
    """sample_attention_keep must trace on SymInt sizes: no int() on sizes, no recompiles."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def f(q, k):
        return fa.sample_attention_keep(q, k, 0.1, 32, 64)

    assert f(torch.zeros(1, 2, 77, 8), torch.zeros(1, 2, 300, 8)).shape == (1, 2, 3, 5)
    assert f(torch.zeros(1, 2, 129, 8), torch.zeros(1, 2, 65, 8)).shape == (1, 2, 5, 2)
    assert counter.frame_count == 1


# --------------------------------------------------------------------------- reference
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_reference_equals_sdpa_when_every_tile_is_kept(mask_kind, causal, gqa):
    q, k, v, grad, g = make_inputs(b=2, hq=4, hkv=2 if gqa else 4, sq=33, sk=45, d=16, dtype=torch.float32)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 33, 45, generator=g) > 0.3
        mask[..., 0] = True  # no fully masked row (SDPA's fused kernels give NaN there)
    elif mask_kind == "float":
        mask = torch.randn(1, 4, 33, 45, generator=g)
    keep = torch.ones(fa.attention_keep_shape(q.shape, k.shape, (16, 16)), dtype=torch.bool)
    inputs = [q, k, v, mask]
    leaves = [t.clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fa.reference_attention(*leaves, keep, 0.0, causal, 0.3, gqa, (16, 16))
    out.backward(grad)
    sdpa_leaves = [t.clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    sdpa_mask, sdpa_causal = sdpa_leaves[3], causal
    if causal and mask is not None:  # SDPA refuses both at once: fold the diagonal into the mask
        tril = torch.ones(33, 45, dtype=torch.bool).tril()
        sdpa_mask = sdpa_mask & tril if mask.dtype == torch.bool else sdpa_mask.masked_fill(~tril, float("-inf"))
        sdpa_causal = False
    expected = F.scaled_dot_product_attention(*sdpa_leaves[:3], sdpa_mask, is_causal=sdpa_causal, scale=0.3,
                                              enable_gqa=gqa)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(leaves, sdpa_leaves):
        if a is not None and a.is_floating_point():
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def _element_mask_attention(q, k, v, keep, p, block, mode):
    """The definition, by hand: expand each tile flag to its elements with loops."""
    sq, sk = q.shape[-2], k.shape[-2]
    elem = torch.zeros(*q.shape[:-2], sq, sk, dtype=torch.bool)
    for i in range(sq):
        for j in range(sk):
            elem[..., i, j] = keep[..., i // block[0], j // block[1]]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mode == "dropkey":
        return torch.softmax(s.masked_fill(~elem, float("-inf")), -1).nan_to_num(0.0) @ v
    return (torch.softmax(s, -1) * elem / (1 - p)) @ v


@pytest.mark.parametrize("mode", ["post_softmax", "dropkey"])
def test_reference_equals_hand_built_element_mask(mode):
    q, k, v, _, g = make_inputs(b=2, hq=3, hkv=3, sq=21, sk=37, d=8, dtype=torch.float32)
    block = (8, 16)
    keep = random_keep(q, k, 0.4, block, g)
    keep[0, 0, 1, :] = False  # a whole row of tiles dropped: dropkey gives zeros there
    out = fa.reference_attention(q, k, v, None, keep, 0.4, block=block, mode=mode)
    torch.testing.assert_close(out, _element_mask_attention(q, k, v, keep, 0.4, block, mode), atol=1e-5, rtol=1e-5)
    if mode == "dropkey":
        assert out[0, 0, 8:16].abs().max() == 0


def test_reference_dropout_is_unbiased():
    """Averaged over many keep samples, tile dropout after the softmax gives the dense output."""
    q, k, v, _, g = make_inputs(b=1, hq=1, sq=16, sk=16, d=8, dtype=torch.float32)
    n = 4000
    keep = torch.rand(n, 1, 4, 4, generator=g) >= 0.5
    qs, ks, vs = (t.expand(n, *t.shape[1:]) for t in (q, k, v))
    mean = fa.reference_attention(qs, ks, vs, None, keep, 0.5, block=(4, 4)).mean(0)
    dense = F.scaled_dot_product_attention(q, k, v)[0]
    # Each output is a sum of 4 independent tiles: its std over samples is below max|v|, so the
    # mean of n samples is within ~4 / sqrt(n) of the dense value.
    assert (mean - dense).abs().max() < 4 * v.abs().max() / math.sqrt(n)


@pytest.mark.parametrize("mode", ["post_softmax", "dropkey"])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_backward_formulas_equal_autograd(mode, causal):
    q, k, v, grad, g = make_inputs(b=2, hq=4, hkv=2, sq=19, sk=27, d=8, dtype=torch.float32)
    block = (8, 8)
    keep = random_keep(q, k, 0.4, block, g)
    mask = torch.randn(1, 4, 19, 27, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    out = fa.reference_attention(*leaves, keep, 0.4, causal, 0.25, True, block, mode)
    out.backward(grad)
    dq, dk, dv, dmask = fa.reference_attention_backward(grad, q, k, v, mask, keep, 0.4, causal, 0.25, True, block, mode, True)
    for got, leaf in zip((dq, dk, dv, dmask), leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-5, rtol=1e-5)


def test_reference_fully_masked_rows_give_zeros_and_finite_grads():
    q, k, v, grad, _ = make_inputs(b=1, hq=2, sq=8, sk=8, d=8, dtype=torch.float32)
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[3] = False
    keep = torch.ones(1, 2, 1, 1, dtype=torch.bool)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fa.reference_attention(*leaves, mask, keep, 0.1, block=(8, 8))
    out.backward(grad)
    assert out[:, :, 3].abs().max() == 0
    assert all(torch.isfinite(t.grad).all() for t in leaves)


# --------------------------------------------------------------------------- Triton kernels vs reference
# (name, sq, sk, hq, hkv, d, dtype, block, causal, mask, mode, backward strategy); the backward
# strategies alternate so both see masks, GQA, causal and dropkey.
KERNEL_CASES = [
    ("plain", 77, 77, 2, 2, 64, torch.float16, (32, 32), False, None, "post_softmax", "atomic"),
    ("causal-bf16", 77, 77, 2, 2, 64, torch.bfloat16, (32, 64), True, None, "post_softmax", "two_pass"),
    ("sk300-float-mask-grad", 77, 300, 2, 2, 64, torch.float16, (16, 64), False, "float_bh", "post_softmax", "two_pass"),
    ("sq300-bool-padding", 300, 77, 2, 2, 64, torch.bfloat16, (64, 32), False, "bool_b11", "post_softmax", "atomic"),
    ("causal-sq-gt-sk-padding-bias", 100, 45, 2, 2, 64, torch.float16, (32, 16), True, "float_b11", "post_softmax",
     "two_pass"),
    ("gqa-causal-2d-mask-grad", 77, 77, 4, 2, 64, torch.float16, (32, 32), True, "float_2d", "post_softmax", "two_pass"),
    ("float-full-mask-grad", 77, 77, 2, 2, 64, torch.bfloat16, (32, 32), False, "float_full", "post_softmax",
     "atomic"),
    ("d128-bool-full", 77, 77, 2, 2, 128, torch.bfloat16, (32, 32), False, "bool_full", "post_softmax", "atomic"),
    ("dropkey-causal", 77, 77, 2, 2, 64, torch.float16, (16, 32), True, None, "dropkey", "atomic"),
    ("dropkey-float-mask-gqa", 77, 300, 4, 1, 64, torch.bfloat16, (32, 64), False, "float_bh", "dropkey", "two_pass"),
]


def _mask(kind, b, hq, sq, sk, dtype, g):
    if kind is None:
        return None
    if kind == "float_bh":  # T5's position bias: one per head, shared over the batch
        return (torch.randn(1, hq, sq, sk, generator=g) * 2).to(dtype)
    if kind == "float_full":  # T5 with padding: position bias + padding, one (B, H, Sq, Sk) float mask
        return ((torch.randn(1, hq, sq, sk, generator=g) * 2) + torch.randn(b, 1, 1, sk, generator=g)).to(dtype)
    if kind == "float_b11":  # an additive padding mask, one row shared by every query
        return torch.randn(b, 1, 1, sk, generator=g).to(dtype)
    if kind == "float_2d":
        return torch.randn(sq, sk, generator=g).to(dtype)
    if kind == "bool_b11":  # BERT's padding mask: keys only
        m = torch.ones(b, 1, 1, sk, dtype=torch.bool)
        m[0, ..., sk - sk // 3:] = False
        return m
    if kind == "bool_full":  # with a fully masked row, which must give zeros
        m = torch.rand(b, hq, sq, sk, generator=g) > 0.5
        m[0, 0, 5] = False
        return m
    if kind == "bool_pad_full":  # HF BERT: a materialised (B, 1, Sq, Sk) key-padding mask
        m = torch.ones(b, 1, sq, sk, dtype=torch.bool)
        m[::2, ..., sk - sk // 4:] = False  # 25% of the keys in half the batch, whole key tiles included
        return m
    if kind == "bool_causal_pad":  # HF GPT-2: causal & padding in one (B, 1, Sq, Sk) bool, is_causal=False
        m = torch.ones(sq, sk, dtype=torch.bool).tril().expand(b, 1, sq, sk).clone()
        m[0, ..., sk - sk // 4:] = False  # right padding
        m[-1, ..., : sk // 5] = False  # left padding: the first sk // 5 rows see no key at all
        return m
    if kind == "float_neginf":  # a float bias with -inf tiles, -inf key padding and all -inf rows
        m = torch.randn(1, hq, sq, sk, generator=g) * 2
        m[:, 0, : sq // 2, sk // 4: sk // 2 + 16] = float("-inf")
        m[:, :, :, sk - sk // 5:] = float("-inf")
        m[:, -1, 3:9] = float("-inf")
        m[:, -1, sq // 2:, : sk // 2] = 0.0  # plain (all-zero) tiles too
        return m.to(dtype)
    raise ValueError(kind)


# --------------------------------------------------------------------------- head dims
# Every multiple of 8 up to 256 (supported_head_dim): dims that are not powers of two run over a
# padded extent with the padding masked off. In KERNEL_CASES' layout, run by
# test_triton_matches_reference; 16x16 mask tiles, so the kernels take their 16x16 configs and
# the sequence lengths (not multiples of 16) give full and ragged tiles both.
HEAD_DIM_CASES = [
    ("d8-causal", 45, 45, 2, 2, 8, torch.float16, (16, 16), True, None, "post_softmax", "two_pass"),
    ("d32-bool-key-padding-atomic", 45, 70, 2, 2, 32, torch.bfloat16, (16, 16), False, "bool_b11", "post_softmax", "atomic"),
    ("d40-float-mask-grad", 45, 45, 2, 2, 40, torch.float16, (16, 16), False, "float_bh", "post_softmax", "two_pass"),
    ("d80", 45, 45, 2, 2, 80, torch.float16, (16, 16), False, None, "post_softmax", "two_pass"),
    ("d80-causal-atomic", 45, 45, 2, 2, 80, torch.bfloat16, (16, 16), True, None, "post_softmax", "atomic"),
    ("d80-dropkey-bool-pad-full", 45, 70, 2, 2, 80, torch.float16, (16, 16), False, "bool_pad_full", "dropkey", "two_pass"),
    ("d96-gqa-causal", 45, 45, 4, 2, 96, torch.float16, (16, 16), True, None, "post_softmax", "two_pass"),
    ("d96-gqa-atomic-bf16", 45, 45, 4, 2, 96, torch.bfloat16, (16, 16), False, None, "post_softmax", "atomic"),
    ("d136-float-2d-grad", 40, 40, 2, 2, 136, torch.float16, (16, 16), True, "float_2d", "post_softmax", "two_pass"),
    ("d256-causal", 40, 40, 2, 2, 256, torch.bfloat16, (16, 16), True, None, "post_softmax", "two_pass"),
    ("d256-bool-full-atomic", 40, 40, 2, 2, 256, torch.float16, (16, 16), False, "bool_full", "post_softmax", "atomic"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("case", KERNEL_CASES + HEAD_DIM_CASES, ids=[c[0] for c in KERNEL_CASES + HEAD_DIM_CASES])
def test_triton_matches_reference(case, monkeypatch):
    _, sq, sk, hq, hkv, d, dtype, block, causal, mask_kind, mode, strategy = case
    monkeypatch.setitem(fat.BACKWARD_STRATEGY, fat.head_dim_class(d), strategy)
    q, k, v, grad, g = make_inputs(b=2, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d, dtype=dtype)
    mask = _mask(mask_kind, 2, hq, sq, sk, dtype, g)
    keep = random_keep(q, k, 0.3, block, g)
    got = run_op([q, k, v, mask], keep, 0.3, causal, None, hq != hkv, block, mode, "triton", grad)
    ref = run_op([upcast(q), upcast(k), upcast(v), upcast(mask)], keep, 0.3, causal, None, hq != hkv, block, mode,
                 "reference", grad)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dmask"), got, ref):
        if b is None:
            assert a is None
            continue
        assert a.dtype == dtype and a.shape == b.shape, name
        assert_close_scaled(a, b, dtype, name)


@pytest.mark.interpret
@pytest.mark.parametrize("mode", ["post_softmax", "dropkey"])
@pytest.mark.parametrize("kept", [True, False])
def test_triton_keep_all_true_and_all_false(mode, kept):
    q, k, v, grad, g = make_inputs(sq=50, sk=70)
    mask = torch.randn(1, 2, 50, 70, generator=g).half()
    keep = torch.full(fa.attention_keep_shape(q.shape, k.shape, (32, 32)), kept)
    got = run_op([q, k, v, mask], keep, 0.25, False, None, False, (32, 32), mode, "triton", grad)
    if not kept:
        # Nothing kept: zero output; post_softmax still has dS = -P·rowsum(dO⊙O) = 0 since O = 0.
        for t in got:
            assert t.abs().max() == 0
        return
    leaves = [t.float().requires_grad_() for t in (q, k, v, mask)]
    expected = F.scaled_dot_product_attention(*leaves) * (1 / 0.75 if mode == "post_softmax" else 1.0)
    expected.backward(grad.float())
    for a, b in zip(got, [expected] + [t.grad for t in leaves]):
        assert_close_scaled(a, b, torch.float16)


@pytest.mark.interpret
@pytest.mark.parametrize("cfg", [0, 1, 4])
def test_triton_padded_head_dim_with_split_tiles_and_skip_modes(cfg):
    """Head dim 80 (padded to 128) through kernel tiles smaller than the mask tile and every skip
    mode (the lazy loads of V / dO under a kept tile's branch included), with a float-mask
    gradient; the strided dQ buffer of the atomic backward too (SPLIT_CONFIGS[4])."""
    _check_split_tiles(SPLIT_CONFIGS[cfg], causal=False, d=80)


@pytest.mark.interpret
@pytest.mark.parametrize("d,strategy", [(256, "two_pass"), (136, "atomic")])
def test_triton_head_dim_256_class_with_its_first_tiles(d, strategy, monkeypatch):
    """The default mask tile, so each pass runs the first candidate of the 256 table (64x64
    forward and dK/dV tiles, 64x16 dQ tiles), with a classified bool mask and causal; 136 pads to
    256."""
    monkeypatch.setitem(fat.BACKWARD_STRATEGY, 256, strategy)
    q, k, v, grad, g = make_inputs(b=1, hq=2, sq=70, sk=70, d=d, dtype=torch.bfloat16)
    mask = _mask("bool_pad_full", 1, 2, 70, 70, torch.bfloat16, g)
    block = fat.DEFAULT_BLOCK
    keep = random_keep(q, k, 0.3, block, g)
    got = run_op([q, k, v, mask], keep, 0.3, True, None, False, block, "post_softmax", "triton", grad)
    ref = run_op([upcast(q), upcast(k), upcast(v), mask], keep, 0.3, True, None, False, block, "post_softmax",
                 "reference", grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close_scaled(a, b, torch.bfloat16, name)


def test_config_precedence_problem_class_then_tma_then_table():
    """A config override wins; else PROBLEM_FIRST's config for the problem's class (plain: no
    attention mask; bool_mask: a bool one every query row shares; bool_mask_rows: a bool one
    whose rows differ; dropout after the softmax), then TMA_FIRST's where K and V come by TMA,
    where it fits the mask tile; else the table's first that fits. A class without an entry for
    the pass, or the same class with the other loads, never takes the entry's config."""
    classes = ("plain", "bool_mask", "bool_mask_rows", None)
    for (problem, kind, cls, tma), cfg in fat.PROBLEM_FIRST.items():
        block = (cfg.tile_m * 2, cfg.tile_n)
        assert fat._pick_config(kind, cls, block, tma_loads=tma, problem=problem) is cfg
        for other in classes:
            if (other, kind, cls, tma) not in fat.PROBLEM_FIRST:
                assert fat._pick_config(kind, cls, block, tma_loads=tma, problem=other) != cfg
        if (problem, kind, cls, not tma) not in fat.PROBLEM_FIRST:
            assert fat._pick_config(kind, cls, block, tma_loads=not tma, problem=problem) != cfg
        # a mask tile it does not fit: the next rule
        small = (16, 16)
        assert fat._pick_config(kind, cls, small, tma_loads=tma, problem=problem).tile_m == 16
        override = (16, 16, 4, 2, 0)
        assert fat._pick_config(kind, cls, block, override, tma_loads=tma, problem=problem) == fat.as_config(override)
    for (kind, cls), cfg in fat.TMA_FIRST.items():
        block = (cfg.tile_m * 2, cfg.tile_n)
        for problem in classes:
            if (problem, kind, cls, True) not in fat.PROBLEM_FIRST:
                assert fat._pick_config(kind, cls, block, tma_loads=True, problem=problem) is cfg
        assert fat._pick_config(kind, cls, block, tma_loads=False) is fat.CANDIDATES[kind][cls][0]


def test_problem_class_names_the_mask_and_mode():
    q = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    keep = torch.ones(1, 2, 1, 1, dtype=torch.bool)
    bool_mask = torch.ones(1, 1, 1, 64, dtype=torch.bool)  # a key-padding view: every query row shares it
    materialised = bool_mask.expand(1, 1, 64, 64).contiguous()  # as HF builds it: a row per query
    float_mask = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)
    problem = lambda m, mode: fat._Problem(q, q, q, m, keep, 0.1, False, None, False, (64, 128), mode).problem_class  # noqa: E731
    assert problem(None, "post_softmax") == "plain"
    assert problem(bool_mask, "post_softmax") == "bool_mask"
    assert problem(materialised, "post_softmax") == "bool_mask_rows"
    assert problem(materialised.tril(), "post_softmax") == "bool_mask_rows"
    assert problem(float_mask, "post_softmax") is None
    assert problem(None, "dropkey") is None
    assert problem(bool_mask, "dropkey") is None


def test_head_dim_rule_and_config_classes():
    for d in range(8, 257, 8):
        assert fa.supported_head_dim(d), d
        cls = fat.head_dim_class(d)
        assert cls == (64 if d <= 64 else 128 if d <= 128 else 256)
        assert d <= fat.padded_head_dim(d) <= cls
        # Every class has candidates for every pass, the last of which fits any multiple-of-16 tile.
        for kind in fat.CANDIDATES:
            assert fat._pick_config(kind, d, (16, 16)).tile_m == 16
            assert fat._pick_config(kind, d, fat.DEFAULT_BLOCK) is fat.CANDIDATES[kind][cls][0]
        assert fat.backward_strategy(d) in ("two_pass", "atomic")
    for d in (0, 4, 12, 20, 100, 255, 260, 264, 512, 8.0, True, None):
        assert not fa.supported_head_dim(d), d
    assert [fat.padded_head_dim(d) for d in (8, 16, 24, 40, 64, 80, 96, 128, 136, 192, 256)] == [
        16, 16, 32, 64, 64, 128, 128, 128, 256, 256, 256]
    with pytest.raises(ValueError, match="multiples of 8 up to 256"):
        fat.head_dim_class(260)


def test_reference_takes_any_head_dim():
    """The CPU path (kernel="auto" off CUDA) runs the reference, which has no head-dim rule: the
    op gives SDPA's numbers with every tile kept, whatever the head dim."""
    for d in (8, 12, 80, 96, 256, 260):
        q, k, v, grad, _ = make_inputs(b=1, hq=2, sq=20, sk=30, d=d, dtype=torch.float32)
        keep = torch.ones(fa.attention_keep_shape(q.shape, k.shape, (16, 16)), dtype=torch.bool)
        got = run_op([q, k, v, None], keep, 0.0, True, None, False, (16, 16), "post_softmax", "auto", grad)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = F.scaled_dot_product_attention(*leaves, is_causal=True)
        expected.backward(grad)
        for a, b in zip(got[:4], [expected] + [t.grad for t in leaves]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- mask tile classes
def _expected_classes(mask, b, h, sq, sk, tile):
    """Class of every (tile) of the mask expanded to (b, h, sq, sk), by the definition."""
    full = mask.expand(b, h, sq, sk)
    if mask.dtype == torch.bool:
        vis, plain = full, full
    else:
        vis, plain = full != float("-inf"), full == 0
    nq, nk = -(-sq // tile[0]), -(-sk // tile[1])
    cls = torch.empty(b, h, nq, nk, dtype=torch.int8)
    for i in range(nq):
        for j in range(nk):
            sl = (..., slice(i * tile[0], (i + 1) * tile[0]), slice(j * tile[1], (j + 1) * tile[1]))
            any_vis = vis[sl].flatten(2).any(-1)
            cls[:, :, i, j] = torch.where(~any_vis, 0, torch.where(plain[sl].flatten(2).all(-1), 1, 2))
    return cls


@pytest.mark.interpret
@pytest.mark.parametrize("kind", ["bool_b11", "bool_pad_full", "bool_causal_pad"])
def test_tile_classes_match_the_definition(kind):
    q, k, v, _, g = make_inputs(b=2, hq=2, sq=77, sk=300)
    mask = _mask(kind, 2, 2, 77, 300, torch.float16, g)
    keep = random_keep(q, k, 0.3, (64, 128), g)
    pb = fat._Problem(q, k, v, mask, keep, 0.3, False, None, False, (64, 128), "post_softmax")
    tiles = [(32, 64), (64, 16)]
    for got, tile in zip(fat._tile_classes(pb, tiles), tiles):
        # Broadcast dims of the mask keep one entry with stride 0: expand before comparing.
        t = torch.as_strided(got.tensor, (2, 2, -(-77 // tile[0]), -(-300 // tile[1])), got.strides)
        assert torch.equal(t, _expected_classes(mask, 2, 2, 77, 300, tile)), tile
        assert got.tensor.numel() <= t.numel()


# HF-style materialised masks: whole hidden tiles are trimmed from the loops, plain tiles skip
# their mask loads. (name, sq, sk, hq, hkv, d, dtype, causal, mask, mode, backward strategy)
HF_MASK_CASES = [
    ("bool-pad-full-77x300", 77, 300, 2, 2, 64, torch.float16, False, "bool_pad_full", "post_softmax", "two_pass"),
    ("bool-causal-pad-300", 300, 300, 2, 2, 64, torch.bfloat16, False, "bool_causal_pad", "post_softmax", "atomic"),
    ("bool-causal-pad-dropkey-gqa", 77, 77, 4, 2, 64, torch.float16, False, "bool_causal_pad", "dropkey", "two_pass"),
    ("bool-pad-full-and-causal-d128", 77, 77, 2, 2, 128, torch.bfloat16, True, "bool_pad_full", "post_softmax",
     "two_pass"),
    ("float-neginf-grad", 77, 300, 2, 2, 64, torch.float16, False, "float_neginf", "post_softmax", "two_pass"),
    ("float-neginf-grad-atomic-causal", 77, 77, 2, 2, 64, torch.bfloat16, True, "float_neginf", "post_softmax",
     "atomic"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("case", HF_MASK_CASES, ids=[c[0] for c in HF_MASK_CASES])
def test_triton_hf_masks_match_reference(case, monkeypatch):
    _, sq, sk, hq, hkv, d, dtype, causal, mask_kind, mode, strategy = case
    monkeypatch.setitem(fat.BACKWARD_STRATEGY, d, strategy)
    q, k, v, grad, g = make_inputs(b=2, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d, dtype=dtype)
    mask = _mask(mask_kind, 2, hq, sq, sk, dtype, g)
    block = fat.DEFAULT_BLOCK
    keep = random_keep(q, k, 0.3, block, g)
    got = run_op([q, k, v, mask], keep, 0.3, causal, None, hq != hkv, block, mode, "triton", grad)
    ref = run_op([upcast(q), upcast(k), upcast(v), upcast(mask)], keep, 0.3, causal, None, hq != hkv, block, mode,
                 "reference", grad)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dmask"), got, ref):
        if b is None:
            assert a is None
            continue
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert_close_scaled(a, b, dtype, name)
    hidden = mask.expand(2, hq, sq, sk) == (False if mask.dtype == torch.bool else float("-inf"))
    if causal:
        hidden = hidden | torch.ones(sq, sk, dtype=torch.bool).triu(1)
    dead_rows = hidden.all(-1)
    assert dead_rows.any() or mask_kind == "bool_pad_full"
    assert got[0][dead_rows].abs().max() == 0 if dead_rows.any() else True  # rows with no visible key give 0
    if got[4] is not None:
        # dS is exactly 0 where the mask hides an element (P = 0), skipped tiles included.
        assert got[4].expand_as(hidden)[hidden].abs().max() == 0


@pytest.mark.parametrize("kind", ["float_neginf", "float_2d"])
def test_float_masks_are_not_classified(kind):
    # Classes cost registers in the float-mask kernels and HF's float masks have no hidden or
    # plain tiles (see _tile_classes): float masks take the unclassified path.
    q, k, v, _, g = make_inputs(b=2, hq=2, sq=77, sk=300)
    mask = _mask(kind, 2, 2, 77, 300, torch.float16, g)
    keep = random_keep(q, k, 0.3, (64, 128), g)
    pb = fat._Problem(q, k, v, mask, keep, 0.3, False, None, False, (64, 128), "post_softmax")
    assert not any(c.enabled for c in fat._tile_classes(pb, [(32, 64), (64, 16)]))


@pytest.mark.interpret
@pytest.mark.parametrize("mask_kind,strategy", [("bool_pad_full", "two_pass"), ("bool_pad_full", "atomic")])
def test_triton_hidden_tiles_are_never_read(mask_kind, strategy, monkeypatch):
    """Keys 256..299 are hidden for every query (of batch 0 at least) and fill whole kernel tiles
    (64 or 128 keys wide): make them NaN. Were those tiles visited, NaN would reach O (P·V with
    P = 0 is still NaN) and the gradients; trimmed, everything matches the reference run on
    zeros there, and dK, dV of those keys are exactly 0."""
    monkeypatch.setitem(fat.BACKWARD_STRATEGY, 64, strategy)
    q, k, v, grad, g = make_inputs(b=2, hq=2, sq=77, sk=300)
    mask = _mask(mask_kind, 2, 2, 77, 300, torch.float16, g)
    keep = random_keep(q, k, 0.3, fat.DEFAULT_BLOCK, g)
    poisoned = (slice(None) if mask_kind == "float_neginf" else 0, slice(None), slice(256, None))
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[poisoned], v_nan[poisoned] = float("nan"), float("nan")
    k[poisoned], v[poisoned] = 0.0, 0.0
    got = run_op([q, k_nan, v_nan, mask], keep, 0.3, False, None, False, fat.DEFAULT_BLOCK, "post_softmax", "triton",
                 grad)
    ref = run_op([upcast(q), upcast(k), upcast(v), upcast(mask)], keep, 0.3, False, None, False, fat.DEFAULT_BLOCK,
                 "post_softmax", "reference", grad)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dmask"), got, ref):
        if b is not None:
            assert_close_scaled(a, b, torch.float16, name)
    assert got[2][poisoned].abs().max() == 0 and got[3][poisoned].abs().max() == 0


@pytest.mark.interpret
def test_triton_tile_classes_off_gives_the_same_result(monkeypatch):
    q, k, v, grad, g = make_inputs(b=2, hq=2, sq=77, sk=77)
    mask = _mask("bool_causal_pad", 2, 2, 77, 77, torch.float16, g)
    keep = random_keep(q, k, 0.3, (64, 128), g)
    on = run_op([q, k, v, mask], keep, 0.3, False, None, False, (64, 128), "post_softmax", "triton", grad)
    monkeypatch.setattr(fat, "CLASSIFY_MASK_TILES", False)
    off = run_op([q, k, v, mask], keep, 0.3, False, None, False, (64, 128), "post_softmax", "triton", grad)
    for a, b in zip(on[:4], off[:4]):
        # Same tiles in the same order, less the hidden ones (which add exact zeros): bitwise.
        assert torch.equal(a, b)


# Kernel tiles smaller than the mask tile (block splitting), and each way of skipping a tile.
# "bwd": "atomic" is the single-pass backward (dQ summed with atomics in the dK/dV kernel).
SPLIT_CONFIGS = [
    {"fwd": (16, 32, 4, 2, 0), "bwd_kv": (16, 64, 4, 2, 1), "bwd_q": (32, 16, 4, 2, 2)},
    {"fwd": (64, 16, 4, 2, 1), "bwd_kv": (32, 16, 4, 2, 2), "bwd_q": (16, 64, 4, 2, 0)},
    {"fwd": (32, 64, 4, 2, 2), "bwd_kv": (64, 32, 4, 2, 0), "bwd_q": (64, 32, 4, 2, 1)},
    {"fwd": (64, 64, 4, 2, 0), "bwd": "atomic", "bwd_fused": (16, 64, 4, 2, 0)},
    {"fwd": (64, 64, 4, 2, 0), "bwd": "atomic", "bwd_fused": (32, 32, 4, 2, 2)},
]


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cfg", range(len(SPLIT_CONFIGS)))
def test_triton_block_splitting_and_skip_modes(cfg, causal):
    _check_split_tiles(SPLIT_CONFIGS[cfg], causal, d=64)


def _check_split_tiles(config, causal, d):
    """Kernel tiles smaller than the (64, 64) mask tile, with a float-mask gradient: the Triton
    kernels against the reference on the same flags, fp16, 77 queries x 100 keys, head dim d."""
    q, k, v, grad, g = make_inputs(sq=77, sk=100, d=d)
    block = (64, 64)
    keep = random_keep(q, k, 0.4, block, g)
    mask = torch.randn(1, 2, 77, 100, generator=g).half()
    out, lse = fat.attention_forward(q, k, v, mask, keep, 0.4, causal, None, False, block, "post_softmax", config)
    grads = fat.attention_backward(grad, q, k, v, out, lse, mask, keep, 0.4, causal, None, False, block,
                                   "post_softmax", True, config)
    ref_out, ref_lse = fa.reference_attention_forward(q.float(), k.float(), v.float(), mask.float(), keep, 0.4, causal,
                                                      None, False, block, "post_softmax")
    ref = fa.reference_attention_backward(grad.float(), q.float(), k.float(), v.float(), mask.float(), keep, 0.4,
                                          causal, None, False, block, "post_softmax", True)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dmask"), (out, *grads), (ref_out, *ref)):
        assert_close_scaled(a, b, torch.float16, name)


@pytest.mark.interpret
@pytest.mark.parametrize("mode", ["post_softmax", "dropkey"])
def test_triton_atomic_backward_with_gqa_mask_grad_and_causal(mode):
    q, k, v, grad, g = make_inputs(hq=4, hkv=2, sq=77, sk=45)
    block = (32, 16)
    keep = random_keep(q, k, 0.3, block, g)
    mask = torch.randn(45, generator=g).half()  # broadcast over batch, heads and queries
    out, lse = fat.attention_forward(q, k, v, mask, keep, 0.3, True, 0.2, True, block, mode)
    grads = fat.attention_backward(grad, q, k, v, out, lse, mask, keep, 0.3, True, 0.2, True, block, mode, True,
                                   {"bwd": "atomic"})
    ref = fa.reference_attention_backward(grad.float(), q.float(), k.float(), v.float(), mask.float(), keep, 0.3, True,
                                          0.2, True, block, mode, True)
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), grads, ref):
        assert a.shape == b.shape, name
        assert_close_scaled(a, b, torch.float16, name)


def test_atomic_backward_is_not_used_under_deterministic_algorithms():
    assert fat.backward_strategy(64, "atomic") == "atomic"
    torch.use_deterministic_algorithms(True)
    try:
        assert fat.backward_strategy(64, "atomic") == "two_pass"
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.interpret
def test_triton_three_dim_inputs():
    q, k, v, grad, g = make_inputs(b=1, hq=3, hkv=3, sq=40, sk=40)
    q, k, v, grad = (t[0] for t in (q, k, v, grad))
    keep = random_keep(q, k, 0.3, (16, 16), g)
    got = run_op([q, k, v, None], keep, 0.3, True, None, False, (16, 16), "post_softmax", "triton", grad)
    ref = run_op([q.float(), k.float(), v.float(), None], keep, 0.3, True, None, False, (16, 16), "post_softmax",
                 "reference", grad)
    for a, b in zip(got[:4], ref[:4]):
        assert_close_scaled(a, b, torch.float16)


@pytest.mark.interpret
@pytest.mark.parametrize("kernel,strategy", [("reference", "two_pass"), ("triton", "two_pass"), ("triton", "atomic")])
def test_head_split_views_keep_their_layout(kernel, strategy, monkeypatch):
    """q, k, v as HF makes them (a projection's (B, S, H*D) output viewed as (B, H, S, D)): the
    output comes back in SDPA's (B, S, H, D) memory layout and the gradients in their inputs'
    layout, so merging the heads again is a view; the numbers are the reference's."""
    monkeypatch.setitem(fat.BACKWARD_STRATEGY, 64, strategy)
    b, h, s, d = 2, 3, 45, 64
    g = torch.Generator().manual_seed(3)

    def heads(t):  # (B, S, H*D) -> (B, H, S, D), a strided view
        return t.view(b, s, h, d).transpose(1, 2)

    proj = [torch.randn(b, s, h * d, generator=g).half() for _ in range(3)]
    grad = torch.randn(b, h, s, d, generator=g).half()
    keep = random_keep(heads(proj[0]), heads(proj[1]), 0.3, (16, 16), g)
    leaves = [t.clone().requires_grad_() for t in proj]
    out = torch.ops.sparsedrop.attention(*(heads(t) for t in leaves), None, keep, 0.3, False, None, False, 16, 16,
                                         "post_softmax", kernel)
    assert out.stride() == (s * h * d, d, h * d, 1)
    merged = out.transpose(1, 2).reshape(b, s, h * d)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None  # a view, no copy
    # The gradient at each head-split input keeps that input's strides (checked before the
    # merge's backward, which would hide a copy).
    views = [heads(t.detach()).requires_grad_() for t in proj]
    out2 = torch.ops.sparsedrop.attention(*views, None, keep, 0.3, False, None, False, 16, 16, "post_softmax", kernel)
    out2.backward(grad)
    for view in views:
        assert view.grad.stride() == view.stride()
    ref = run_op([heads(t.float()) for t in proj] + [None], keep, 0.3, False, None, False, (16, 16), "post_softmax",
                 "reference", grad)
    assert_close_scaled(out2, ref[0], torch.float16, "out")
    for name, view, r in zip(("dq", "dk", "dv"), views, ref[1:4]):
        assert_close_scaled(view.grad, r, torch.float16, name)
    torch.library.opcheck(torch.ops.sparsedrop.attention_forward.default,
                          (*(heads(t) for t in leaves), None, keep, 0.3, False, None, False, 16, 16, "post_softmax",
                           kernel))


def test_grad_buffers_follow_only_dense_unit_stride_layouts():
    base = torch.randn(2, 5, 3 * 8)
    dense_view = base.view(2, 5, 3, 8).transpose(1, 2)  # head split: dense, permuted
    assert fa.empty_grad_like(dense_view).stride() == dense_view.stride()
    gapped = base.view(2, 5, 3, 8)[..., :4].transpose(1, 2)  # GPT-2's split of a fused qkv: gaps
    expanded = torch.randn(2, 1, 5, 8).expand(2, 3, 5, 8)  # overlapping (stride 0)
    not_unit = base.view(2, 5, 3, 8).transpose(-1, -2)  # dense, but the last dim is not unit stride
    for t in (gapped, expanded, not_unit):
        got = fa.empty_grad_like(t)
        assert got.shape == t.shape and got.is_contiguous()
    out = fa.empty_attention_out(dense_view, dense_view)
    assert out.shape == dense_view.shape and out.transpose(1, 2).is_contiguous()


def test_triton_config_that_does_not_fit_the_mask_tile_is_refused():
    q, k, v, _, g = make_inputs(sq=40, sk=40)
    keep = random_keep(q, k, 0.3, (32, 32), g)
    with pytest.raises(ValueError, match="must divide the mask tile"):
        fat.attention_forward(q, k, v, None, keep, 0.3, False, None, False, (32, 32), "post_softmax",
                              {"fwd": (64, 32, 4, 2)})


# --------------------------------------------------------------------------- dispatch and fallback
def test_unsupported_reason_names_the_problem():
    q = torch.zeros(1, 2, 40, 64, dtype=torch.float16)
    assert fat.unsupported_reason((q, q, q), (64, 64)) is None
    for d in (8, 32, 80, 96, 128):
        assert fat.unsupported_reason((q.new_zeros(1, 2, 40, d),) * 3, (64, 64)) is None, d
    for d in (12, 260):
        reason = fat.unsupported_reason((q.new_zeros(1, 2, 40, d),) * 3, (64, 64))
        assert f"head dims q {d}" in reason and "multiples of 8 up to 256" in reason
    assert "head dim" in fat.unsupported_reason((q, q, q[..., :32]), (64, 64))  # q, k, v must agree
    assert "float32" in fat.unsupported_reason((q.float(),) * 3, (64, 64))
    assert "multiples of 16" in fat.unsupported_reason((q, q, q), (24, 64))
    assert "does not broadcast" in fat.unsupported_reason((q, q, q, torch.zeros(3, 40, 40, dtype=torch.bool)), (64, 64))
    kv = torch.zeros(1, 2, 40, 64, dtype=torch.float16)
    assert "not a multiple" in fat.unsupported_reason((torch.zeros(1, 3, 40, 64, dtype=torch.float16), kv, kv), (64, 64))


@pytest.mark.parametrize("shape", [(), (5,), (1, 5), (3, 1, 1, 5), (3, 2, 4, 5), (1, 2, 1, 1), (2, 5), (4, 1, 5),
                                   (3, 2, 4, 1, 5), (0, 2, 4, 5), (3, 2, 4, 6)])
def test_mask_broadcast_check_agrees_with_torch(shape):
    """The host check that replaced torch.broadcast_shapes gives its answer for every mask shape."""
    target = (3, 2, 4, 5)
    try:
        expected = torch.broadcast_shapes(shape, target) == torch.Size(target)
    except RuntimeError:
        expected = False
    assert fat._broadcasts_to(shape, target) == expected


@pytest.mark.interpret
def test_unsupported_calls_fall_back_or_raise():
    q, k, v, grad, g = make_inputs(sq=30, sk=30, d=12)  # not a multiple of 8
    keep = random_keep(q, k, 0.3, (16, 16), g)
    with pytest.raises(ValueError, match="cannot run this call.*head dims"):
        torch.ops.sparsedrop.attention(q, k, v, None, keep, 0.3, False, None, False, 16, 16, "post_softmax", "triton")
    # "auto" on CPU always takes the reference; the result is still right.
    got = run_op([q, k, v, None], keep, 0.3, False, None, False, (16, 16), "post_softmax", "auto", grad)
    assert_close_scaled(got[0], fa.reference_attention(q.float(), k.float(), v.float(), None, keep, 0.3, block=(16, 16)),
                        torch.float16)


def test_bad_arguments_are_rejected_with_what_to_do():
    q, k, v, _, g = make_inputs(sq=30, sk=30)
    keep = random_keep(q, k, 0.3, (16, 16), g)
    with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape \(1, 2, 2, 2\)"):
        torch.ops.sparsedrop.attention(q, k, v, None, keep[..., :1], 0.3, False, None, False, 16, 16, "post_softmax", "reference")
    with pytest.raises(ValueError, match="mode='dropout'"):
        torch.ops.sparsedrop.attention(q, k, v, None, keep, 0.3, False, None, False, 16, 16, "dropout", "reference")
    with pytest.raises(ValueError, match="enable_gqa=True"):
        torch.ops.sparsedrop.attention(q, k[:, :1], v[:, :1], None, keep, 0.3, False, None, False, 16, 16, "post_softmax", "reference")


# --------------------------------------------------------------------------- ops: opcheck, autocast, functional
@pytest.mark.interpret
@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_opcheck_attention_ops(kernel):
    q, k, v, grad, g = make_inputs(b=1, hq=2, sq=20, sk=36, dtype=torch.float16)
    mask = torch.randn(1, 2, 20, 36, generator=g).half()
    keep = random_keep(q, k, 0.3, (16, 16), g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    args = (*leaves, keep, 0.3, True, 0.2, False, 16, 16, "post_softmax", kernel)
    torch.library.opcheck(torch.ops.sparsedrop.attention_forward.default, args)
    torch.library.opcheck(torch.ops.sparsedrop.attention.default, (q, k, v, None, keep, 0.3, False, None, False, 16, 16,
                                                                    "dropkey", kernel))
    out, lse = torch.ops.sparsedrop.attention_forward(q, k, v, mask, keep, 0.3, True, 0.2, False, 16, 16,
                                                      "post_softmax", kernel)
    torch.library.opcheck(torch.ops.sparsedrop.attention_backward.default,
                          (grad, q, k, v, out, lse, mask, keep, 0.3, True, 0.2, False, 16, 16, "post_softmax", kernel, True))


def test_autocast_casts_q_k_v_and_float_mask():
    q, k, v, _, g = make_inputs(sq=20, sk=20, dtype=torch.float32)
    mask = torch.randn(20, 20, generator=g)
    keep = random_keep(q, k, 0.3, (16, 16), g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.sparsedrop.attention(q, k, v, mask, keep, 0.3, False, None, False, 16, 16, "post_softmax", "reference")
    assert out.dtype == torch.bfloat16
    expected = fa.reference_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask.bfloat16(), keep, 0.3, block=(16, 16))
    torch.testing.assert_close(out, expected)


def test_sparse_dropout_attention_is_sdpa_outside_training_and_replays_its_keep():
    q, k, v, _, _ = make_inputs(sq=30, sk=30, dtype=torch.float32)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(sparse_dropout_attention(q, k, v, p=0.3, is_causal=True, training=False), sdpa)
    torch.testing.assert_close(sparse_dropout_attention(q, k, v, p=0.0, is_causal=True), sdpa)
    torch.manual_seed(5)
    out = sparse_dropout_attention(q, k, v, p=0.3, is_causal=True, block=(16, 16))
    torch.manual_seed(5)
    keep = fa.sample_attention_keep(q, k, 0.3, 16, 16)
    torch.testing.assert_close(out, fa.reference_attention(q, k, v, None, keep, 0.3, True, block=(16, 16)))


def test_default_mask_tile_is_the_kernels():
    from sparsedrop_compile.attention_ops import DEFAULT_ATTENTION_BLOCK

    assert DEFAULT_ATTENTION_BLOCK == fat.DEFAULT_BLOCK
    assert sd.SparseDropConfig().attention_block == DEFAULT_ATTENTION_BLOCK


def test_sparse_dropout_attention_compiles_in_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v, grad, _ = make_inputs(sq=24, sk=24, dtype=torch.float32)
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def f(q, k, v):
        return sparse_dropout_attention(q, k, v, p=0.2, block=(16, 16), kernel="reference")

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    f(*leaves).backward(grad)
    assert counter.frame_count == 1
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


# --------------------------------------------------------------------------- the pass: which head dims
def _sdpa_site(d):
    """The one attention site of an SDPA with dropout at head dim d, as explain reports it."""
    q = torch.randn(2, 2, 40, d)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)  # noqa: E731
    (site,) = sd.explain(fn, q, q, q, options={"attention_block": (16, 16)}).sites
    return site


@pytest.mark.parametrize("d", [8, 32, 80, 96, 256])
def test_pass_rewrites_every_head_dim_the_kernels_take(d):
    """On CPU as on the GPU: the decision does not depend on the device (only the op's kernel
    choice at run time does)."""
    site = _sdpa_site(d)
    assert site.kind == "attention" and site.rewritten and site.reason is None, site.row()


@pytest.mark.parametrize("d", [12, 260])
def test_pass_refuses_other_head_dims_and_says_why(d):
    site = _sdpa_site(d)
    assert not site.rewritten
    assert f"head dims q={d}, k={d}, v={d}" in site.reason and "multiples of 8 up to 256" in site.reason
    assert site.reason.endswith("left on SDPA")


# --------------------------------------------------------------------------- GPU, full size
# (b, hq, hkv, s, d, causal, mask, dtype, mode, backward strategy)
GPU_CASES = [
    (8, 16, 16, 1024, 64, False, None, torch.bfloat16, "post_softmax", "atomic"),
    (8, 16, 16, 1024, 64, False, None, torch.float16, "post_softmax", "two_pass"),
    (4, 12, 12, 512, 64, False, "bool_b11", torch.bfloat16, "post_softmax", "atomic"),
    (4, 12, 12, 512, 64, False, "float_bh", torch.bfloat16, "post_softmax", "two_pass"),
    (4, 12, 12, 512, 64, False, "float_bh", torch.float16, "post_softmax", "atomic"),
    (4, 12, 12, 512, 64, False, "float_full", torch.bfloat16, "post_softmax", "two_pass"),
    (2, 12, 12, 300, 64, True, "float_full", torch.float16, "dropkey", "two_pass"),
    (4, 16, 16, 2048, 128, True, None, torch.bfloat16, "post_softmax", "atomic"),
    (4, 16, 16, 2048, 128, True, None, torch.bfloat16, "dropkey", "two_pass"),
    (2, 16, 4, 1000, 128, True, None, torch.float16, "post_softmax", "two_pass"),
    (2, 16, 4, 1000, 128, True, None, torch.bfloat16, "dropkey", "atomic"),
    (2, 8, 8, 777, 64, False, "float_2d", torch.bfloat16, "dropkey", "atomic"),
    (2, 8, 8, 777, 64, False, "float_2d", torch.float16, "post_softmax", "two_pass"),
    # HF-style materialised masks, classified per tile (hidden tiles trimmed, plain tiles unread).
    (4, 12, 12, 512, 64, False, "bool_pad_full", torch.bfloat16, "post_softmax", "two_pass"),
    (4, 12, 12, 512, 64, False, "bool_pad_full", torch.float16, "post_softmax", "atomic"),
    (4, 12, 12, 1024, 64, False, "bool_causal_pad", torch.bfloat16, "post_softmax", "two_pass"),
    (2, 12, 12, 1024, 64, False, "bool_causal_pad", torch.bfloat16, "dropkey", "atomic"),
    (2, 8, 8, 777, 64, False, "float_neginf", torch.float16, "post_softmax", "two_pass"),
    (2, 8, 8, 300, 128, True, "float_neginf", torch.bfloat16, "post_softmax", "atomic"),
    (4, 12, 12, 512, 128, False, "bool_pad_full", torch.bfloat16, "post_softmax", "two_pass"),
    # Head dims that are not 64 / 128 (padded ones masked), at the default mask tile: the 256
    # class's configs and every padded extent (8 -> 16, 80 and 96 -> 128, 136 and 192 -> 256).
    (4, 16, 16, 1024, 8, True, None, torch.bfloat16, "post_softmax", "two_pass"),
    (4, 16, 16, 1024, 32, False, None, torch.bfloat16, "post_softmax", "two_pass"),
    (4, 12, 12, 512, 32, False, "bool_b11", torch.float16, "post_softmax", "atomic"),
    (4, 16, 16, 1024, 80, True, None, torch.bfloat16, "post_softmax", "two_pass"),
    (4, 16, 16, 1024, 80, False, "bool_pad_full", torch.float16, "post_softmax", "atomic"),
    (2, 8, 8, 777, 80, False, "float_2d", torch.bfloat16, "dropkey", "two_pass"),
    (2, 16, 4, 1000, 96, True, None, torch.bfloat16, "post_softmax", "two_pass"),
    (4, 12, 12, 512, 96, False, "float_bh", torch.float16, "post_softmax", "two_pass"),
    (2, 8, 8, 777, 136, True, None, torch.float16, "post_softmax", "two_pass"),
    (2, 8, 8, 777, 192, True, None, torch.bfloat16, "dropkey", "atomic"),
    (2, 16, 16, 2048, 256, True, None, torch.bfloat16, "post_softmax", "two_pass"),
    (2, 16, 16, 2048, 256, False, None, torch.float16, "post_softmax", "atomic"),
    (2, 16, 4, 1000, 256, True, None, torch.float16, "dropkey", "two_pass"),
    (4, 12, 12, 512, 256, False, "bool_pad_full", torch.bfloat16, "post_softmax", "two_pass"),
    (2, 8, 8, 777, 256, True, "float_neginf", torch.bfloat16, "post_softmax", "two_pass"),
]


def _gpu_case_id(c) -> str:
    return f"{c[0]}x{c[1]}/{c[2]}x{c[3]}x{c[4]}{'-causal' if c[5] else ''}-{c[6]}-{str(c[7])[6:]}-{c[8]}-{c[9]}"


def _record_tma_loads(monkeypatch) -> list[tuple[bool, bool]]:
    """From now on each launch of the forward or the dQ pass appends (traced?, took descriptors?)."""
    taken, real = [], fat._streamed

    def spy(pb, block_n):
        kv, tma = real(pb, block_n)
        taken.append((runtime.is_traced(pb.q), tma))
        return kv, tma

    monkeypatch.setattr(fat, "_streamed", spy)
    return taken


def _low_precision_attention(q, k, v, mask, keep, p, causal, gqa, block, mode):
    """The same math run in the inputs' dtype by eager PyTorch: the error budget of the dtype."""
    if gqa:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    tiles = fa.expand_attention_keep(keep, s.shape[-2], s.shape[-1], *block)
    if mode == "dropkey":
        s = s.masked_fill(~tiles, float("-inf"))
    dead = (s == float("-inf")).all(-1, keepdim=True)  # rows with no visible key give 0, not NaN
    prob = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    if mode != "dropkey":
        prob = prob * tiles / (1 - p)
    return prob.to(v.dtype) @ v


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_gpu_case_id)
def test_gpu_matches_reference(case, monkeypatch, heads_second=False):
    """Full size on the GPU, in the style of FlashAttention's tests: the kernel's error against
    the fp32 reference is bounded by the error of the same math done by eager PyTorch in the
    input dtype, times 4. The factor is measured, not hoped for: on CPU-interpreted runs
    (200-300 tokens) the bf16 ratio reached 2.95 (dV, causal) and fp16 stayed under 1.3. A
    flash backward rounds P and dS to the input dtype before its products and takes
    Δ = rowsum(dO ⊙ O) from the stored bf16 O, as FlashAttention does; in rows whose attention
    sits on a few keys (the first causal rows) that rounding is not averaged away.
    ``heads_second``: q, k, v, dO as (B, S, H, D) tensors viewed as (B, H, S, D), as HF's
    attention layers hand them over."""
    b, hq, hkv, s, d, causal, mask_kind, dtype, mode, strategy = case
    monkeypatch.setitem(fat.BACKWARD_STRATEGY, fat.head_dim_class(d), strategy)
    g = torch.Generator().manual_seed(0)
    if heads_second:
        q, k, v, grad = (torch.randn(b, s, h, d, generator=g).to(dtype).cuda().transpose(1, 2)
                         for h in (hq, hkv, hkv, hq))
    else:
        q, k, v, grad = (torch.randn(b, h, s, d, generator=g).to(dtype).cuda() for h in (hq, hkv, hkv, hq))
    mask = _mask(mask_kind, b, hq, s, s, dtype, g)
    mask = mask.cuda() if mask is not None else None
    block = fat.DEFAULT_BLOCK
    keep = (torch.rand(fa.attention_keep_shape(q.shape, k.shape, block), generator=g) >= 0.1).cuda()
    got = run_op([q, k, v, mask], keep, 0.1, causal, None, hq != hkv, block, mode, "triton", grad)
    ref = run_op([upcast(q), upcast(k), upcast(v), upcast(mask)], keep, 0.1, causal, None, hq != hkv, block, mode,
                 "reference", grad)
    leaves = [t.clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in (q, k, v, mask)]
    low = _low_precision_attention(*leaves, keep, 0.1, causal, hq != hkv, block, mode)
    low.backward(grad)
    lows = [low] + [t.grad if t is not None and t.is_floating_point() else None for t in leaves]
    for name, a, r, lo in zip(("out", "dq", "dk", "dv", "dmask"), got, ref, lows):
        if r is None:
            continue
        err = (a.float() - r).abs().max().item()
        budget = (lo.float() - r).abs().max().item()
        assert err <= 4 * budget + 1e-5 * r.abs().max().item(), f"{name}: error {err:.3g}, eager {dtype} error {budget:.3g}"


# The single-pass backward adds dQ by TMA bulk reductions where TMA runs (Hopper) and by element
# atomics elsewhere (SPARSEDROP_TMA=0 forces the latter): both ways on the same cases, ragged row
# counts (the TMA box clips rows past Sq), padded head dims (it clips columns past D), GQA and dMask.
DQ_ADD_CASES = [
    (2, 16, 4, 1000, 80, True, None, torch.bfloat16, "post_softmax", "atomic"),
    (2, 8, 8, 777, 64, False, "float_2d", torch.float16, "post_softmax", "atomic"),
    (2, 8, 8, 300, 256, True, None, torch.bfloat16, "post_softmax", "atomic"),
    (2, 12, 12, 333, 96, False, "bool_pad_full", torch.bfloat16, "dropkey", "atomic"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("tma", ["1", "0"])
@pytest.mark.parametrize("case", DQ_ADD_CASES, ids=[
    f"{c[0]}x{c[1]}/{c[2]}x{c[3]}x{c[4]}{'-causal' if c[5] else ''}-{c[6]}-{c[8]}" for c in DQ_ADD_CASES])
def test_gpu_single_pass_adds_dq_by_tma_and_by_atomics(case, tma, monkeypatch):
    monkeypatch.setenv("SPARSEDROP_TMA", tma)
    hopper_or_newer = torch.cuda.get_device_capability()[0] >= 9
    assert runtime.tma_enabled(torch.device("cuda")) == (tma == "1" and hopper_or_newer)
    test_gpu_matches_reference(case, monkeypatch)


# K and V streamed through TMA descriptors in the forward and the dQ pass (flash_attention_kernels.py,
# "TMA loads"), forced on at every size (SPARSEDROP_TMA=always; by default problems that are
# launch-bound keep pointer loads): keys past Sk and padded head dims come in as the copies' zero
# fill; GQA, masks of each kind, dMask, dropkey, both backward strategies, and q, k, v, dO as
# head-second views (a row stride of H x D).
TMA_LOAD_CASES = [
    (2, 16, 4, 1000, 128, True, None, torch.float16, "post_softmax", "two_pass"),
    (2, 16, 4, 1000, 80, True, None, torch.bfloat16, "post_softmax", "atomic"),
    (2, 8, 8, 777, 64, False, "float_2d", torch.float16, "post_softmax", "two_pass"),
    (2, 8, 8, 777, 64, False, "float_2d", torch.bfloat16, "dropkey", "atomic"),
    (4, 12, 12, 512, 64, False, "bool_pad_full", torch.bfloat16, "post_softmax", "two_pass"),
    (2, 12, 12, 1024, 64, False, "bool_causal_pad", torch.bfloat16, "dropkey", "atomic"),
    (4, 12, 12, 512, 32, False, "bool_b11", torch.float16, "post_softmax", "atomic"),
    (4, 16, 16, 1024, 8, True, None, torch.bfloat16, "post_softmax", "two_pass"),
    (2, 8, 8, 777, 80, False, "float_2d", torch.bfloat16, "dropkey", "two_pass"),
    (2, 16, 4, 1000, 96, True, None, torch.bfloat16, "post_softmax", "two_pass"),
    (2, 8, 8, 777, 192, True, None, torch.bfloat16, "dropkey", "atomic"),
    (2, 8, 8, 777, 256, True, "float_neginf", torch.bfloat16, "post_softmax", "two_pass"),
    # materialised bool masks in the 128 class: PROBLEM_FIRST's "bool_mask_rows" forward and dK/dV tiles
    (2, 12, 12, 777, 128, False, "bool_causal_pad", torch.bfloat16, "post_softmax", "two_pass"),
    (2, 12, 12, 512, 96, False, "bool_pad_full", torch.float16, "post_softmax", "two_pass"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("heads_second", [False, True], ids=["bhsd", "bshd"])
@pytest.mark.parametrize("case", TMA_LOAD_CASES, ids=_gpu_case_id)
def test_gpu_tma_loads_match_reference(case, heads_second, monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper or newer GPU")
    monkeypatch.setenv("SPARSEDROP_TMA", "always")
    taken = _record_tma_loads(monkeypatch)
    test_gpu_matches_reference(case, monkeypatch, heads_second)
    # the forward, and with two passes the dQ pass: each took descriptors
    assert taken == [(False, True)] * (2 if case[-1] == "two_pass" else 1), taken


@pytest.mark.gpu
def test_gpu_tma_loads_refuse_what_a_descriptor_cannot_read(monkeypatch):
    """A descriptor needs a 16-byte aligned base and row stride: a view that starts 8 bytes into
    its storage keeps the pointer loads, as does a launch-bound problem unless forced."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper or newer GPU")
    monkeypatch.setenv("SPARSEDROP_TMA", "always")
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    keep = torch.ones(fa.attention_keep_shape(q.shape, k.shape, (64, 128)), dtype=torch.bool, device="cuda")

    def takes_tma(q):
        pb = fat._Problem(q, k, v, None, keep, 0.1, False, None, False, (64, 128), "post_softmax")
        return fat._tma_loads(pb, (pb.q, pb.k))

    assert takes_tma(q)
    shifted = torch.randn(2 * 4 * 300 * 64 + 4, device="cuda", dtype=torch.bfloat16)[4:].view(2, 4, 300, 64)
    assert shifted.data_ptr() % 16 == 8 and not takes_tma(shifted)
    monkeypatch.setenv("SPARSEDROP_TMA", "1")
    assert not takes_tma(q)  # 2 x 4 x 300 x 300 x 64 multiply-adds: launch-bound
    monkeypatch.setenv("SPARSEDROP_TMA", "0")
    assert not takes_tma(q)


def test_traced_descriptors_record_what_from_tensor_rebuilds():
    """A traced launch's descriptor becomes its tensor plus torch's stable TMA metadata, and
    compiled code rebuilds it with ``TensorDescriptor.from_tensor(tensor, block_shape)``: so the
    tensor must carry the descriptor's shape and strides. ``descriptor_of`` views it so where a
    size-1 dim's stride is packed; a descriptor whose strides its tensor does not carry is refused."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from sparsedrop_compile.kernels import traced_descriptors as td

    t = torch.randn(4, 300, 1, 64, dtype=torch.bfloat16).transpose(1, 2)  # (B, H=1, S, D), head stride 64
    packed = (300 * 64, 300 * 64, 64, 1)
    desc = fat._rows_descriptor(t, 64, 128)
    assert tuple(desc.strides) == packed and tuple(desc.base.stride()) == packed
    assert desc.base.data_ptr() == t.data_ptr() and desc.block_shape == [1, 1, 64, 128]
    args, meta = td.descriptor_arguments({"K": desc, "V": t, "n": 3})
    assert args["K"] is desc.base and args["V"] is t and args["n"] == 3
    assert meta == {"K": ("stable", ([1, 1, 64, 128],))}
    rebuilt = TensorDescriptor.from_tensor(args["K"], meta["K"][1][0])
    assert (list(rebuilt.shape), list(rebuilt.strides)) == (list(desc.shape), list(desc.strides))
    assert td.holds_descriptor((t, desc), {}) and not td.holds_descriptor((t,), {"n": 3})

    # K's own strides: nothing to view
    u = torch.randn(2, 4, 300, 64, dtype=torch.bfloat16)
    assert fat._rows_descriptor(u, 64, 64).base is u
    # a descriptor whose strides are not its tensor's would be rebuilt wrong: refused, by name
    odd = TensorDescriptor(t, list(t.shape), list(packed), [1, 1, 64, 128])
    with pytest.raises(ValueError, match="'K'.*descriptor_of"):
        td.descriptor_arguments({"K": odd})


def test_only_traced_launches_with_descriptors_take_the_descriptor_tracer(monkeypatch):
    """``runtime.launch`` under wrap_triton (a GPU's path, never CI's interpreter): a traced launch
    that hands the kernel a descriptor is recorded by ``traced_descriptors``; one without, or one
    that is not traced, goes to the kernel as before."""
    from sparsedrop_compile.kernels import traced_descriptors as td

    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("kernel", grid))

    monkeypatch.setattr(td, "traced_launch", lambda wrapped, args, kwargs: calls.append(("descriptors", args[1])))
    t = torch.randn(2, 4, 64, 64, dtype=torch.bfloat16)
    desc = fat._rows_descriptor(t, 64, 64)
    launch = runtime._Wrapped(Kernel())
    monkeypatch.setattr(runtime, "tracing", lambda: True)
    launch[(1,)](t, desc, n=3)
    launch[(2,)](t, t, n=3)
    monkeypatch.setattr(runtime, "tracing", lambda: False)
    launch[(3,)](t, desc)
    assert calls == [("descriptors", desc), ("kernel", (2,)), ("kernel", (3,))]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "one_head"])
@pytest.mark.parametrize("static_launch", [False, True], ids=["python_launcher", "static_launcher"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_gpu_compiled_tma_loads_equal_eager_tma_loads(layout, static_launch, dynamic, monkeypatch):
    """Compiled code takes the same TMA loads as eager calls where Inductor launches our kernels
    through Triton's launcher: its traced launches record K and V as tensors plus descriptor
    metadata (``traced_descriptors``), and Inductor's code rebuilds the descriptors before each
    launch. Where its static launcher takes them (the backend's default), which cannot take a
    descriptor, compiled code keeps pointer loads. Either way compiled must equal eager with the
    same loads (TMA, or SPARSEDROP_TMA=0: the two pick their own tiles, ``fat.TMA_FIRST`` and
    ``fat.PROBLEM_FIRST``, so their sums differ by rounding, which the backward's dP - Δ magnifies):
    head-second views, one batch of one head (size-1 dims, whose strides the descriptor packs),
    static and symbolic sizes. Kernels compile in this process (compile_threads=1), with the
    launcher switch as given, and the caches are fresh (they key on the graph, not on it)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper or newer GPU")
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import fresh_inductor_cache, run_and_get_code

    from sparsedrop_compile.kernels import traced_descriptors

    torch._dynamo.reset()
    monkeypatch.setenv("SPARSEDROP_TMA", "always")
    monkeypatch.setenv(traced_descriptors.STATIC_LAUNCH_ENV, "1" if static_launch else "0")
    monkeypatch.setattr(inductor_config, "compile_threads", 1)
    monkeypatch.setattr(inductor_config, "static_launch_user_defined_triton_kernels", static_launch)
    monkeypatch.setattr(inductor_config, "use_static_cuda_launcher", True)
    assert traced_descriptors.usable() == (not static_launch)
    monkeypatch.setitem(fat.BACKWARD_STRATEGY, 64, "two_pass")
    g = torch.Generator().manual_seed(0)
    b, h = (1, 1) if layout == "one_head" else (2, 4)
    shape = (b, 300, h, 64) if layout == "bshd" else (b, h, 300, 64)
    q, k, v, grad = (torch.randn(*shape, generator=g).to(torch.bfloat16).cuda() for _ in range(4))
    if layout == "bshd":
        q, k, v, grad = (t.transpose(1, 2) for t in (q, k, v, grad))
    keep = (torch.rand(fa.attention_keep_shape(q.shape, k.shape, (64, 128)), generator=g) >= 0.2).cuda()
    taken = _record_tma_loads(monkeypatch)

    def attention(q, k, v):
        return torch.ops.sparsedrop.attention(q, k, v, None, keep, 0.2, True, None, False, 64, 128, "post_softmax",
                                              "triton")

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad)
        return [out] + [t.grad for t in leaves]

    with fresh_inductor_cache():
        got, code = run_and_get_code(run, torch.compile(attention, backend="inductor", fullgraph=True, dynamic=dynamic))
    # traced forward and dQ pass (each traced more than once), each with descriptors or not
    assert taken and taken == [(True, not static_launch)] * len(taken), taken
    # the compiled code builds the descriptors: K and V, for the forward and the dQ pass
    built = sum(c.count("TensorDescriptor.from_tensor(") for c in code)
    assert (built == 0) if static_launch else (built >= 4), code
    taken.clear()
    monkeypatch.setenv("SPARSEDROP_TMA", "0" if static_launch else "always")
    expected = run(attention)
    assert taken == [(False, not static_launch)] * 2, taken  # eager: the forward and the dQ pass
    for name, a, b_ in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b_, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
def test_gpu_single_pass_backward_under_inductor(monkeypatch):
    """The single-pass backward. Eager on Hopper its dQ adds are TMA bulk reductions; compiled
    by Inductor (which launches the kernels from its own code) they are element atomics, because
    torch's analysis of what a user kernel writes misses TMA reductions (it then took the dQ
    buffer as unwritten: dQ came out zero). Compiled must equal eager. The Gluon forward serves
    only eager calls, so it is off here: both runs take the same forward."""
    monkeypatch.setenv("SPARSEDROP_HOPPER", "0")
    monkeypatch.setitem(fat.BACKWARD_STRATEGY, 128, "atomic")
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 4, 300, 128, generator=g).to(torch.bfloat16).cuda() for _ in range(4))
    keep = (torch.rand(fa.attention_keep_shape(q.shape, k.shape, (64, 128)), generator=g) >= 0.2).cuda()

    def attention(q, k, v):
        return torch.ops.sparsedrop.attention(q, k, v, None, keep, 0.2, True, None, False, 64, 128, "post_softmax",
                                              "triton")

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad)
        return [out] + [t.grad for t in leaves]

    got = run(torch.compile(attention, backend="inductor", fullgraph=True))
    expected = run(attention)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        # The same kernels but for how dQ is added (element atomics compiled, TMA eager on
        # Hopper): only the order of the fp32 adds may differ, before the bf16 cast.
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph_capture():
    q, k, v = (torch.randn(2, 8, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 8, 300, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        out = sparse_dropout_attention(q, k, v, p=0.1, is_causal=True)
        return torch.autograd.grad(out, (q, k, v), grad)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile the kernels before capturing
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = step()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in grads)

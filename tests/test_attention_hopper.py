"""The Gluon (wgmma) attention forward on a Hopper GPU against the plain-PyTorch reference.

Gluon kernels cannot run under Triton's interpreter, so the kernel tests need an sm_90 GPU; the
CPU tests check when the forward takes that path and which config it picks. Each GPU case asserts
first that the Hopper forward serves it (so a silent fallback to the portable kernel cannot pass
for it), then compares O and the logsumexp with the fp32 reference on the same bf16/fp16 inputs
and the same keep flags, and the full op's gradients (the portable backward reads the Hopper
forward's O and logsumexp) with the reference's.
"""
from __future__ import annotations

import pytest
import torch

import sparsedrop_compile  # noqa: F401  (registers the ops)
from sparsedrop_compile.kernels import flash_attention as fa
from sparsedrop_compile.kernels import flash_attention_hopper as hopper
from sparsedrop_compile.kernels import flash_attention_triton as fat

on_hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
         and hopper._attn_fwd_wgmma_kernel is not None),
    reason="the Gluon attention forward needs a Hopper GPU (sm_90) and Triton's Gluon",
)
gpu = pytest.mark.gpu

# Largest error allowed, as a fraction of the largest reference value: about 4 ulp of the dtype
# (tests/test_attention.py's bound for the portable kernels).
REL_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _hopper_forward_on(monkeypatch):
    """The Gluon forward serves only where asked for since session 17 (fat.HOPPER_FORWARD): these
    tests ask for it, so calls without a config (the op's) take it where it serves."""
    monkeypatch.setattr(fat, "HOPPER_FORWARD", True)


# --------------------------------------------------------------------------- CPU: configs, conditions
def test_config_fits_mask_tiles():
    cfg = hopper.FwdConfig(64, 64, 3, 4)
    assert hopper.fits(cfg, (64, 128))  # inside one mask tile: one flag a tile
    assert hopper.fits(cfg, (32, 64))  # two mask tile rows: a flag per row
    assert not hopper.fits(cfg, (64, 32))  # a key tile across two mask tile columns
    assert not hopper.fits(cfg, (48, 64))  # neither inside one mask tile row nor spanning whole ones
    assert hopper.pick_config(128, (64, 128)) == cfg
    assert hopper.pick_config(128, (128, 32)) == hopper.FwdConfig(64, 32, 3, 4)
    assert hopper.pick_config(128, (16, 16)) == hopper.FwdConfig(64, 16, 3, 4)  # 64 rows span four mask rows
    assert hopper.pick_config(128, (48, 16)) is None  # 48 rows: no query tile inside or spanning them
    assert hopper.pick_config(64, (64, 128)) is None  # head dim 64 stays on the portable forward
    assert hopper.pick_config(96, (64, 128)) is None  # not a power of two: Gluon's tiles cannot take it


def test_config_override_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="must divide the mask tile's 32 keys"):
        hopper.pick_config(128, (64, 32), (64, 64, 3, 4))
    assert hopper.pick_config(128, (64, 128), (128, 128, 2, 8)) == hopper.FwdConfig(128, 128, 2, 8)
    with pytest.raises(ValueError, match="warps must be block_m / 16 = 8"):
        hopper.pick_config(128, (64, 128), (128, 64, 3, 4))


def test_unsupported_reason_on_cpu_names_the_device():
    q = torch.zeros(1, 2, 64, 128, dtype=torch.bfloat16)
    reason = hopper.unsupported_reason(q, q, q, None, False, (64, 128))
    assert reason is not None and "Hopper" in reason


@pytest.mark.interpret
def test_portable_forward_when_hopper_forward_is_unavailable():
    """On CPU (the interpreter) attention_forward runs the portable kernel, with or without a
    Hopper config given: the result is the reference's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 128, generator=g).to(torch.float16) for _ in range(3))
    keep = torch.rand(fa.attention_keep_shape(q.shape, k.shape, (16, 16)), generator=g) >= 0.3
    out, lse = fat.attention_forward(q, k, v, None, keep, 0.3, True, None, False, (16, 16), "post_softmax",
                                     {"fwd_hopper": (64, 16, 3, 4)})
    ref_out, ref_lse = fa.reference_attention_forward(q.float(), k.float(), v.float(), None, keep, 0.3, True, None,
                                                      False, (16, 16), "post_softmax")
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)
    assert (out.float() - ref_out).abs().max().item() <= REL_TOL[torch.float16] * ref_out.abs().max().item()


# --------------------------------------------------------------------------- GPU: the kernel
def _inputs(b, hq, hkv, sq, sk, d, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "bshd":  # head-split views of (B, S, H, D) projections, as HF models pass them
        q = torch.randn(b, sq, hq, d, generator=g).to(dtype).cuda().transpose(1, 2)
        k, v = (torch.randn(b, sk, hkv, d, generator=g).to(dtype).cuda().transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(b, hq, sq, d, generator=g).to(dtype).cuda()
        k, v = (torch.randn(b, hkv, sk, d, generator=g).to(dtype).cuda() for _ in range(2))
    return q, k, v, g


def _keep(q, k, p, block, g):
    if p in (0.0, 1.0):  # every tile kept / every tile dropped
        return torch.full(fa.attention_keep_shape(q.shape, k.shape, block), p == 0.0, dtype=torch.bool).cuda()
    return (torch.rand(fa.attention_keep_shape(q.shape, k.shape, block), generator=g) >= p).cuda()


def _check_forward(q, k, v, keep, p, causal, block, config):
    gqa = q.shape[1] != k.shape[1]
    assert hopper.unsupported_reason(q, k, v, None, False, block) is None, "the Hopper forward must serve this case"
    out, lse = fat.attention_forward(q, k, v, None, keep, p, causal, None, gqa, block, "post_softmax",
                                     {"fwd_hopper": config} if config is not None else None)
    ref_out, ref_lse = fa.reference_attention_forward(q.float(), k.float(), v.float(), None, keep, p, causal, None,
                                                      gqa, block, "post_softmax")
    assert out.shape == ref_out.shape and out.dtype == q.dtype and out.stride() == fa.empty_attention_out(q, v).stride()
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    # lse: fp32 sums of exactly rounded products, in another order
    torch.testing.assert_close(lse, ref_lse, atol=2e-4 * max(1.0, ref_lse.abs().max().item()), rtol=0)
    err = (out.float() - ref_out).abs().max().item()
    bound = REL_TOL[q.dtype] * max(ref_out.abs().max().item(), 1e-6)
    assert err <= bound, f"out: max error {err:.3g} > {bound:.3g}"


# (B, Hq, Hkv, Sq, Sk, D, causal, dtype, layout): aligned; ragged in both sequences; Sq > Sk and
# Sq < Sk under the causal mask (top-left aligned); GQA; head-split views.
SHAPES = [
    (2, 4, 4, 1024, 1024, 128, False, torch.bfloat16, "bhsd"),
    (2, 4, 4, 1024, 1024, 128, True, torch.bfloat16, "bhsd"),
    (1, 3, 3, 333, 333, 128, True, torch.float16, "bhsd"),
    (2, 4, 2, 300, 517, 128, False, torch.bfloat16, "bhsd"),
    (1, 2, 2, 700, 129, 128, True, torch.bfloat16, "bhsd"),
    (1, 2, 2, 77, 1000, 128, True, torch.float16, "bhsd"),
    (2, 6, 2, 500, 500, 128, True, torch.bfloat16, "bshd"),
    (2, 4, 4, 640, 640, 128, False, torch.float16, "bshd"),
    (2, 4, 2, 555, 600, 128, True, torch.bfloat16, "bhsd"),
]
SHAPE_IDS = [f"{s[0]}x{s[1]}/{s[2]}x{s[3]}x{s[4]}x{s[5]}{'-causal' if s[6] else ''}-{str(s[7])[6:]}-{s[8]}" for s in SHAPES]


@gpu
@on_hopper
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_forward_default_config(shape, p):
    b, hq, hkv, sq, sk, d, causal, dtype, layout = shape
    q, k, v, g = _inputs(b, hq, hkv, sq, sk, d, dtype, layout)
    block = fat.DEFAULT_BLOCK
    _check_forward(q, k, v, _keep(q, k, p, block, g), p, causal, block, None)


# Every candidate, and 128-row tiles over two warpgroups, at mask tiles they lie inside (one flag
# a tile, dropped products skipped) and span (a flag per row), every tile kept and every tile
# dropped too.
CONFIGS = hopper.CANDIDATES[128] + [hopper.FwdConfig(128, 64, 3, 8)]


@gpu
@on_hopper
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.block_m}x{c.block_n}s{c.stages}w{c.warps}")
@pytest.mark.parametrize("block", [(64, 128), (128, 64), (32, 64), (16, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("d", [128])
def test_forward_every_config(config, block, p, d):
    if not hopper.fits(config, block):
        pytest.skip("config does not fit the mask tile")
    q, k, v, g = _inputs(1, 4, 2, 400, 450, d, torch.bfloat16, "bhsd", seed=d)
    _check_forward(q, k, v, _keep(q, k, p, block, g), p, True, block, config)
    _check_forward(q, k, v, _keep(q, k, p, block, g), p, False, block, config)


@gpu
@on_hopper
@pytest.mark.parametrize("causal", [False, True])
def test_op_gradients_with_the_hopper_forward(causal):
    """The whole op (Hopper forward, portable backward on its O and logsumexp) against the
    reference op: outputs and all three gradients."""
    b, h, s, d = 2, 4, 600, 128
    q, k, v, g = _inputs(b, h, h, s, s, d, torch.bfloat16, "bshd")
    grad = torch.randn(b, h, s, d, generator=g).to(torch.bfloat16).cuda()
    block = fat.DEFAULT_BLOCK
    keep = _keep(q, k, 0.2, block, g)
    assert hopper.unsupported_reason(q, k, v, None, False, block) is None

    def run(kernel, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = torch.ops.sparsedrop.attention(*leaves, None, keep, 0.2, causal, None, False, *block, "post_softmax",
                                             kernel)
        out.backward(grad.to(dtype))
        return [out] + [t.grad for t in leaves]

    got = run("triton", torch.bfloat16)
    ref = run("reference", torch.float32)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        err = (a.float() - r).abs().max().item()
        bound = REL_TOL[torch.bfloat16] * max(r.abs().max().item(), 1e-6)
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


@gpu
@on_hopper
def test_hopper_forward_equals_the_portable_forward(monkeypatch):
    """Same inputs and flags through both forwards: the same O up to bf16 rounding of a
    differently ordered sum, and the same logsumexp."""
    q, k, v, g = _inputs(2, 8, 8, 1000, 1000, 128, torch.bfloat16, "bhsd")
    block = fat.DEFAULT_BLOCK
    keep = _keep(q, k, 0.1, block, g)
    args = (q, k, v, None, keep, 0.1, True, None, False, block, "post_softmax")
    out_h, lse_h = fat.attention_forward(*args)
    monkeypatch.setenv("SPARSEDROP_HOPPER", "0")
    assert hopper.unsupported_reason(q, k, v, None, False, block) is not None
    out_p, lse_p = fat.attention_forward(*args)
    torch.testing.assert_close(lse_h, lse_p, atol=1e-4, rtol=0)
    torch.testing.assert_close(out_h.float(), out_p.float(), atol=2e-2 * out_p.abs().max().item(), rtol=0)

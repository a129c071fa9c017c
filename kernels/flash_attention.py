"""Tile (block) dropout inside attention: the keep tiles and the plain-PyTorch reference.

The attention matrix P (queries x keys, per batch entry and query head) is cut into tiles of
``block = (block_q, block_k)``; each tile is kept whole with probability 1 - p or dropped whole.
``keep`` is a bool tensor of shape (*batch, Hq, cdiv(Sq, block_q), cdiv(Sk, block_k)); the last
row and column of tiles may be ragged. Two semantics (``mode``):

    "post_softmax" (SDPA's dropout, per tile):  O = (softmax(S) ⊙ M / (1 - p)) V
    "dropkey":  dropped tiles are -inf in S before the softmax:  O = softmax(S masked by M) V
                (renormalised, no 1/(1-p); a row with every key dropped gives zeros)

with S = q kᵀ · scale (+ a float mask, or -inf where a bool mask is False, or above the causal
diagonal, aligned top-left like SDPA) and M the keep tiles expanded to elements.

The reference computes in fp32 and returns q.dtype. It is the CPU / fallback path and the test
oracle; ``reference_attention`` is differentiable by autograd, ``reference_attention_backward``
writes the same gradients out by hand (the formulas the Triton kernels implement).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .block_mask import cdiv, dropout_scale, padded

MODES = ("post_softmax", "dropkey")

# The head dims the op rewrites attention for, on every device alike (the pass decides before it
# knows where the graph runs): those of FlashAttention-2. The reference below takes any head dim;
# the Triton kernels pad a dim that is not a power of two to the next one (flash_attention_triton).
HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 8, 256
HEAD_DIM_RULE = f"multiples of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM} (8, 16, ..., 256)"


def supported_head_dim(d) -> bool:
    """Whether tile-dropout attention covers head dim ``d`` (an int; anything else, e.g. an unknown
    symbolic size, is not covered): a multiple of 8 from 8 to 256, the same for q, k and v."""
    return (isinstance(d, int) and not isinstance(d, bool) and d % HEAD_DIM_MULTIPLE == 0
            and HEAD_DIM_MULTIPLE <= d <= MAX_HEAD_DIM)


# --------------------------------------------------------------------------- keep tiles
def attention_keep_shape(q_shape, k_shape, block: tuple[int, int]):
    """Shape of the keep tiles for q (*batch, Hq, Sq, D) against k (*batch, Hkv, Sk, D).

    Works on ints and SymInts (no guards), so it traces under FakeTensor and dynamic shapes.
    """
    if len(q_shape) < 2 or len(k_shape) < 2:
        raise ValueError(f"attention_keep_shape: q and k need at least 2 dims, got q {tuple(q_shape)} and k {tuple(k_shape)}")
    block_q, block_k = block
    return (*q_shape[:-2], cdiv(q_shape[-2], block_q), cdiv(k_shape[-2], block_k))


def sample_attention_keep(q: Tensor, k: Tensor, p, block_q: int, block_k: int) -> Tensor:
    """Keep-flags for the attention of q against k: each tile kept with probability 1 - p.

    One random number per tile (never per element), from ``torch.rand`` so compilers seed and
    replay it like any other random op.
    """
    shape = attention_keep_shape(q.shape, k.shape, (block_q, block_k))
    # The padded draw of the compiled graph (block_mask.padded): the same seed, the same flags.
    return (torch.rand(padded(shape), device=q.device) >= p)[..., : shape[-2], : shape[-1]].contiguous()


def expand_attention_keep(keep: Tensor, sq, sk, block_q: int, block_k: int) -> Tensor:
    """(..., nq, nk) tile flags -> (..., sq, sk) element mask, a broadcast view plus one slice."""
    lead = keep.shape[:-2]
    nq, nk = keep.shape[-2:]
    full = keep[..., :, None, :, None].expand(*lead, nq, block_q, nk, block_k)
    return full.reshape(*lead, nq * block_q, nk * block_k)[..., :sq, :sk]


# --------------------------------------------------------------------------- output layouts
def empty_attention_out(q: Tensor, v: Tensor) -> Tensor:
    """An uninitialised output (*batch, H, Sq, Dv) laid out as (*batch, Sq, H, Dv) in memory.

    That is the layout of SDPA's flash and cuDNN outputs, and what the code after attention
    wants: ``out.transpose(1, 2).reshape(B, Sq, H * Dv)`` is then a view, not a copy. A copy would
    also keep a second full-size activation alive until the backward (the output projection
    saves its input while attention saves its output). 2-D inputs get a plain tensor.
    """
    shape = (*q.shape[:-1], v.shape[-1])
    if q.dim() < 3:
        return q.new_empty(shape)
    return q.new_empty((*shape[:-3], shape[-2], shape[-3], shape[-1])).transpose(-3, -2)


def empty_grad_like(t: Tensor) -> Tensor:
    """An uninitialised gradient for ``t`` in t's own memory layout when that is dense with a unit
    last stride (e.g. q as a head-split view of a projection's output), else contiguous.

    The layout follows the input's, as SDPA's gradients do, so the head merge before the
    projection's backward is a view. Used by the fake and the real ops alike, so both agree.
    """
    if t.dim() >= 2 and t.stride(-1) == 1 and _dense(t):
        return torch.empty_like(t, memory_format=torch.preserve_format)  # keeps t's strides
    return t.new_empty(t.shape)


def _dense(t: Tensor) -> bool:
    """Whether t's elements tile one block of memory with no gaps or overlaps (size-1 dims aside)."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"sparsedrop attention mode={mode!r}: expected one of {', '.join(map(repr, MODES))}")


def default_scale(q: Tensor, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


# --------------------------------------------------------------------------- reference
def _grouped_kv(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool):
    """k, v repeated over the query heads of their group (SDPA's enable_gqa: head h uses h // G)."""
    hq, hkv = q.shape[-3] if q.dim() >= 3 else 1, k.shape[-3] if k.dim() >= 3 else 1
    if hq == hkv:
        return k, v
    if not enable_gqa or hq % hkv != 0:
        raise ValueError(
            f"sparsedrop attention: q has {hq} heads and k/v have {hkv}; different head counts need "
            "enable_gqa=True and q heads a multiple of k/v heads"
        )
    group = hq // hkv
    return k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)


def _scores(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, scale) -> Tensor:
    """S = q kᵀ · scale with the attention mask and the causal mask applied, in fp32."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.float()
    if is_causal:
        sq, sk = s.shape[-2:]
        # Top-left aligned like SDPA: query i sees keys j <= i.
        above = torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(above, float("-inf"))
    return s


def _safe_softmax(s: Tensor) -> tuple[Tensor, Tensor]:
    """softmax over the last dim and its logsumexp; rows that are all -inf give P = 0, lse = +inf.

    The max is detached: softmax does not depend on the shift, and a detached shift keeps the
    autograd graph free of the inf - inf of fully masked rows.
    """
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    empty = l == 0
    prob = e / torch.where(empty, torch.ones_like(l), l)
    lse = torch.where(empty, torch.full_like(l, float("inf")), m + torch.log(l))
    return prob, lse.squeeze(-1)


def _tile_mask(keep: Tensor, s: Tensor, block: tuple[int, int]) -> Tensor:
    return expand_attention_keep(keep, s.shape[-2], s.shape[-1], block[0], block[1])


def reference_attention_forward(q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block, mode):
    """(O in q.dtype, natural-log logsumexp of the softmax rows in fp32, +inf for empty rows)."""
    check_mode(mode)
    scale = default_scale(q, scale)
    kr, vr = _grouped_kv(q, k, v, enable_gqa)
    s = _scores(q, kr, attn_mask, is_causal, scale)
    tiles = _tile_mask(keep, s, block)
    if mode == "dropkey":
        prob, lse = _safe_softmax(s.masked_fill(~tiles, float("-inf")))
    else:
        prob, lse = _safe_softmax(s)
        prob = torch.where(tiles, prob * dropout_scale(p), torch.zeros_like(prob))
    out = torch.matmul(prob, vr.float())
    return out.to(q.dtype), lse


def reference_attention(q, k, v, attn_mask, keep, p, is_causal=False, scale=None, enable_gqa=False, block=(64, 64), mode="post_softmax"):
    """Attention with tile dropout, computed by the math (see the module docstring). Differentiable."""
    return reference_attention_forward(q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block, mode)[0]


def _sum_to(t: Tensor, shape) -> Tensor:
    """Sum a broadcast result back to ``shape`` (leading dims added by broadcasting included)."""
    extra = t.dim() - len(shape)
    if extra > 0:
        t = t.sum(dim=tuple(range(extra)))
    return t.sum_to_size(shape)


def reference_attention_backward(grad_out, q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block, mode, mask_grad):
    """(dq, dk, dv, dmask or None) by the closed-form gradients, in fp32, cast to each input's dtype.

    post_softmax:  P̃ = P ⊙ M/(1-p),  dV = P̃ᵀ dO,  dP = (dO Vᵀ) ⊙ M/(1-p),
                   dS = P ⊙ (dP - rowsum(dO ⊙ O))   (non-zero in dropped tiles too)
    dropkey:       P is the softmax over kept tiles,  dS = P ⊙ (dO Vᵀ - rowsum(dO ⊙ O))
    then dQ = scale dS K, dK = scale dSᵀ Q (summed over a GQA group), dMask = dS (summed over
    the mask's broadcast dims).
    """
    check_mode(mode)
    scale = default_scale(q, scale)
    kr, vr = _grouped_kv(q, k, v, enable_gqa)
    s = _scores(q, kr, attn_mask, is_causal, scale)
    tiles = _tile_mask(keep, s, block)
    do = grad_out.float()
    vf = vr.float()
    if mode == "dropkey":
        prob, _ = _safe_softmax(s.masked_fill(~tiles, float("-inf")))
        prob_v = prob
        dp = torch.matmul(do, vf.transpose(-1, -2))
    else:
        prob, _ = _safe_softmax(s)
        inv = dropout_scale(p)
        prob_v = torch.where(tiles, prob * inv, torch.zeros_like(prob))
        dp = torch.where(tiles, torch.matmul(do, vf.transpose(-1, -2)) * inv, torch.zeros_like(prob))
    out = torch.matmul(prob_v, vf)
    delta = (do * out).sum(-1, keepdim=True)
    ds = prob * (dp - delta)
    dq = torch.matmul(ds, kr.float()) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
    dv = torch.matmul(prob_v.transpose(-1, -2), do)
    if kr.shape[-3:-2] != k.shape[-3:-2] and k.dim() >= 3:
        # GQA: the repeated copies of a kv head sum back into it.
        group = q.shape[-3] // k.shape[-3]
        dk = dk.unflatten(-3, (k.shape[-3], group)).sum(-3)
        dv = dv.unflatten(-3, (k.shape[-3], group)).sum(-3)
    dmask = None
    if mask_grad and attn_mask is not None and attn_mask.is_floating_point():
        dmask = _sum_to(ds, attn_mask.shape).to(attn_mask.dtype)
    dq, dk, dv = _sum_to(dq, q.shape), _sum_to(dk, k.shape), _sum_to(dv, v.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask

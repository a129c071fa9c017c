"""The registered attention ops: ``F.scaled_dot_product_attention`` with tile (block) dropout.

    sparsedrop::attention(q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa,
                          block_q, block_k, mode, kernel) -> Tensor

is what replaces ``scaled_dot_product_attention(..., dropout_p=p > 0)`` in training graphs; the
semantics are those of ``kernels/flash_attention.py``. It is a thin composite over

    sparsedrop::attention_forward(...same...) -> (out, logsumexp)
    sparsedrop::attention_backward(grad_out, q, k, v, out, logsumexp, attn_mask, keep, ...,
                                   mask_grad) -> (dq, dk, dv, dmask)

because backward needs the forward's logsumexp, and a custom op can only hand its backward what
it returns: ``attention_forward`` returns it, ``attention`` drops it. Under autograd (eager,
AOTAutograd, Inductor) the graph therefore holds ``attention_forward`` and, for the backward,
``attention_backward``; saved for backward are q, k, v, out, logsumexp, the mask and the keep
tiles, never a full-size P. dmask is an empty tensor unless a float mask needs a gradient.

``kernel="auto"`` runs the Triton kernels on CUDA where ``unsupported_reason`` allows, else the
fp32 reference; ``"triton"`` forces them (CPU tensors need TRITON_INTERPRET=1); ``"reference"``
forces the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsedrop_compile.kernels import flash_attention as _ref
from sparsedrop_compile.kernels.block_mask import fit_keep, keep_fits
from sparsedrop_compile.kernels.flash_attention import MODES, attention_keep_shape, sample_attention_keep
from sparsedrop_compile.kernels import flash_attention_triton as _tri
from sparsedrop_compile.kernels.runtime import define_op
from sparsedrop_compile.ops import LIB, KernelFamily, opaque_reference, register_autocast_like_matmul, use_triton

__all__ = ["sparse_dropout_attention", "DEFAULT_ATTENTION_BLOCK"]

# Kept in sync with kernels.flash_attention_triton.DEFAULT_BLOCK without importing Triton here.
DEFAULT_ATTENTION_BLOCK = (64, 128)

_lib = torch.library.Library(LIB, "FRAGMENT")


# --------------------------------------------------------------------------- checks
def _check_args(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, keep: Tensor, p: float, enable_gqa: bool,
                block: tuple[int, int], mode: str, op: str) -> None:
    if mode not in MODES:
        raise ValueError(f"sparsedrop::{op}: mode={mode!r}; expected one of {', '.join(map(repr, MODES))}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"sparsedrop::{op}: p={p!r}; expected a dropout probability in [0, 1]")
    if block[0] <= 0 or block[1] <= 0:
        raise ValueError(f"sparsedrop::{op}: block=({block[0]}, {block[1]}); expected positive tile sides")
    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"sparsedrop::{op}: q, k, v must have the same number (>= 2) of dims, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"sparsedrop::{op}: q {tuple(q.shape)} and k {tuple(k.shape)} need the same head dim, "
                         f"k and v {tuple(v.shape)} the same sequence length")
    if q.dim() >= 3 and q.shape[-3] != k.shape[-3] and (not enable_gqa or q.shape[-3] % k.shape[-3] != 0):
        raise ValueError(f"sparsedrop::{op}: q has {q.shape[-3]} heads, k/v have {k.shape[-3]}; pass enable_gqa=True "
                         "with q heads a multiple of k/v heads")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(f"sparsedrop::{op}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast "
                        "them (or run under torch.autocast) as you would for SDPA")
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"sparsedrop::{op}: attn_mask has dtype {attn_mask.dtype}; expected bool (True = attend) "
                        "or a float additive mask")
    _fit_tiles(q, k, keep, block, op)


def _fit_tiles(q: Tensor, k: Tensor, keep: Tensor, block: tuple[int, int], op: str) -> Tensor:
    """keep if it holds the tiles of q against k, exactly or padded by one tile in its last two
    dims (a compiled graph's keep: see block_mask.padded); raises if it does not fit. Returned
    uncut: the kernels read it through its strides, the opaque references cut it (see
    block_mask.keep_fits)."""
    expected = tuple(attention_keep_shape(q.shape, k.shape, block))
    if not (keep.dtype == torch.bool and keep_fits(keep, expected)):
        raise ValueError(
            f"sparsedrop::{op}: keep must be a bool tensor of shape {expected} (tiles of {tuple(block)} over "
            f"{q.shape[-2]} queries x {k.shape[-2]} keys), got {keep.dtype} {tuple(keep.shape)}; build it with "
            "sample_attention_keep(q, k, p, block_q, block_k)"
        )
    return keep


def _cut(q: Tensor, k: Tensor, keep: Tensor, block_q: int, block_k: int) -> Tensor:
    return fit_keep(keep, attention_keep_shape(q.shape, k.shape, (block_q, block_k)))


# The references as opaque ops, in the kernels' output layouts (see ops.py, "opaque references":
# traced as one node each, so a fallback adds no guards on symbolic sizes).
def _reference_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, keep: Tensor, p: float,
                       is_causal: bool, scale: float | None, enable_gqa: bool, block_q: int, block_k: int,
                       mode: str) -> tuple[Tensor, Tensor]:
    out, lse = _ref.reference_attention_forward(q, k, v, attn_mask, _cut(q, k, keep, block_q, block_k), p, is_causal, scale, enable_gqa,
                                                (block_q, block_k), mode)
    return _ref.empty_attention_out(q, v).copy_(out), lse.float().contiguous()


def _reference_forward_fake(q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block_q, block_k, mode):
    return _ref.empty_attention_out(q, v), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _reference_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, keep: Tensor,
                        p: float, is_causal: bool, scale: float | None, enable_gqa: bool, block_q: int, block_k: int,
                        mode: str, want_dmask: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _ref.reference_attention_backward(grad_out, q, k, v, attn_mask, _cut(q, k, keep, block_q, block_k), p, is_causal, scale, enable_gqa,
                                              (block_q, block_k), mode, want_dmask)
    dq, dk, dv = (_ref.empty_grad_like(t).copy_(g) for t, g in zip((q, k, v), grads[:3]))
    dmask = attn_mask.new_empty(attn_mask.shape).copy_(grads[3]) if want_dmask else q.new_empty((0,))
    return dq, dk, dv, dmask


def _reference_backward_fake(grad_out, q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block_q, block_k,
                             mode, want_dmask):
    dmask = attn_mask.new_empty(attn_mask.shape) if want_dmask else q.new_empty((0,))
    return _ref.empty_grad_like(q), _ref.empty_grad_like(k), _ref.empty_grad_like(v), dmask


ATTENTION = KernelFamily(
    "attention",
    triton={"forward": _tri.attention_forward, "backward": _tri.attention_backward},
    reference={
        "forward": opaque_reference("reference_attention_forward", _reference_forward, _reference_forward_fake),
        "backward": opaque_reference("reference_attention_backward", _reference_backward, _reference_backward_fake),
    },
    unsupported_reason=_tri.unsupported_reason,
)


def _tensors(q, k, v, attn_mask):
    return (q, k, v) if attn_mask is None else (q, k, v, attn_mask)


def _use_kernels(kernel, q, k, v, attn_mask, scale, block) -> bool:
    # The kernels fold the scale into the row max, which needs scale > 0; any other scale is
    # legal for SDPA and runs on the reference.
    if scale is not None and scale <= 0 and kernel != "triton":
        return False
    return use_triton(kernel, _tensors(q, k, v, attn_mask), block, ATTENTION)


# --------------------------------------------------------------------------- forward
def _attention_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, keep: Tensor, p: float,
                      is_causal: bool, scale: float | None, enable_gqa: bool, block_q: int, block_k: int, mode: str,
                      kernel: str) -> tuple[Tensor, Tensor]:
    """(out, logsumexp): out like SDPA's, logsumexp (fp32, q.shape[:-1]) of each softmax row."""
    block = (block_q, block_k)
    _check_args(q, k, v, attn_mask, keep, p, enable_gqa, block, mode, "attention_forward")
    keep = _fit_tiles(q, k, keep, block, "attention_forward")
    args = (q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block, mode)
    if _use_kernels(kernel, q, k, v, attn_mask, scale, block):
        return ATTENTION.triton["forward"](*args)
    return ATTENTION.reference["forward"](q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, *block, mode)


def _attention_forward_fake(q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block_q, block_k, mode, kernel):
    return _ref.empty_attention_out(q, v), q.new_empty(q.shape[:-1], dtype=torch.float32)


attention_forward = define_op(f"{LIB}::attention_forward", _attention_forward, _attention_forward_fake)


# --------------------------------------------------------------------------- backward
def _attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       attn_mask: Tensor | None, keep: Tensor, p: float, is_causal: bool, scale: float | None,
                       enable_gqa: bool, block_q: int, block_k: int, mode: str, kernel: str,
                       mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask); dmask is empty unless mask_grad and attn_mask is a float mask."""
    block = (block_q, block_k)
    keep = _fit_tiles(q, k, keep, block, "attention_backward")
    want_dmask = mask_grad and attn_mask is not None and attn_mask.is_floating_point()
    if _use_kernels(kernel, q, k, v, attn_mask, scale, block):
        dq, dk, dv, dmask = ATTENTION.triton["backward"](
            grad_out, q, k, v, out, lse, attn_mask, keep, p, is_causal, scale, enable_gqa, block, mode, want_dmask)
    else:
        dq, dk, dv, dmask = ATTENTION.reference["backward"](
            grad_out, q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, *block, mode, want_dmask)
    return dq, dk, dv, dmask if want_dmask else q.new_empty((0,))


def _attention_backward_fake(grad_out, q, k, v, out, lse, attn_mask, keep, p, is_causal, scale, enable_gqa, block_q, block_k, mode, kernel,
      mask_grad):
    want_dmask = mask_grad and attn_mask is not None and attn_mask.is_floating_point()
    dmask = attn_mask.new_empty(attn_mask.shape) if want_dmask else q.new_empty((0,))
    return _ref.empty_grad_like(q), _ref.empty_grad_like(k), _ref.empty_grad_like(v), dmask


attention_backward = define_op(f"{LIB}::attention_backward", _attention_backward, _attention_backward_fake)


def _attention_setup(ctx, inputs, output):
    q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block_q, block_k, mode, kernel = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, keep)
    ctx.args = (p, is_causal, scale, enable_gqa, block_q, block_k, mode, kernel)


def _attention_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask, keep = ctx.saved_tensors
    need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
    if grad_out is None or not (need_q or need_k or need_v or need_mask):
        return (None,) * 13
    dq, dk, dv, dmask = torch.ops.sparsedrop.attention_backward(
        grad_out, q, k, v, out, lse, attn_mask, keep, *ctx.args, bool(need_mask))
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
            dmask if need_mask else None) + (None,) * 9


attention_forward.register_autograd(_attention_grad, setup_context=_attention_setup)


# --------------------------------------------------------------------------- attention
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor keep, float p, bool is_causal, "
    "float? scale, bool enable_gqa, int block_q, int block_k, str mode, str kernel) -> Tensor"
)


def _attention(q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block_q, block_k, mode, kernel):
    """SDPA with tile dropout: attention_forward without its logsumexp."""
    return torch.ops.sparsedrop.attention_forward(
        q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block_q, block_k, mode, kernel)[0]


# Composite: autograd, fake tensors and compilers all see it through attention_forward.
_lib.impl("attention", _attention, "CompositeImplicitAutograd")

register_autocast_like_matmul("attention", 4)
register_autocast_like_matmul("attention_forward", 4)


# --------------------------------------------------------------------------- user layer
def sparse_dropout_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *, p: float,
                             is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                             block: tuple[int, int] = DEFAULT_ATTENTION_BLOCK, training: bool = True,
                             mode: str = "post_softmax", kernel: str = "auto") -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=p, ...)`` with tile dropout.

    Each (block[0] queries x block[1] keys) tile of the attention probabilities is kept whole
    with probability 1 - p (and scaled by 1/(1-p)) or dropped; the kernels skip the work of
    dropped tiles. Outside training, or at p = 0, this is plain SDPA.
    """
    if mode not in MODES:
        raise ValueError(f"sparse_dropout_attention: mode={mode!r}; expected one of {', '.join(map(repr, MODES))}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"sparse_dropout_attention: p={p!r}; expected a dropout probability in [0, 1]")
    pair = (block, block) if isinstance(block, int) else block
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in pair)):
        raise ValueError(f"sparse_dropout_attention: block={block!r}; expected a positive int or a (query, key) pair "
                         f"of them, e.g. {DEFAULT_ATTENTION_BLOCK}")
    block_q, block_k = pair
    if not training or p == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
    keep = sample_attention_keep(q, k, p, block_q, block_k)
    return torch.ops.sparsedrop.attention(q, k, v, attn_mask, keep, float(p), is_causal, scale, enable_gqa,
                                          block_q, block_k, mode, kernel)

"""The keep-mask ops the passes put in graphs: block-dropout keep sampling and a materialised block dropout.

Their plain-PyTorch twins (``sample_block_keep``, ``apply_block_keep``, ``sample_attention_keep``)
are the references. Written with aten ops, their elementwise and reshape steps on block-count
sizes like ``(s + 7) // 8`` make fake tensors install guards under dynamic shapes (is that count
1? is this reshape contiguous?), and every new size then recompiles. These ops hide those steps
behind fake impls that only allocate, and the flags are drawn with one more block in each of the
last two dims (``block_mask.padded``; the ops cut it off), so even tracing's own metadata checks
(is a dim 1?) are decided without a guard. The random draw stays a visible ``torch.rand`` that
compilers seed, and replay when a checkpoint recomputes it:

    sample_keep(x, p, ...)                  = keep_from_uniform(torch.rand(keep shape), p)
    sample_output_keep(x, w, p, ...)        = the same over the shape of linear(x, w) / matmul(x, w)
    sparsedrop::keep_from_uniform(u, p)     = u >= p (on a GPU one Triton kernel, as below)
    sparsedrop::block_dropout(x, keep, ...) = apply_block_keep(x, keep, ...), backward: the same op on dy;
                                              on a GPU one Triton kernel that Inductor launches
                                              (kernels/block_mask_triton.py), else the reference
                                              as an opaque op (sparsedrop::reference_block_dropout)

Where every size is a plain int there are no guards to avoid, and the same steps stay aten ops that
Inductor fuses with their neighbours (``sample_keep`` / ``materialise`` choose at trace time).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsedrop_compile.kernels import block_mask_triton as _tri_mask
from sparsedrop_compile.kernels.block_mask import apply_block_keep, block_layout, fit_keep, keep_shape, padded
from sparsedrop_compile.kernels.flash_attention import attention_keep_shape
from sparsedrop_compile.kernels.runtime import define_op
from sparsedrop_compile.ops import LIB, _check_keep, matmul_output_shape, opaque_reference


def _reference_keep_from_uniform(u: Tensor, p: float) -> Tensor:
    return (u >= p).contiguous()


def _keep_from_uniform_fake(u, p):
    return u.new_empty(u.shape, dtype=torch.bool)


_ref_keep_from_uniform = opaque_reference("reference_keep_from_uniform", _reference_keep_from_uniform, _keep_from_uniform_fake)


def _keep_from_uniform(u: Tensor, p: float) -> Tensor:
    """Keep-flags from uniform draws: True (kept) where u >= p; on a GPU one Triton kernel, else
    the opaque reference."""
    if _tri_mask.unsupported_reason(u) is not None or u.dtype != torch.float32:
        return _ref_keep_from_uniform(u, p)
    return _tri_mask.keep_from_uniform(u.contiguous(), p)


keep_from_uniform = define_op(f"{LIB}::keep_from_uniform", _keep_from_uniform, _keep_from_uniform_fake)


def _fitted_keep(x: Tensor, keep: Tensor, block_rows: int, block_cols: int, batched: bool) -> Tensor:
    fitted = fit_keep(keep, keep_shape(x.shape, (block_rows, block_cols), batched))
    if fitted is None:
        raise ValueError(f"sparsedrop::block_dropout: keep of shape {tuple(keep.shape)} does not fit blocks of "
                         f"{(block_rows, block_cols)} over x of shape {tuple(x.shape)}")
    return fitted


def _reference_block_dropout(x: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int, batched: bool) -> Tensor:
    return apply_block_keep(x, _fitted_keep(x, keep, block_rows, block_cols, batched), scale, block_rows, block_cols,
                            batched).contiguous()


def _block_dropout_fake(x, keep, scale, block_rows, block_cols, batched):
    return x.new_empty(x.shape)


_ref_block_dropout = opaque_reference("reference_block_dropout", _reference_block_dropout, _block_dropout_fake)


def _block_dropout(x: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int, batched: bool) -> Tensor:
    """x with dropped blocks zeroed and kept ones scaled (``apply_block_keep``), contiguous: on a
    GPU one Triton kernel (``kernels/block_mask_triton.py``), else the opaque reference."""
    if _tri_mask.unsupported_reason(x, (block_rows, block_cols)) is not None:
        return _ref_block_dropout(x, keep, scale, block_rows, block_cols, batched)
    keep = _check_keep(keep, x.shape, (block_rows, block_cols), batched, "block_dropout")  # padded or not: read by strides
    b, m, k = block_layout(x.shape, batched)
    out = _tri_mask.block_dropout(x.reshape(b, m, k), keep, scale, (block_rows, block_cols))
    return out.reshape(x.shape)


block_dropout = define_op(f"{LIB}::block_dropout", _block_dropout, _block_dropout_fake)


def _block_dropout_setup(ctx, inputs, output):
    _, keep, scale, block_rows, block_cols, batched = inputs
    ctx.save_for_backward(keep)
    ctx.args = (scale, block_rows, block_cols, batched)


def _block_dropout_backward(ctx, grad):
    (keep,) = ctx.saved_tensors
    return torch.ops.sparsedrop.block_dropout(grad, keep, *ctx.args), None, None, None, None, None


block_dropout.register_autograd(_block_dropout_backward, setup_context=_block_dropout_setup)


def _symbolic(*tensors: Tensor) -> bool:
    return any(isinstance(n, torch.SymInt) for t in tensors for n in t.shape)


def _draw(shape, device, p, block_rows: int, block_cols: int, batched: bool, symbolic: bool) -> Tensor:
    u = torch.rand(padded(keep_shape(shape, (block_rows, block_cols), batched)), device=device)
    return torch.ops.sparsedrop.keep_from_uniform(u, p) if symbolic else u >= p


def sample_keep(x: Tensor, p, block_rows: int, block_cols: int, batched: bool) -> Tensor:
    """``sample_block_keep`` without guards, padded (``block_mask.padded``): the same draws, so
    the same flags for the same seed once the ops cut the padding off."""
    return _draw(x.shape, x.device, p, block_rows, block_cols, batched, _symbolic(x))


def sample_output_keep(x: Tensor, other: Tensor, p, block_rows: int, block_cols: int, batched: bool) -> Tensor:
    """Keep-flags over the output of ``linear(x, other)`` (batched=False, other the (N, K)
    weight: blocks over (rows, N)) or ``torch.matmul(x, other)`` (batched=True: per matrix),
    drawn as ``sample_keep`` draws them over a tensor of that shape."""
    shape = matmul_output_shape(x.shape, other.shape, batched)
    return _draw(shape, x.device, p, block_rows, block_cols, batched, _symbolic(x, other))


def materialise(x: Tensor, keep: Tensor, scale, block_rows: int, block_cols: int, batched: bool) -> Tensor:
    """Block dropout of x with a (padded) keep, for the users that read the dropped tensor."""
    if _symbolic(x):
        return torch.ops.sparsedrop.block_dropout(x, keep, scale, block_rows, block_cols, batched)
    fitted = fit_keep(keep, keep_shape(x.shape, (block_rows, block_cols), batched))
    return apply_block_keep(x, fitted, scale, block_rows, block_cols, batched)


def sample_tile_keep(q: Tensor, k: Tensor, p, block_q: int, block_k: int) -> Tensor:
    """``sample_attention_keep`` without guards, padded like ``sample_keep``."""
    u = torch.rand(padded(attention_keep_shape(q.shape, k.shape, (block_q, block_k))), device=q.device)
    return torch.ops.sparsedrop.keep_from_uniform(u, p) if _symbolic(q, k) else u >= p

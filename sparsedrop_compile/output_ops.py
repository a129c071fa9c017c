"""The registered ops for block dropout on a matmul's OUTPUT (residual dropout), and on both sides.

``ops.py`` fuses a dropout that feeds a matmul (mask m_in over the activation X). These fuse a
dropout of the matmul's output Y = X Wᵀ + b (mask m over Y's blocks: (rows, N) for linear, per
matrix for a batched matmul), optionally with the input-side mask as well (T5's FFN: dropout ->
wo -> dropout). With s = 1/(1-p) of the output dropout (times any constant the graph multiplied
by) and s_in that of the input side (1 without one):

    linear_out:  y  = s (s_in (x ⊙ m_in) Wᵀ + b) ⊙ m      only kept tiles of y are computed
                 dx = s s_in ((g ⊙ m) W) ⊙ m_in           reduction over kept N-blocks
                 dW = s s_in (g ⊙ m)ᵀ (x ⊙ m_in)          reduction over kept row blocks
                 db = s Σ_rows (g ⊙ m)
    matmul_out:  y  = s (s_in (a ⊙ m_in) @ b) ⊙ m, the same with torch.matmul broadcasting

Backward saves x (a, b), the weight and the small flags only, as the input-side ops do. The
kernels are the input side's three (see kernels/block_sparse_matmul.py), chosen through the
same ``MATMUL`` table: forward sdd, dX dsd, dW dsd_tn.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsedrop_compile.kernels.block_mask import block_layout
from sparsedrop_compile.kernels.runtime import define_op
from sparsedrop_compile.mask_ops import materialise
from sparsedrop_compile.ops import (
    LIB,
    MATMUL,
    _check_keep,
    _check_matmul,
    _check_same_dtype,
    _matmul_operands,
    matmul_output_shape,
    register_autocast_like_matmul,
)


def _keeps(keep: Tensor, keep_in: Tensor | None, y_shape, x_shape, block, batched: bool, op: str):
    """Both masks checked (keep over the output, keep_in, if any, over the activation) and returned
    uncut: a compiled graph's padded keeps go to the launchers as they are (ops._check_keep)."""
    keep = _check_keep(keep, y_shape, block, batched, op)
    return keep, None if keep_in is None else _check_keep(keep_in, x_shape, block, batched, f"{op} (keep_in)")


# --------------------------------------------------------------------------- linear
def _linear_out(x: Tensor, weight: Tensor, bias: Tensor | None, keep: Tensor, scale: float, block_rows: int, block_cols: int,
                kernel: str, keep_in: Tensor | None = None, scale_in: float = 1.0) -> Tensor:
    """y = scale * (scale_in * (x ⊙ m_in) @ weight.T + bias) ⊙ m, m over y viewed as (rows, N)."""
    block = (block_rows, block_cols)
    _check_same_dtype("linear_out", x=x, weight=weight, bias=bias)
    y_shape = matmul_output_shape(x.shape, weight.shape, False)
    keep, keep_in = _keeps(keep, keep_in, y_shape, x.shape, block, False, "linear_out")
    _, rows, k = block_layout(x.shape, False)
    x3, w3 = x.reshape(1, rows, k), weight.unsqueeze(0)  # sdd's b is (1, N, K): the weight as it is
    fn = MATMUL.pick(kernel, (x3, w3), block)["sdd"]
    return fn(x3, w3, keep, scale * scale_in, block, bias, bias_scale=scale, reduce_keep=keep_in).reshape(y_shape)


def _linear_out_fake(x, weight, bias, keep, scale, block_rows, block_cols, kernel, keep_in=None, scale_in=1.0):
    return x.new_empty(matmul_output_shape(x.shape, weight.shape, False))


linear_out = define_op(f"{LIB}::linear_out", _linear_out, _linear_out_fake)


def _linear_out_grad_input(grad: Tensor, weight: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int,
                           kernel: str, keep_in: Tensor | None = None) -> Tensor:
    """dx = scale * ((grad ⊙ m) @ weight) ⊙ m_in."""
    block = (block_rows, block_cols)
    x_shape = (*grad.shape[:-1], weight.shape[1])
    keep, keep_in = _keeps(keep, keep_in, grad.shape, x_shape, block, False, "linear_out_grad_input")
    _, rows, n = block_layout(grad.shape, False)
    g3, w3 = grad.reshape(1, rows, n), weight.unsqueeze(0)
    return MATMUL.pick(kernel, (g3, w3), block)["dsd"](g3, w3, keep, scale, block, out_keep=keep_in).reshape(x_shape)


def _linear_out_grad_input_fake(grad, weight, keep, scale, block_rows, block_cols, kernel, keep_in=None):
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]))


linear_out_grad_input = define_op(f"{LIB}::linear_out_grad_input", _linear_out_grad_input, _linear_out_grad_input_fake)


def _linear_out_grad_weight(grad: Tensor, x: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int,
                            kernel: str, keep_in: Tensor | None = None) -> Tensor:
    """dW = scale * (grad ⊙ m).T @ (x ⊙ m_in), an (N, K) tensor."""
    block = (block_rows, block_cols)
    keep, keep_in = _keeps(keep, keep_in, grad.shape, x.shape, block, False, "linear_out_grad_weight")
    _, rows, k = block_layout(x.shape, False)
    g3, x3 = grad.reshape(1, rows, grad.shape[-1]), x.reshape(1, rows, k)
    fn = MATMUL.pick(kernel, (g3, x3), block)["dsd_tn"]
    return fn(g3, x3, keep, scale, block, False, grad_keep=keep_in).reshape(grad.shape[-1], k)


def _linear_out_grad_weight_fake(grad, x, keep, scale, block_rows, block_cols, kernel, keep_in=None):
    return x.new_empty((grad.shape[-1], x.shape[-1]))


linear_out_grad_weight = define_op(f"{LIB}::linear_out_grad_weight", _linear_out_grad_weight, _linear_out_grad_weight_fake)


def _bias_grad(grad: Tensor, keep: Tensor, scale: float, block: tuple[int, int], batched: bool) -> Tensor:
    """db = scale * Σ (grad ⊙ m) over every dim but the last: the block-dropped grad, summed."""
    dropped = materialise(grad, keep, scale, *block, batched)
    return dropped.sum(dim=tuple(range(grad.dim() - 1)))


def _linear_out_setup(ctx, inputs, output):
    x, weight, bias, keep, scale, block_rows, block_cols, kernel, keep_in, scale_in = inputs
    ctx.save_for_backward(x, weight, keep, keep_in)
    ctx.args = (scale, scale_in, block_rows, block_cols, kernel)
    ctx.has_bias = bias is not None


def _linear_out_backward(ctx, grad):
    x, weight, keep, keep_in = ctx.saved_tensors
    scale, scale_in, br, bc, kernel = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    args = (scale * scale_in, br, bc, kernel, keep_in)
    dx = torch.ops.sparsedrop.linear_out_grad_input(grad, weight, keep, *args) if need_x else None
    dw = torch.ops.sparsedrop.linear_out_grad_weight(grad, x, keep, *args) if need_w else None
    db = _bias_grad(grad, keep, scale, (br, bc), False) if (ctx.has_bias and need_b) else None
    return dx, dw, db, None, None, None, None, None, None, None


linear_out.register_autograd(_linear_out_backward, setup_context=_linear_out_setup)


# --------------------------------------------------------------------------- matmul
def _matmul_out(a: Tensor, b: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int, kernel: str,
                keep_in: Tensor | None = None, scale_in: float = 1.0) -> Tensor:
    """y = scale * (scale_in * (a ⊙ m_in) @ b) ⊙ m with torch.matmul broadcasting; m per matrix of y."""
    block = (block_rows, block_cols)
    _check_matmul(a, b, "matmul_out")
    _check_same_dtype("matmul_out", a=a, b=b)
    y_shape = matmul_output_shape(a.shape, b.shape, True)
    keep, keep_in = _keeps(keep, keep_in, y_shape, a.shape, block, True, "matmul_out")
    a3, b3, keep_in3, _ = _matmul_operands(a, b, keep_in)
    bt = b3.transpose(1, 2)  # sdd's b is (Bb, N, K)
    fn = MATMUL.pick(kernel, (a3, bt), block)["sdd"]
    return fn(a3, bt, keep, scale * scale_in, block, reduce_keep=keep_in3).reshape(y_shape)


def _matmul_out_fake(a, b, keep, scale, block_rows, block_cols, kernel, keep_in=None, scale_in=1.0):
    return a.new_empty(matmul_output_shape(a.shape, b.shape, True))


matmul_out = define_op(f"{LIB}::matmul_out", _matmul_out, _matmul_out_fake)


def _grad_operands(grad: Tensor, a: Tensor, b: Tensor, keep: Tensor, keep_in: Tensor | None, block, op: str):
    """The backward ops' 3-D operands: (keep, keep_in folded like a, a3, b3, grad3, batch)."""
    keep, keep_in = _keeps(keep, keep_in, grad.shape, a.shape, block, True, op)
    a3, b3, keep_in3, batch = _matmul_operands(a, b, keep_in)
    return keep, keep_in3, a3, b3, grad.reshape(a3.shape[0], a3.shape[1], b3.shape[-1]), batch


def _matmul_out_grad_a(grad: Tensor, a: Tensor, b: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int,
                       kernel: str, keep_in: Tensor | None = None) -> Tensor:
    """da = scale * ((grad ⊙ m) @ b.T) ⊙ m_in, summed back to a's shape if a was broadcast."""
    block = (block_rows, block_cols)
    keep, keep_in3, _, b3, g3, batch = _grad_operands(grad, a, b, keep, keep_in, block, "matmul_out_grad_a")
    bt = b3.transpose(1, 2)
    da = MATMUL.pick(kernel, (g3, bt), block)["dsd"](g3, bt, keep, scale, block, out_keep=keep_in3)
    da = da.reshape(*batch, *a.shape[-2:])
    return da.sum_to_size(a.shape) if tuple(a.shape[:-2]) != batch else da


def _matmul_out_grad_a_fake(grad, a, b, keep, scale, block_rows, block_cols, kernel, keep_in=None):
    return a.new_empty(a.shape)


matmul_out_grad_a = define_op(f"{LIB}::matmul_out_grad_a", _matmul_out_grad_a, _matmul_out_grad_a_fake)


def _matmul_out_grad_b(grad: Tensor, a: Tensor, b: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int,
                       kernel: str, keep_in: Tensor | None = None) -> Tensor:
    """db = scale * (a ⊙ m_in).T @ (grad ⊙ m), summed back to b's shape if b was broadcast."""
    block = (block_rows, block_cols)
    keep, keep_in3, a3, b3, g3, batch = _grad_operands(grad, a, b, keep, keep_in, block, "matmul_out_grad_b")
    shared_b = b3.shape[0] == 1 and a3.shape[0] != 1
    k, n = b3.shape[-2:]
    # dsd_tn gives (g ⊙ m)ᵀ (a ⊙ m_in), an (N, K) product: write it through a transposed view of db.
    db = a.new_empty((1 if shared_b else a3.shape[0], k, n))
    MATMUL.pick(kernel, (g3, a3), block)["dsd_tn"](g3, a3, keep, scale, block, not shared_b, grad_keep=keep_in3,
                                                  out=db.transpose(1, 2))
    if shared_b:
        return db.reshape(b.shape)
    db = db.reshape(*batch, *b.shape[-2:])
    return db.sum_to_size(b.shape) if tuple(b.shape[:-2]) != batch else db


def _matmul_out_grad_b_fake(grad, a, b, keep, scale, block_rows, block_cols, kernel, keep_in=None):
    return b.new_empty(b.shape)


matmul_out_grad_b = define_op(f"{LIB}::matmul_out_grad_b", _matmul_out_grad_b, _matmul_out_grad_b_fake)


def _matmul_out_setup(ctx, inputs, output):
    a, b, keep, scale, block_rows, block_cols, kernel, keep_in, scale_in = inputs
    ctx.save_for_backward(a, b, keep, keep_in)
    ctx.args = (scale * scale_in, block_rows, block_cols, kernel)


def _matmul_out_backward(ctx, grad):
    a, b, keep, keep_in = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[:2]
    da = torch.ops.sparsedrop.matmul_out_grad_a(grad, a, b, keep, *ctx.args, keep_in) if need_a else None
    db = torch.ops.sparsedrop.matmul_out_grad_b(grad, a, b, keep, *ctx.args, keep_in) if need_b else None
    return da, db, None, None, None, None, None, None, None


matmul_out.register_autograd(_matmul_out_backward, setup_context=_matmul_out_setup)

register_autocast_like_matmul("linear_out", 3)
register_autocast_like_matmul("matmul_out", 2)

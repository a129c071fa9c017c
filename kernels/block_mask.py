"""The block keep-mask: how it is laid over a matmul's activation, sampled, expanded and indexed.

A mask is a bool tensor ``keep`` of shape (B, n_row_blocks, n_col_blocks). It is laid over the
activation viewed as B matrices of (M, K): for ``linear`` all leading dims fold into the rows
(B = 1, M = numel / K); for a batched matmul every leading entry is one matrix (B = numel / (M K)).
The last row block and the last column block may be ragged.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def cdiv(a, b):
    """Ceil division that keeps SymInts symbolic (no guard, no recompile)."""
    return (a + b - 1) // b


def block_layout(shape, batched: bool):
    """(B, M, K) of a tensor of ``shape`` as a matmul activation.

    ``batched=False`` is linear's view (rows x K); ``batched=True`` is matmul's (one matrix per
    leading entry). Works on ints and SymInts.
    """
    if len(shape) < 1 or (batched and len(shape) < 2):
        raise ValueError(f"block_layout: a {'batched ' if batched else ''}matmul operand needs more dims, got shape {tuple(shape)}")
    if batched:
        return math.prod(shape[:-2]), shape[-2], shape[-1]
    return 1, math.prod(shape[:-1]), shape[-1]


def keep_shape(shape, block: tuple[int, int], batched: bool):
    b, m, k = block_layout(shape, batched)
    return (b, cdiv(m, block[0]), cdiv(k, block[1]))


def padded(shape):
    """``shape`` with one more block in each of the last two dims: the shape of the keep-flags the
    compiled graph draws. Every dim of it is then either a plain size or at least 2, so tracing
    never asks whether a block count is 1 (a guard, and a recompile when it changes); the ops cut
    the extra row and column off (``fit_keep``)."""
    return (*shape[:-2], shape[-2] + 1, shape[-1] + 1)


def keep_fits(keep: Tensor, expected) -> bool:
    """Whether ``keep`` is ``expected``-shaped flags, or padded ones (see :func:`padded`). Reading
    a padded keep through its strides at the expected block indices gives the same flags as
    cutting it, without a slice: slicing a symbolic-shaped tensor asks whether each new size is
    1 (a guard per block count: the recompiles the padding exists to avoid)."""
    shape = tuple(keep.shape)
    return shape == tuple(expected) or shape == tuple(padded(expected))


def fit_keep(keep: Tensor, expected) -> Tensor | None:
    """``keep`` as ``expected``-shaped flags: itself, or a padded keep without its extra last row
    and column of blocks; None if it is neither. Only on concrete tensors (eager, inside opaque
    ops): on traced ones the slice adds guards (see :func:`keep_fits`)."""
    shape = tuple(keep.shape)
    if shape == tuple(expected):
        return keep
    if shape == tuple(padded(expected)):
        return keep[..., : expected[-2], : expected[-1]]
    return None


def sample_block_keep(x: Tensor, p, block_rows: int, block_cols: int, batched: bool) -> Tensor:
    """Keep-flags for the activation ``x``: each block kept with probability 1 - p.

    Built from ``torch.rand`` so compilers treat it like any other random op (seeding,
    reproducibility, recomputation under activation checkpointing). It draws the padded shape the
    compiled graph draws (``padded``), so the same seed gives the same flags in both, and returns
    the cut as a view of that draw: the kernels read flags through their strides, and a
    contiguous copy was one more launch (2-3 us of a T5-sized op's ~200 on an H200, session 26).
    """
    shape = keep_shape(x.shape, (block_rows, block_cols), batched)
    return (torch.rand(padded(shape), device=x.device) >= p)[..., : shape[-2], : shape[-1]]


def dropout_scale(p, factor=1.0):
    """factor / (1 - p); p may be symbolic. At p = 1 nothing is kept and the scale stays finite."""
    if isinstance(p, (int, float)):
        return factor / (1.0 - p) if p < 1 else 0.0
    return factor / torch.sym_max(1.0 - p, 1e-30)


def expand_block_keep(keep: Tensor, rows, cols, block_rows: int, block_cols: int) -> Tensor:
    """(B, nR, nC) block flags -> (B, rows, cols) element mask, as a broadcast view plus one slice."""
    b, n_r, n_c = keep.shape
    full = keep[:, :, None, :, None].expand(b, n_r, block_rows, n_c, block_cols)
    return full.reshape(b, n_r * block_rows, n_c * block_cols)[:, :rows, :cols]


def apply_block_keep(x: Tensor, keep: Tensor, scale, block_rows: int, block_cols: int, batched: bool) -> Tensor:
    """Block dropout materialised: ``x`` with dropped blocks zeroed and kept ones scaled.

    Dropped blocks are exact zeros (also where x holds inf or NaN), as in the sparse kernels,
    which never read them.
    """
    b, m, k = block_layout(x.shape, batched)
    x3 = x.reshape(b, m, k)
    mask = expand_block_keep(keep, m, k, block_rows, block_cols)
    return torch.where(mask, x3 * scale, x3.new_zeros(())).reshape(x.shape)


def kept_block_lists(keep: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Per-line lists of kept blocks, built on the device with no host synchronisation.

    For ``dim=-1`` (rows of the mask): ``counts[b, r]`` kept column blocks in row block r and
    ``index[b, r, :counts[b, r]]`` their column-block numbers in increasing order. For
    ``dim=-2`` the same per column block. Both are int32, contiguous.
    """
    flags = keep if dim in (-1, 2) else keep.transpose(-1, -2)
    counts = flags.sum(-1, dtype=torch.int32)
    # A stable sort of "dropped" puts the kept block numbers first, in order.
    index = torch.sort((~flags).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return counts.contiguous(), index.contiguous()

"""Functional forms for code that is not compiled: block dropout fused into linear / matmul."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsedrop_compile import ops
from sparsedrop_compile.config import _block_pair
from sparsedrop_compile.kernels.block_mask import dropout_scale, sample_block_keep


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"dropout probability p={p!r}: expected a number in [0, 1]")
    return float(p)


def sparse_dropout_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, p: float, block_size=128, training: bool = True, kernel: str = "auto") -> Tensor:
    """``F.linear(block_dropout(x, p), weight, bias)`` with the dropped blocks of x skipped.

    Blocks of ``block_size`` (int or (rows, cols)) tile x viewed as (rows, K), rows being all
    leading dims flattened; each is kept with probability 1 - p and scaled by 1 / (1 - p).
    """
    p = _check_p(p)
    if not training or p == 0:
        return F.linear(x, weight, bias)
    br, bc = _block_pair("block_size", block_size)
    keep = sample_block_keep(x, p, br, bc, False)
    return ops.linear_call(x, weight, bias, keep, dropout_scale(p), br, bc, kernel)


def sparse_dropout_matmul(a: Tensor, b: Tensor, *, p: float, block_size=128, training: bool = True, kernel: str = "auto") -> Tensor:
    """``torch.matmul(block_dropout(a, p), b)`` with blocks over the last two dims of each matrix of a."""
    p = _check_p(p)
    if not training or p == 0:
        return torch.matmul(a, b)
    br, bc = _block_pair("block_size", block_size)
    keep = sample_block_keep(a, p, br, bc, True)
    return ops.matmul_call(a, b, keep, dropout_scale(p), br, bc, kernel)

"""Block-sparse matmuls for block dropout -> matmul (SparseDrop).

Shapes (all launchers take 3-D operands; the ops fold batch dims first):
    a:    (B, M, K)  the activation, block-dropped by ``keep`` (B, cdiv(M, br), cdiv(K, bc))
    b:    (Bb, K, N) the dense right operand, Bb in {1, B} (1: shared by every batch entry)
    grad: (B, M, N)

    dsd    : out = scale * (a ⊙ m) @ b (+ bias)                  dense out, sparse lhs
    sdd    : out = scale * (grad @ bᵀ) ⊙ m                        sparse out (zeros in dropped blocks)
    dsd_tn : out = scale * (a ⊙ m)ᵀ @ grad, summed over B if Bb == 1

For ``linear`` (Y = X Wᵀ) with dropout on its input X, b is ``weight.t()`` as a view: forward is
dsd, dX is sdd, dW is dsd_tn.

Dropout on a matmul's output Y (mask m over Y's blocks) uses the same three shapes the other way
round, with g = dOut the incoming gradient:

    forward: sdd(grad=X, b=W, keep=m, bias=b)     Y' = (X Wᵀ + b) ⊙ m / (1-p), only kept tiles
    dX:      dsd(a=g, b=W, keep=m)                (g ⊙ m) W / (1-p), reduction over kept N-blocks
    dW:      dsd_tn(a=g, grad=X, keep=m)          (g ⊙ m)ᵀ X / (1-p), reduction over kept row blocks

and with dropout on both sides (m_in over X as well) each takes m_in as its second mask:
sdd(reduce_keep=m_in) skips X's dropped K-blocks, dsd(out_keep=m_in) skips dX's dropped tiles,
dsd_tn(grad_keep=m_in) reads X's dropped blocks as zeros.

The ``reference_*`` functions are the plain-PyTorch oracle with the same signatures.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .block_mask import expand_block_keep


def _masked(a: Tensor, keep: Tensor, block: tuple[int, int]) -> Tensor:
    mask = expand_block_keep(keep, a.shape[1], a.shape[2], block[0], block[1])
    return torch.where(mask, a, a.new_zeros(()))


def reference_dsd(a: Tensor, b: Tensor, keep: Tensor, scale: float, block: tuple[int, int], bias: Tensor | None = None,
                  *, out_keep: Tensor | None = None) -> Tensor:
    out = torch.matmul(_masked(a, keep, block), b) * scale
    out = out if bias is None else out + bias
    return out if out_keep is None else _masked(out, out_keep, block)


def reference_sdd(grad: Tensor, b: Tensor, keep: Tensor, scale: float, block: tuple[int, int], bias: Tensor | None = None,
                  *, bias_scale: float | None = None, reduce_keep: Tensor | None = None) -> Tensor:
    g = grad if reduce_keep is None else _masked(grad, reduce_keep, block)
    out = torch.matmul(g, b.transpose(-1, -2)) * scale
    if bias is not None:
        out = out + bias * (scale if bias_scale is None else bias_scale)
    return _masked(out, keep, block)


def reference_dsd_tn(a: Tensor, grad: Tensor, keep: Tensor, scale: float, block: tuple[int, int], batched_out: bool, *,
                     grad_keep: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    am = _masked(a, keep, block)
    grad = grad if grad_keep is None else _masked(grad, grad_keep, block)
    if batched_out:
        result = torch.matmul(am.transpose(-1, -2), grad) * scale
    else:
        # One shared b: its gradient sums over the batch, i.e. one matmul over all B*M rows.
        # Explicit sizes: reshape(-1, 0) of an empty tensor is ambiguous and raises.
        flat_a = am.reshape(am.shape[0] * am.shape[1], am.shape[2])
        flat_g = grad.reshape(grad.shape[0] * grad.shape[1], grad.shape[2])
        result = (flat_a.t() @ flat_g).unsqueeze(0) * scale
    return result if out is None else out.copy_(result)

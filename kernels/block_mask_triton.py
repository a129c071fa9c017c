"""The keep-mask ops' Triton kernels (``mask_ops.py``), for graphs with symbolic sizes:

- materialised block dropout, ``out = x ⊙ m / (1 - p)``, m laid over x's blocks (``block_mask``),
  dropped blocks exact zeros (never read, so inf or NaN there stay out);
- keep flags from uniform draws, ``u >= p``.

The references are ``block_mask.apply_block_keep`` and ``u >= p``, the same computations in
PyTorch ops. The graphs
use those ops where sizes are plain ints (Inductor fuses them with their neighbours); where sizes
are symbolic (dynamic shapes: T5's blocks under FSDP2, a model compiled for varying sequence
lengths) the op ``sparsedrop::block_dropout`` stands in for them, because the reference's reshapes
on block counts would add guards (recompiles); ``sparsedrop::keep_from_uniform`` likewise for
the flags. On a GPU each op launches its kernel here, which
Inductor calls from its own code: one launch, no Python per call. The keep may be padded by one
block in its last two dims (``block_mask.padded``): it is read through its strides at the block
indices, never cut.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .block_mask import cdiv
from .runtime import device_guard, launch

TILE_M, TILE_K = 32, 128
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _block_dropout_kernel(x, keep, out, M, K, n_row_tiles, sxb, sxm, sxk, skb, skr, skc, scale,
                          BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, TILE_M: tl.constexpr, TILE_K: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_row_tiles).to(tl.int64)
    rows = (pid % n_row_tiles) * TILE_M + tl.arange(0, TILE_M)
    cols = tl.program_id(1) * TILE_K + tl.arange(0, TILE_K)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    flag = tl.load(keep + b * skb + (rows // BLOCK_ROWS)[:, None] * skr + (cols // BLOCK_COLS)[None, :] * skc,
                   mask=inside, other=0)
    kept = inside & (flag != 0)
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    v = tl.load(x + b * sxb + rows64[:, None] * sxm + cols64[None, :] * sxk, mask=kept, other=0.0)
    # v * scale in fp32, rounded once to x's dtype: what PyTorch's x * scale computes.
    result = tl.where(kept, v.to(tl.float32) * scale, 0.0)
    tl.store(out + b * M * K + rows64[:, None] * K + cols64[None, :], result.to(out.dtype.element_ty), mask=inside)


@triton.jit
def _keep_from_uniform_kernel(u, out, n, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    tl.store(out + offs, tl.load(u + offs, mask=inside, other=0.0) >= p, mask=inside)


def unsupported_reason(x: Tensor, block: tuple[int, int] = (1, 1)) -> str | None:
    """None if the kernels take x (and the block), else why not (the ops then run the reference)."""
    if x.device.type != "cuda":
        return f"{x.device.type} tensors (the kernel runs on CUDA; under TRITON_INTERPRET=1 only when called directly)"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (the kernel takes fp16, bf16 and fp32)"
    if min(block) <= 0:
        return f"block {tuple(block)} (positive sizes)"
    return None


def block_dropout(x3: Tensor, keep: Tensor, scale: float, block: tuple[int, int]) -> Tensor:
    """(B, M, K) x3 with the blocks ``keep`` (B, cdiv(M, br), cdiv(K, bc), or padded by one block
    in its last two dims) drops zeroed and the rest scaled by ``scale``; a new contiguous tensor."""
    B, M, K = x3.shape
    out = torch.empty((B, M, K), dtype=x3.dtype, device=x3.device)
    n_row_tiles = cdiv(M, TILE_M)
    grid = (B * n_row_tiles, cdiv(K, TILE_K))
    with device_guard(x3):
        launch(_block_dropout_kernel)[grid](
            x3, keep, out, M, K, n_row_tiles, *x3.stride(), *keep.stride(), float(scale),
            BLOCK_ROWS=block[0], BLOCK_COLS=block[1], TILE_M=TILE_M, TILE_K=TILE_K, num_warps=4,
        )
    return out


def keep_from_uniform(u: Tensor, p: float) -> Tensor:
    """Bool flags ``u >= p`` of a contiguous ``u``, a new contiguous tensor of its shape."""
    out = torch.empty(u.shape, dtype=torch.bool, device=u.device)
    n = u.numel()
    with device_guard(u):
        launch(_keep_from_uniform_kernel)[(cdiv(n, 1024),)](u, out, n, float(p), BLOCK=1024, num_warps=4)
    return out

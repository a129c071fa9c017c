"""Tile-dropout attention on Hopper, host side: when the Gluon forward
(``flash_attention_hopper_kernels.py``) serves an attention forward, and its launch.

``flash_attention_triton.attention_forward`` asks for this forward only where a config for it is
given (``"fwd_hopper"``) or ``flash_attention_triton.HOPPER_FORWARD`` is set: since session 17 the
portable forward, which reads K and V by TMA on Hopper, is the faster one where both serve. It
then asks ``unsupported_reason`` first and runs the portable forward when it names a reason; the
backward is the portable one either way (it reads the same O and logsumexp). Same semantics and
oracle (``flash_attention.reference_attention_forward``).

Conditions (each one is a fact the kernel relies on, not a tuning choice; ``unsupported_reason``
names the first that fails):
- a Hopper GPU (capability 9.x), Triton with Gluon's Hopper module, not the interpreter, the
  call not traced (Inductor cannot emit a Gluon kernel in its code), ``SPARSEDROP_HOPPER`` not 0;
- fp16 or bf16; head dim 128 (Gluon's tensors take power-of-two sides, and at 64 the
  portable forward is faster);
- no attention mask, tile dropout after the softmax (``post_softmax``); masks and ``dropkey``
  take the portable kernels;
- q, k, v and the output 16-byte aligned with 16-byte strides and a unit last stride (what a TMA
  descriptor takes);
- a config whose key tile lies inside one mask tile column and whose query tile lies inside
  one mask tile row or spans whole ones.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import Tensor

from . import runtime
from .block_mask import cdiv

try:  # Gluon's Hopper module moved between releases; without it there is no Hopper path
    from .flash_attention_hopper_kernels import _attn_fwd_wgmma_kernel
except Exception:  # noqa: BLE001  (ImportError, or an API this Triton lacks)
    _attn_fwd_wgmma_kernel = None

LOG2E = 1.4426950408889634
HEAD_DIMS = (128,)


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    block_m: int  # query rows a program owns (64 a warpgroup)
    block_n: int  # keys a step
    stages: int  # K/V tiles in flight
    warps: int


# The first that fits the mask tile is taken. Head dim 128 only: measured on an H200 (session 15, calls 1-3, forward alone, p = 0.1, mask
# tile 64 x 128), one warpgroup with 64 x 64 tiles and 3 stages ran at 0.84-0.95x the portable
# forward's time at head dim 128; at 64 every config lost to the portable one (1.10-1.80x), 128-row
# tiles over two warpgroups (8 warps) lost at every head dim, and a FlashAttention-3-style
# warp-specialised kernel (a producer warp, two consumer warpgroups) lost too (NOTES_attention.md).
CANDIDATES: dict[int, list[FwdConfig]] = {
    d: [FwdConfig(64, 64, 3, 4), FwdConfig(64, 32, 3, 4), FwdConfig(64, 16, 3, 4)] for d in HEAD_DIMS
}


def available(device: torch.device) -> bool:
    return _attn_fwd_wgmma_kernel is not None and runtime.hopper_enabled(device)


def fits(cfg: FwdConfig, block: Sequence[int]) -> bool:
    """A key tile inside one mask tile column; a query tile inside one mask tile row or
    spanning whole ones (then each row reads its own keep flag)."""
    block_q, block_k = block
    return block_k % cfg.block_n == 0 and (block_q % cfg.block_m == 0 or cfg.block_m % block_q == 0)


def pick_config(head_dim: int, block: Sequence[int], override: FwdConfig | Sequence[int] | None = None) -> FwdConfig | None:
    """The config for this head dim and mask tile: ``override`` (a FwdConfig or a (block_m,
    block_n, stages, warps) tuple) if it fits, else the first candidate that does, else None."""
    if override is not None:
        cfg = override if isinstance(override, FwdConfig) else FwdConfig(*override)
        if not fits(cfg, block):
            raise ValueError(f"sparsedrop attention Hopper forward config {cfg}: its key tile must divide the mask "
                             f"tile's {block[1]} keys and its query tile divide or span the mask tile's {block[0]} rows; "
                             "pick one that does, or leave \"fwd_hopper\" out for the default")
        if cfg.warps * 16 != cfg.block_m:
            raise ValueError(f"sparsedrop attention Hopper forward config {cfg}: each warp owns 16 query rows, so "
                             f"warps must be block_m / 16 = {cfg.block_m // 16}")
        return cfg
    return next((c for c in CANDIDATES.get(head_dim, ()) if fits(c, block)), None)


def _tma_ok(t: Tensor) -> bool:
    es = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * es % 16 == 0 for s in t.stride()[:-1])


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropkey: bool,
                       block: Sequence[int]) -> str | None:
    """Why the Hopper forward cannot run this problem (4-D q, k, v), or None. The output it
    writes is fresh, (B, Sq, H, D) in memory (``empty_attention_out``): aligned for every head
    dim it takes."""
    if not available(q.device):
        return "not a Hopper GPU with Gluon (or SPARSEDROP_HOPPER=0, or the interpreter)"
    if runtime.tracing() or any(runtime.is_traced(t) for t in (q, k, v)):
        return "traced: Inductor cannot emit a Gluon kernel"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} (the Hopper forward takes {HEAD_DIMS})"
    if attn_mask is not None:
        return "an attention mask"
    if dropkey:
        return "dropkey mode"
    if not all(_tma_ok(t) for t in (q, k, v)):
        return "q, k or v not 16-byte aligned with a unit last stride"
    if pick_config(q.shape[-1], block) is None:
        return f"no config fits the mask tile {tuple(block)}"
    return None


def launch_forward(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, out: Tensor, lse: Tensor, group: int,
                   sm_scale: float, out_scale: float, block: Sequence[int], causal: bool,
                   cfg: FwdConfig) -> None:
    """O (into ``out``) and the logsumexp (into ``lse``, (B, H, Sq) contiguous) of 4-D q, k, v,
    with the keep flags of (block_q, block_k) mask tiles."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    runtime.set_scratch_allocator()
    with runtime.device_guard(q):
        runtime.launch(_attn_fwd_wgmma_kernel)[(cdiv(Sq, cfg.block_m), B * H)](
            q, k, v, keep, out, lse,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *keep.stride(), *out.stride()[:3],
            H, group, Sq, Sk, float(sm_scale * LOG2E), float(out_scale), int(block[0]), int(block[1]),
            HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.stages, CAUSAL=bool(causal),
            ROW_FLAGS=block[0] % cfg.block_m != 0, num_warps=cfg.warps,
        )

"""Flash attention with tile dropout (SparseDrop on P) in Triton, host side: support checks, mask
tile classification and the launchers (the configs and the backward strategy they take are in
``flash_attention_configs.py``, re-exported here). The kernels are in
``flash_attention_kernels.py`` (the forward and shared helpers; its docstring has the cost model
and the scaling) and ``flash_attention_backward_kernels.py``; semantics are those of
``flash_attention.reference_attention`` (read its docstring first).

The backward has two strategies (``BACKWARD_STRATEGY``): "two_pass", one kernel that owns a key
block and accumulates dK, dV (summed over a GQA group in registers) and one that owns a query
block and accumulates dQ (and dMask when a float mask needs a gradient), deterministic; and
"atomic", the first kernel alone, adding each chunk's dQ into an fp32 buffer (by TMA bulk
reductions on Hopper, element atomics elsewhere; fewer FLOPs, not bitwise reproducible, so never
used under ``torch.use_deterministic_algorithms``). Every head dim takes two passes by default
(``BACKWARD_STRATEGY``); "atomic" is there for a ``bwd`` config that asks for it.

Kernel tiles are independent of the mask tile (block splitting): every kernel tile lies inside
one mask tile. That needs the mask tile's sides to be multiples of the kernel tile's;
``_pick_config`` chooses the first candidate that fits, and any mask tile that is a multiple of
16 fits the smallest.

Head dims: every multiple of 8 up to 256 (``supported_head_dim``, defined with the semantics in
``flash_attention.py``). The kernels run a head dim D over ``padded_head_dim(D)`` columns (the
next power of two, at least 16) with the padding masked off; D that are powers of two need no
mask (see "head dims" in flash_attention_kernels.py). Configs and the backward strategy are
looked up by ``head_dim_class(D)``: 64 up to 64, 128 up to 128, 256 above.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import flash_attention_hopper as hopper
from . import runtime, traced_descriptors
from .block_mask import cdiv, dropout_scale
from .flash_attention import (
    HEAD_DIM_RULE,
    default_scale,
    empty_attention_out,
    empty_grad_like,
    supported_head_dim,
)
from .flash_attention_backward_kernels import _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq
from .flash_attention_configs import (
    BACKWARD_STRATEGY,
    CANDIDATES,
    DEFAULT_BLOCK,
    PROBLEM_FIRST,
    TMA_FIRST,
    _pick_config,
    as_config,
    backward_strategy,
    fits,
    head_dim_class,
    padded_head_dim,
)
from .flash_attention_kernels import (
    MASK_BOOL,
    MASK_FLOAT,
    MASK_NONE,
    SKIP_LAZY_LOAD,
    SKIP_NONE,
    SKIP_PREFETCH,
    _attn_fwd,
    _classify_mask,
)
from .runtime import KernelConfig, interpreting, known, launch

__all__ = [
    "BACKWARD_STRATEGY",
    "CANDIDATES",
    "CLASSIFY_MASK_TILES",
    "DEFAULT_BLOCK",
    "MASK_BOOL",
    "MASK_FLOAT",
    "MASK_NONE",
    "PROBLEM_FIRST",
    "SKIP_LAZY_LOAD",
    "SKIP_NONE",
    "SKIP_PREFETCH",
    "TMA_FIRST",
    "HEAD_DIM_RULE",
    "KernelConfig",
    "as_config",
    "attention_backward",
    "attention_forward",
    "backward_strategy",
    "fits",
    "head_dim_class",
    "padded_head_dim",
    "supported_head_dim",
    "unsupported_reason",
]

LOG2E = 1.4426950408889634

# Off: kernels read the mask for every tile and visit every tile (the A/B baseline for benchmarks).
# What the classes are and how the kernels use them: flash_attention_kernels.py, "mask tile classes".
CLASSIFY_MASK_TILES = True


# --------------------------------------------------------------------------- support check
def unsupported_reason(tensors: Sequence[Tensor], block: tuple[int, int]) -> str | None:
    """Why the Triton kernels cannot run (q, k, v[, attn_mask]) with this mask tile, or None."""
    q, k, v = tensors[:3]
    attn_mask = tensors[3] if len(tensors) > 3 else None
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"q has dtype {q.dtype}; the kernels take float16 or bfloat16 (float32 runs on the reference)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return f"q, k, v must all be 3-D or 4-D (batch, heads, seq, dim), got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D"
    if not supported_head_dim(int(q.shape[-1])) or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return (f"head dims q {q.shape[-1]}, k {k.shape[-1]}, v {v.shape[-1]}: the kernels take equal head dims, "
                f"{HEAD_DIM_RULE}")
    if k.shape[:-3] != q.shape[:-3] or v.shape[:-1] != k.shape[:-1]:
        return f"batch or sequence dims disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() == 4 and q.shape[1] % k.shape[1] != 0:
        return f"q heads ({q.shape[1]}) are not a multiple of k/v heads ({k.shape[1]})"
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        return "an empty sequence"
    if block[0] % 16 != 0 or block[1] % 16 != 0:
        return f"mask tile {tuple(block)}: the kernels need both sides to be multiples of 16"
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            return f"attn_mask has dtype {attn_mask.dtype}; expected bool or floating point"
        target = (*q.shape[:-1], k.shape[-2])
        if not _broadcasts_to(tuple(attn_mask.shape), target):
            return f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}"
    return None


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (torch.broadcast_shapes costs ~50 us a
    call on the host, and this runs for every attention call)."""
    if len(shape) > len(target):
        return False
    return all(s == t or s == 1 for s, t in zip(shape[::-1], target[::-1]))


# --------------------------------------------------------------------------- launchers
class _Problem:
    """Inputs viewed as 4-D (B, H, S, D) with unit stride on D, the mask expanded to (B, Hq, Sq, Sk)."""

    def __init__(self, q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block, mode):
        reason = unsupported_reason((q, k, v) if attn_mask is None else (q, k, v, attn_mask), block)
        if reason is not None:
            raise ValueError(f"sparsedrop attention Triton kernels: {reason}; call through sparsedrop::attention "
                             "(kernel='auto') to fall back to the reference")
        self.squeeze = q.dim() == 3
        if self.squeeze:
            q, k, v, keep = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), keep.unsqueeze(0)
        self.q, self.k, self.v = (_unit_last(t) for t in (q, k, v))
        self.B, self.H, self.Sq, self.D = q.shape
        # The head dim is a constexpr of the kernels (compiled per head dim): under dynamic
        # shapes the pass has already specialised it (passes.dropout_sdpa.static_head_dim).
        self.D = int(self.D)
        self.block_d = padded_head_dim(self.D)
        self.H_kv, self.Sk = k.shape[1], k.shape[2]
        if self.H != self.H_kv and not enable_gqa:
            raise ValueError(f"sparsedrop attention: q has {self.H} heads and k/v {self.H_kv}; pass enable_gqa=True")
        self.group = self.H // self.H_kv
        self.block = tuple(block)
        self.keep = keep  # bool, an i1 pointer to Triton (Inductor cannot lower a bool -> uint8 view)
        self.causal = bool(is_causal)
        self.dropkey = mode == "dropkey"
        self.sm_scale = float(default_scale(q, scale))
        if not self.sm_scale > 0:
            raise ValueError(f"sparsedrop attention Triton kernels: scale={scale!r}; they need a positive scale "
                             "(kernel='auto' runs other scales on the reference)")
        self.out_scale = 1.0 if self.dropkey else float(dropout_scale(p))
        self.mask_input = attn_mask
        if attn_mask is None:
            self.mask_kind, self.mask = MASK_NONE, self.q
            self.mask_strides = (0, 0, 0, 0)
        else:
            m = attn_mask
            self.mask_kind = MASK_BOOL if attn_mask.dtype == torch.bool else MASK_FLOAT
            self.mask = m.expand(self.B, self.H, self.Sq, self.Sk)
            self.mask_strides = self.mask.stride()
        self.mask_shared = self.mask_kind != MASK_NONE and self.mask_strides[2] == 0
        # the class of problems PROBLEM_FIRST's configs were timed on, dropout after the softmax:
        # "plain" without an attention mask, "bool_mask" with a bool one every query row shares,
        # "bool_mask_rows" with one whose rows differ; None for the others
        if self.dropkey:
            self.problem_class = None
        elif attn_mask is None:
            self.problem_class = "plain"
        elif attn_mask.dtype == torch.bool:
            self.problem_class = "bool_mask" if self.mask_shared else "bool_mask_rows"
        else:
            self.problem_class = None
        self.interpret = interpreting()

    def common(self):
        """Arguments shared by every kernel after the tensors: strides of q, k, v, mask, keep."""
        return (*self.q.stride()[:3], *self.k.stride()[:3], *self.v.stride()[:3], *self.mask_strides,
                *self.keep.stride())


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _TileClasses:
    """Per-tile mask classes for one pass's kernel tile (or a stand-in when there are none)."""

    def __init__(self, tensor: Tensor, strides: tuple[int, int, int, int], enabled: bool):
        self.tensor, self.strides, self.enabled = tensor, strides, enabled


def _tile_classes(pb: _Problem, tiles: Sequence[tuple[int, int]]) -> list[_TileClasses]:
    """Classify the mask for each (rows, cols) kernel tile in ``tiles`` with one read of the mask.

    Runs on the device (no host sync, CUDA-graph capturable). The classes live in the mask's own
    extent: a dim the mask broadcasts over (stride 0) has one entry and stride 0, so a (B, 1, S, S)
    mask costs B x tiles, not B x H x tiles. The tiles of a pass are powers of two, so one region of
    (max rows, max cols) holds whole tiles of every tiling.
    """
    if pb.mask_kind != MASK_BOOL or not CLASSIFY_MASK_TILES:
        # Float masks go unclassified: HF's float masks (T5's position bias, padding as the
        # dtype's minimum rather than -inf) have no hidden or plain tiles to gain from, and with
        # classes the float-mask dQ kernel spills registers. On an H200 a T5-base training step
        # went from 65.7 ms to 88.8 ms with classified float masks (benchmarks/NOTES_attention.md).
        return [_TileClasses(pb.keep, (0, 0, 0, 0), False) for _ in tiles]
    if not 1 <= len(tiles) <= 2:
        raise ValueError(f"_tile_classes classifies one or two tilings at a time, got {len(tiles)}")
    sb, sh, sm, sn = pb.mask_strides
    bm, hm = (pb.B if sb else 1), (pb.H if sh else 1)
    sqm, skm = (pb.Sq if sm else 1), (pb.Sk if sn else 1)
    out, counts = [], []
    for tm, tn in tiles:
        # One tile more in each of the last two dims than the kernels read (block_mask.padded):
        # a dim that is a bare tile count may be 1, and functionalising the traced launch clones
        # the buffer, whose contiguity check would guard on that (a recompile at one tile).
        n_m, n_n = cdiv(sqm, tm), cdiv(skm, tn)
        t = torch.empty(bm, hm, n_m + 1, n_n + 1, device=pb.q.device, dtype=torch.int8)
        st = t.stride()
        out.append(_TileClasses(t, (st[0] if sb else 0, st[1] if sh else 0, st[2] if sm else 0, st[3] if sn else 0),
                                True))
        counts += [n_m, n_n]
    # A program classifies a region of several tiles: 64 x 128 elements on the GPU (8 K mask
    # elements, 32 a thread with 8 warps), far larger when interpreted, where every program costs
    # milliseconds whatever its size.
    min_m, min_n = (128, 512) if pb.interpret else (64, 128)
    region_m = max(min_m, *(tm for tm, _ in tiles))
    region_n = max(min_n, *(tn for _, tn in tiles))
    a, b = out[0], out[-1]
    (a_m, a_n), (b_m, b_n) = tiles[0], tiles[-1]
    grid = (cdiv(sqm, region_m), cdiv(skm, region_n), bm * hm)
    launch(_classify_mask)[grid](
        pb.mask, a.tensor, b.tensor, *pb.mask_strides, *a.tensor.stride(), *b.tensor.stride(),
        hm, sqm, skm, *counts[:2], *counts[-2:],
        MASK_KIND=pb.mask_kind, REGION_M=region_m, REGION_N=region_n, A_M=a_m, A_N=a_n, B_M=b_m, B_N=b_n,
        HAS_B=len(tiles) == 2, num_warps=8,
    )
    return out


def _tiled(pb: _Problem, cfg: KernelConfig, cls: _TileClasses) -> dict:
    """The constexprs and launch options shared by the kernels that loop over tiles (forward,
    dK/dV, dQ): the problem's, the config's and whether tile classes are passed."""
    return {
        "HEAD_DIM": pb.D, "BLOCK_D": pb.block_d, "BLOCK_M": cfg.tile_m, "BLOCK_N": cfg.tile_n,
        "MASK_KIND": pb.mask_kind, "MASK_SHARED": pb.mask_shared, "TILE_CLS": cls.enabled, "CAUSAL": pb.causal, "DROPKEY": pb.dropkey,
        "SKIP": cfg.skip, "INTERPRET": pb.interpret, "num_warps": cfg.warps, "num_stages": cfg.stages,
    }


def _streamed(pb: _Problem, block_n: int) -> tuple[list, bool]:
    """K and V as a query-block kernel (forward, dQ pass; BLOCK_N keys a tile) takes them, and
    whether that is as TMA descriptors (flash_attention_kernels.py, "TMA loads"; ``_tma_loads``
    says where). Otherwise the tensors themselves, read by pointer loads."""
    kv = (pb.k, pb.v)
    if not _tma_loads(pb, kv):
        return list(kv), False
    return [_rows_descriptor(t, block_n, pb.block_d) for t in kv], True


def _tma_loads(pb: _Problem, tensors: Sequence[Tensor]) -> bool:
    """Whether the kernels may read ``tensors`` through TMA descriptors: where TMA runs
    (``runtime.tma_enabled``), on a problem that is not launch-bound (``runtime.launch_bound``:
    each launch encodes the descriptors on the host), every base and stride 16-byte aligned with
    unit last stride (``runtime.tma_view_ok``).

    In code torch compiles only where a traced launch can record host descriptors and Inductor
    will launch the kernel through Triton's launcher (``traced_descriptors.usable``; the compiled
    code rebuilds them before each launch). With the backend's defaults Inductor's static
    launcher takes our kernels, and it cannot take a descriptor: compiled code keeps pointer loads."""
    if not runtime.tma_enabled(pb.q.device):
        return False
    if (runtime.tracing() or runtime.is_traced(pb.q)) and not traced_descriptors.usable():
        return False
    if not all(known(n > 0) for n in (pb.B, pb.H, pb.Sq, pb.Sk)) \
            or runtime.launch_bound(pb.B * pb.H * pb.Sq, pb.Sk, 2 * pb.D):
        return False
    return all(runtime.tma_view_ok(t) for t in tensors)


def _rows_descriptor(t: Tensor, block_rows: int, block_d: int):
    """A TMA descriptor of the (B, H, S, D) tensor ``t`` whose box is ``block_rows`` x ``block_d``
    of one head (the copy fills what lies past S or D with zeros). A size-1 dim's stride is never
    used, but the copy engine wants every stride 16-byte aligned: it gets the packed value."""
    B, H, S, D = t.shape
    sb, sh, ss, _ = t.stride()
    if known(S == 1):
        ss = cdiv(D * t.element_size(), 16) * 16 // t.element_size()
    if known(H == 1):
        sh = S * ss
    if known(B == 1):
        sb = H * sh
    return traced_descriptors.descriptor_of(t, (B, H, S, D), (sb, sh, ss, 1), (1, 1, block_rows, block_d))


def _launch_forward(pb: _Problem, cfg: KernelConfig, cls: _TileClasses | None = None) -> tuple[Tensor, Tensor]:
    cls = cls or _tile_classes(pb, [(cfg.tile_m, cfg.tile_n)])[0]
    out = empty_attention_out(pb.q, pb.v)
    lse = torch.empty(pb.B, pb.H, pb.Sq, device=pb.q.device, dtype=torch.float32)
    grid = (cdiv(pb.Sq, cfg.tile_m), pb.B * pb.H)
    (k, v), tma_loads = _streamed(pb, cfg.tile_n)
    launch(_attn_fwd)[grid](
        pb.q, k, v, pb.mask, pb.keep, cls.tensor, out, lse,
        *pb.common(), *cls.strides, *out.stride()[:3],
        pb.H, pb.group, pb.Sq, pb.Sk, pb.sm_scale * LOG2E, pb.out_scale, pb.block[0], pb.block[1],
        TMA_LOADS=tma_loads, **_tiled(pb, cfg, cls),
    )
    return out, lse


def _empty_delta(pb: _Problem) -> Tensor:
    return torch.empty(pb.B, pb.H, pb.Sq, device=pb.q.device, dtype=torch.float32)


def _delta_scale(pb: _Problem) -> float:
    """Δ is stored divided by the dropout scale s; at p = 1 (s = 0) every gradient is 0 anyway."""
    return 1.0 / pb.out_scale if pb.out_scale != 0 else 0.0


def _launch_delta(pb: _Problem, out: Tensor, grad_out: Tensor) -> Tensor:
    delta = _empty_delta(pb)
    block_m = 64
    launch(_attn_bwd_delta)[(cdiv(pb.Sq, block_m), pb.B * pb.H)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], pb.H, pb.Sq, _delta_scale(pb),
        HEAD_DIM=pb.D, BLOCK_D=pb.block_d, BLOCK_M=block_m,
    )
    return delta


def _launch_dkdv(pb: _Problem, grad_out: Tensor, lse: Tensor, delta: Tensor, cfg: KernelConfig,
                 atomic_dq: bool = False, mask_grad: bool = False, cls: _TileClasses | None = None):
    """dK, dV (and, with atomic_dq, dQ and dMask too); returns (dk, dv, dq or None, dmask or None)."""
    cls = cls or _tile_classes(pb, [(cfg.tile_m, cfg.tile_n)])[0]
    dk, dv = empty_grad_like(pb.k), empty_grad_like(pb.v)
    dq_acc = torch.zeros(pb.B, pb.H, pb.Sq, pb.D, device=pb.q.device, dtype=torch.float32) if atomic_dq else lse
    dmask = _dmask_buffer(pb) if mask_grad else lse
    # On Hopper the dQ adds go out as TMA bulk reductions (see _attn_bwd_dkdv), through
    # descriptors the kernel builds (Triton's scratch allocator, set here for eager launches).
    # Not in code torch compiles (traced: fake tensors, or a dispatch mode current): torch's
    # analysis of which arguments a user kernel writes (torch._higher_order_ops.triton_kernel_wrap,
    # 2.11-2.13) does not count tt.descriptor_reduce as a write, so compiled code took dQacc as
    # unwritten and read zeros (test_gpu_single_pass_backward_under_inductor). Compiled code keeps
    # the element atomics, which that analysis sees.
    dq_tma = atomic_dq and runtime.tma_enabled(pb.q.device) and not (runtime.tracing() or runtime.is_traced(pb.q))
    if dq_tma:
        runtime.set_scratch_allocator()
    grid = (cdiv(pb.Sk, cfg.tile_n), pb.B * pb.H_kv)
    launch(_attn_bwd_dkdv)[grid](
        pb.q, pb.k, pb.v, pb.mask, pb.keep, cls.tensor, grad_out, lse, delta, dk, dv, dq_acc, dmask,
        *pb.common(), *cls.strides, *grad_out.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        pb.H, pb.H_kv, pb.group, pb.Sq, pb.Sk, pb.sm_scale * LOG2E, pb.sm_scale * pb.out_scale, pb.out_scale,
        pb.out_scale, pb.block[0], pb.block[1],
        ATOMIC_DQ=atomic_dq, DQ_TMA=dq_tma, MASK_GRAD=mask_grad, **_tiled(pb, cfg, cls),
    )
    dq = empty_grad_like(pb.q).copy_(dq_acc.mul_(pb.sm_scale * pb.out_scale)) if atomic_dq else None
    return dk, dv, dq, (dmask if mask_grad else None)


def _dmask_buffer(pb: _Problem) -> Tensor:
    """The (B, H, Sq, Sk) buffer the kernels write dS into.

    dMask is written per element (dropped and masked tiles included). Tiles the loops never
    visit have dS = 0 and must read as zeros: those above the causal diagonal, and in dropkey
    mode the dropped ones (float masks are never classified, so no tile is trimmed as hidden).
    Otherwise every element is written and the buffer needs no zero fill. A mask of the full
    (B, H, Sq, Sk) shape gets its gradient in its own dtype straight from the kernel (as SDPA's
    does); a broadcast one is summed afterwards, so its buffer is fp32. For a T5-base encoder
    layer (64 x 12 x 512 x 512) that is one 0.4 GB write instead of a 0.8 GB fill, a 0.8 GB
    write and a 1.2 GB cast.
    """
    full = tuple(pb.mask_input.shape) in ((pb.B, pb.H, pb.Sq, pb.Sk), (pb.H, pb.Sq, pb.Sk) if pb.squeeze else ())
    dtype = pb.mask_input.dtype if full and not pb.interpret else torch.float32
    alloc = torch.zeros if (pb.causal or pb.dropkey) else torch.empty
    return alloc(pb.B, pb.H, pb.Sq, pb.Sk, device=pb.q.device, dtype=dtype)


def _launch_dq(pb: _Problem, grad_out: Tensor, lse: Tensor, delta: Tensor, cfg: KernelConfig, mask_grad: bool,
               cls: _TileClasses | None = None, out: Tensor | None = None):
    """dQ (and dMask); with ``out`` the kernel also works out Δ from O and dO and writes it into
    ``delta`` (for a dK/dV pass launched after it) instead of reading it."""
    cls = cls or _tile_classes(pb, [(cfg.tile_m, cfg.tile_n)])[0]
    dq = empty_grad_like(pb.q)
    dmask = _dmask_buffer(pb) if mask_grad else lse
    grid = (cdiv(pb.Sq, cfg.tile_m), pb.B * pb.H)
    o = out if out is not None else grad_out  # unread without DELTA_HERE
    (k, v), tma_loads = _streamed(pb, cfg.tile_n)
    launch(_attn_bwd_dq)[grid](
        pb.q, k, v, pb.mask, pb.keep, cls.tensor, grad_out, lse, delta, dq, dmask, o,
        *pb.common(), *cls.strides, *grad_out.stride()[:3], *dq.stride()[:3], *o.stride()[:3],
        pb.H, pb.group, pb.Sq, pb.Sk, pb.sm_scale * LOG2E, pb.sm_scale * pb.out_scale, pb.out_scale,
        _delta_scale(pb), pb.block[0], pb.block[1],
        MASK_GRAD=mask_grad, DELTA_HERE=out is not None, TMA_LOADS=tma_loads, **_tiled(pb, cfg, cls),
    )
    return dq, (dmask if mask_grad else None)


# Whether the Gluon forward (``flash_attention_hopper``) serves by default where it can; a
# "fwd_hopper" config asks for it on one call. Off since the portable forward reads K and V by TMA
# (session 17): where both serve, the portable one is faster, 0.190 against 0.208 ms at
# 4x16x2048x128 causal, p = 0.1, on an H200 (benchmarks/NOTES_attention.md).
HOPPER_FORWARD = False


def _hopper_forward(pb: _Problem, override) -> tuple[Tensor, Tensor] | None:
    """(O, logsumexp) from the Gluon forward where it is asked for (``override``, or
    ``HOPPER_FORWARD``) and serves, else None."""
    if override is None and not HOPPER_FORWARD:
        return None
    if hopper.unsupported_reason(pb.q, pb.k, pb.v, pb.mask_input, pb.dropkey, pb.block) is not None:
        return None
    out = empty_attention_out(pb.q, pb.v)
    lse = torch.empty(pb.B, pb.H, pb.Sq, device=pb.q.device, dtype=torch.float32)
    hopper.launch_forward(pb.q, pb.k, pb.v, pb.keep, out, lse, pb.group, pb.sm_scale, pb.out_scale, pb.block,
                          pb.causal, hopper.pick_config(pb.D, pb.block, override))
    return out, lse


def attention_forward(q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block, mode, config=None):
    """(O, logsumexp) like ``flash_attention.reference_attention_forward``; ``config`` may map
    "fwd" to a KernelConfig or a (BLOCK_M, BLOCK_N, num_warps, num_stages[, skip]) tuple to run
    the portable forward with, or "fwd_hopper" to a (block_m, block_n, stages, warps) tuple for
    the Hopper forward where that serves (``flash_attention_hopper``)."""
    pb = _Problem(q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block, mode)
    config = config or {}
    hop = None if "fwd" in config else _hopper_forward(pb, config.get("fwd_hopper"))
    if hop is not None:
        out, lse = hop
    else:
        out, lse = _launch_forward(pb, _pick_config("fwd", pb.D, pb.block, config.get("fwd"),
                                                    tma_loads=_tma_loads(pb, (pb.k, pb.v)),
                                                    problem=pb.problem_class))
    if pb.squeeze:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, attn_mask, keep, p, is_causal, scale, enable_gqa, block, mode,
                       mask_grad, config=None):
    """(dq, dk, dv, dmask or None) like ``flash_attention.reference_attention_backward``."""
    pb = _Problem(q, k, v, attn_mask, keep, p, is_causal, scale, enable_gqa, block, mode)
    config = config or {}
    strategy = backward_strategy(pb.D, config.get("bwd"))
    if pb.squeeze:
        grad_out, out, lse = grad_out.unsqueeze(0), out.unsqueeze(0), lse.unsqueeze(0)
    grad_out, out, lse = _unit_last(grad_out), _unit_last(out), lse.contiguous()
    mask_grad = bool(mask_grad) and pb.mask_kind == MASK_FLOAT
    if strategy == "atomic":
        delta = _launch_delta(pb, out, grad_out)
        fused_cfg = _pick_config("bwd_fused", pb.D, pb.block, config.get("bwd_fused"))
        dk, dv, dq, dmask = _launch_dkdv(pb, grad_out, lse, delta, fused_cfg, atomic_dq=True, mask_grad=mask_grad)
    else:
        kv_cfg = _pick_config("bwd_kv", pb.D, pb.block, config.get("bwd_kv"), problem=pb.problem_class)
        q_cfg = _pick_config("bwd_q", pb.D, pb.block, config.get("bwd_q"), tma_loads=_tma_loads(pb, (pb.k, pb.v)),
                             problem=pb.problem_class)
        # One read of the mask classifies it for both passes' tiles.
        kv_cls, q_cls = _tile_classes(pb, [(kv_cfg.tile_m, kv_cfg.tile_n), (q_cfg.tile_m, q_cfg.tile_n)])
        # The dQ pass goes first and works out Δ on the way (its programs load dO anyway), so
        # the dK/dV pass after it reads Δ without a launch of its own.
        delta = _empty_delta(pb)
        dq, dmask = _launch_dq(pb, grad_out, lse, delta, q_cfg, mask_grad, cls=q_cls, out=out)
        dk, dv, _, _ = _launch_dkdv(pb, grad_out, lse, delta, kv_cfg, cls=kv_cls)
    if pb.squeeze:
        dq, dk, dv = dq.squeeze(0), dk.squeeze(0), dv.squeeze(0)
    if dmask is not None:
        shape = attn_mask.shape
        extra = dmask.dim() - len(shape)
        dmask = dmask.sum(dim=tuple(range(extra))) if extra > 0 else dmask
        dmask = dmask.sum_to_size(shape).to(attn_mask.dtype)  # no-ops for a full-shape mask
    return dq, dk, dv, dmask

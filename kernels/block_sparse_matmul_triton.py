"""Block-sparse Triton matmuls for SparseDrop, host side: the launchers of dsd
(forward), sdd (grad of the activation) and dsd_tn (grad of the right operand). The kernels are
in ``block_sparse_matmul_kernels.py`` (sdd's in ``block_sparse_matmul_sdd_kernels.py``); same
signatures and semantics as the ``reference_*`` functions in ``block_sparse_matmul.py``, which
the tests use as the oracle.

Every kernel skips dropped mask blocks instead of multiplying by zero:

    dsd    out (M x N) tiles; the reduction over K visits only the kept column blocks of the tile's
           row block (a per-row-block list built on the device).
    sdd    out (M x K) tiles, each inside one mask block; a dropped block's tiles run zero
           iterations and store zeros, kept ones run the full reduction over N.
    dsd_tn out (K x N) tiles; the reduction over rows visits only the kept row blocks of the tile's
           column block (and every batch entry when the batch is summed).

Launch-bound problems (``runtime.launch_bound``: small, and not under CUDA graphs) trade the
skipping for one launch fewer: dsd and dsd_tn walk every block of their line and read a dropped
block's tile as zeros from the flags (``KernelConfig.walk``), so no kept-block list is built;
sdd runs in grid order without the persistent schedule's lists. Their host time, not their GPU
time, is what such a problem costs in a default-mode step.

Tiles are independent of the mask block ("block splitting", report 3.3): tile_m divides the mask
block's rows and tile_k its columns, so one mask block is covered by several tiles. Every kernel
walks ONE flat loop over (kept blocks x tiles per block) so Triton's software pipeliner sees a
single loop with an index load feeding the tile loads.

Work balance (``KernelConfig.balance``, first in the candidate lists): the work of a tile depends
on the mask, so plain grid order leaves a long last wave. sdd then runs persistent (one program
per CTA slot, kept tiles dealt out evenly, the last partial round split into half tiles); dsd and
dsd_tn order their tiles by cost on the device (lines sorted by kept count inside the kept-list
kernel) so the hardware's dispatch becomes longest-job-first. See benchmarks/NOTES_kernels.md §7.

Nothing here synchronises with the host, and every launcher is traceable: all decisions are
made from shapes, strides and dtypes (the config too, see below), kernels are launched through
``runtime.launch``, so when an op is traced by torch.compile Inductor launches them from its
own code, and every launcher can be captured in a CUDA graph.

Configs: each launcher takes one from a short candidate list, chosen once per problem key
(``block_sparse_matmul_configs.py``). Environment knobs:
    SPARSEDROP_AUTOTUNE=1   time the candidates (default 0: the first that runs, or fits)
    SPARSEDROP_TMA=0        never use TMA tensor descriptors (pointer loads only); by default
                            launch-bound problems do not take them (runtime.launch_bound), and
                            of the others only dsd puts them first, outside compiled code that
                            Inductor's static launcher runs (``prefer_tma``); =always counts
                            every problem as large
Under the interpreter (TRITON_INTERPRET=1) a single small config is used and TMA is off.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import block_sparse_matmul_hopper as hopper, launch_plans, runtime
from .block_mask import cdiv, expand_block_keep, keep_fits
from .block_sparse_matmul_configs import (  # noqa: F401  (_TUNER, _MAX_CANDIDATES: read by the tests)
    _MAX_CANDIDATES,
    _TUNER,
    _choose,
    _fail,
    _fits_shared_memory,
    _shared_estimate,
    candidate_configs,
    tuned_configs,
)
from .block_sparse_matmul_kernels import _dsd_kernel, _dsd_tn_kernel, _sum_splits_kernel
from .block_sparse_matmul_sdd_kernels import _sdd_kernel
from .kept_blocks import grouped_fit, kept_grouped, kept_lists, kept_pairs, pairs_fit  # noqa: F401  (read by the tests)
from .runtime import KernelConfig, hint, interpreting, known, launch, next_pow2

__all__ = [
    "dsd",
    "sdd",
    "dsd_tn",
    "unsupported_reason",
    "KernelConfig",
    "candidate_configs",
    "kept_lists",
    "kept_pairs",
    "tuned_configs",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Pointer offsets inside one matrix are int32 (cheaper address math in the inner loop); the batch
# offset is int64. Leave room for the masked lanes of the last tile, which compute (unused)
# addresses up to one tile past the end.
_MAX_MATRIX_SPAN = 2**31 - 2**24


def unsupported_reason(tensors: Sequence[Tensor], block: tuple[int, int]) -> str | None:
    """None if the Triton kernels can run on these operands and mask block, else why not.

    The registered ops call this to choose the kernel and then tell the launchers to skip it
    (``_supported=True``): it runs once per op call.
    """
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return "no tensor operands"
    device, dtype = tensors[0].device, tensors[0].dtype
    mixed_dtypes = False
    for t in tensors:
        if t.device != device:
            return f"operands are on different devices ({t.device} and {device})"
        if t.dtype not in _DTYPES:
            return f"dtype {t.dtype} is not supported (fp16, bf16 or fp32)"
        mixed_dtypes = mixed_dtypes or t.dtype != dtype
    if device.type == "cuda":
        if torch.version.hip is not None:
            return "ROCm GPUs are not tuned for these kernels"
    elif not (device.type == "cpu" and interpreting()):
        return f"{device.type} tensors need CUDA (or CPU under TRITON_INTERPRET=1)"
    if mixed_dtypes:
        return "operands have different dtypes (" + ", ".join(str(t.dtype) for t in tensors) + ")"
    br, bc = block
    if br <= 0 or bc <= 0 or br % 16 or bc % 16:
        return f"mask block {tuple(block)} must be positive multiples of 16 (the smallest tensor-core tile)"
    for t in tensors:
        if t.dim() >= 2 and _matrix_span(t) >= _MAX_MATRIX_SPAN:
            return f"a matrix of shape {tuple(t.shape[-2:])} spans >= 2**31 elements (32-bit in-matrix offsets)"
    return None


def _matrix_span(t: Tensor) -> int:
    """Element distance from a matrix's first to one past its last element (last two dims;
    t has at least two)."""
    shape, stride = t.shape, t.stride()
    return 1 + (shape[-2] - 1) * abs(stride[-2]) + (shape[-1] - 1) * abs(stride[-1])


def _check_common(name: str, x: Tensor, y: Tensor, keep: Tensor, block, rows: int, cols: int,
                  supported: bool = False) -> None:
    """Operand checks shared by the launchers. ``supported``: the caller has already found
    ``unsupported_reason((x, y), block)`` to be None, so it is not run again."""
    if not (x.dim() == 3 and y.dim() == 3):
        _fail(name, f"operands must be 3-D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(block) != 2:
        _fail(name, f"block must be (rows, cols), got {block!r}")
    if not supported:
        reason = unsupported_reason((x, y), tuple(block))
        if reason is not None:
            _fail(name, f"{reason}; use the reference kernels for this call")
    expected = (x.shape[0], cdiv(rows, block[0]), cdiv(cols, block[1]))
    if not (keep.dtype == torch.bool and keep_fits(keep, expected)):
        _fail(name, f"keep must be a bool tensor of shape {expected} (or padded by one block in its last two dims), "
                    f"got {keep.dtype} {tuple(keep.shape)}")
    if keep.device != x.device:
        _fail(name, f"keep is on {keep.device}, operands on {x.device}")


def _check_second_keep(name: str, arg: str, keep: Tensor | None, like: Tensor, rows, cols, block) -> None:
    """A second mask over (B, rows, cols) of ``like`` in blocks of ``block``, as _check_common checks
    the first (padded by one block in its last two dims too: it is read through its strides)."""
    if keep is None:
        return
    expected = (like.shape[0], cdiv(rows, block[0]), cdiv(cols, block[1]))
    if not (keep.dtype == torch.bool and keep_fits(keep, expected) and keep.device == like.device):
        _fail(name, f"{arg} must be a bool tensor of shape {expected} (or padded by one block in its last two dims) "
                    f"on {like.device}, got {keep.dtype} {tuple(keep.shape)} on {keep.device}")


def _precision(dtype: torch.dtype) -> str:
    """Follow torch's fp32 matmul setting: 'highest' (the default) means IEEE fp32."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _masks(M, N, K, cfg: KernelConfig, block) -> dict:
    """Which edges need masked loads. M and K edges must also cover whole tiles past the end
    inside the last (ragged) mask block, hence the block-size test. With symbolic sizes an edge
    is masked unless it is known not to need it (a mask is never wrong, only slower)."""
    return dict(
        MASK_M=not (known(M % block[0] == 0) and known(M % cfg.tile_m == 0)),
        MASK_N=not known(N % cfg.tile_n == 0),
        MASK_K=not (known(K % block[1] == 0) and known(K % cfg.tile_k == 0)),
    )


def _strides(t: Tensor, tma: bool) -> tuple:
    """A 3-D operand's strides as a kernel takes them: a descriptor's legal ones under TMA."""
    return runtime.tma_strides(t) if tma else tuple(t.stride())


def _b_strides(b: Tensor, tma: bool, b_k_contig: bool) -> tuple:
    """b (Bb, K, N) strides (bb, bk, bn); under TMA the descriptor covers the row-major view,
    (Bb, N, K) when K is contiguous, so that view's strides are made legal."""
    if not tma:
        return tuple(b.stride())
    if b_k_contig:
        sbb, sbn, sbk = runtime.tma_strides(b.transpose(1, 2))
        return sbb, sbk, sbn
    return runtime.tma_strides(b)


def _alignment(elem_size: int, values: Sequence, unit_strides: Sequence) -> int:
    """A kernel's ALIGN: the largest power of two, up to 16 bytes of elements, that every one of
    ``values`` (sizes and strides the kernel rewrites with _aligned) is known to be a multiple
    of, provided every one of ``unit_strides`` is known to be 1; else 1 (nothing rewritten).
    Known for every size, not from hints: the kernel's arithmetic is exact only then."""
    if not all(known(s == 1) for s in unit_strides):
        return 1
    align = max(1, 16 // elem_size)
    while align > 1 and not all(known(v % align == 0) for v in values):
        align //= 2
    return align


def _operands_alignment(elem_size: int, N, K, x: tuple, y: tuple, y_k_contig: bool = False) -> int:
    """_alignment for a kernel's two operands as the kernels rewrite them: ``x`` (batch, row,
    col) strides with unit col stride; ``y`` (batch, k, n) strides (sdd's and dsd's b, dsd_tn's
    g) whose unit stride is k's with ``y_k_contig``, else n's; N and K."""
    y_row, y_unit = (y[2], y[1]) if y_k_contig else (y[1], y[2])
    return _alignment(elem_size, (N, K, x[0], x[1], y[0], y_row), (x[2], y_unit))


def _b_tma_view(b: Tensor) -> Tensor:
    """b (Bb, K, N) as the row-major view a descriptor needs: (Bb, N, K) when K is contiguous."""
    return b.transpose(1, 2) if _k_contig(b) else b


def _k_contig(b: Tensor) -> bool:
    return known(b.stride(1) == 1) and not known(b.stride(2) == 1)


def _block_masked(t: Tensor, keep: Tensor, block) -> Tensor:
    """(B, R, C) ``t`` with the blocks ``keep`` drops set to zero (for the degenerate, no-launch cases)."""
    return torch.where(expand_block_keep(keep, t.shape[1], t.shape[2], *block), t, t.new_zeros(()))


def _output(out: Tensor | None, shape: tuple, like: Tensor, name: str) -> Tensor:
    if out is None:
        return launch_plans.empty(shape, like.dtype, like.device)
    if not (tuple(out.shape) == tuple(shape) and out.dtype == like.dtype and out.device == like.device):
        _fail(name, f"out must be a {like.dtype} tensor of shape {tuple(shape)} on {like.device}, "
                    f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


# =========================================================================== persistent grids
# A persistent kernel must not launch more programs than fit on the GPU at once, or the extra
# ones run as a second wave after everything else. How many CTAs fit per SM is read off the
# compiled binary (shared memory and registers) once the config has been launched (tuning does);
# before that an estimate from the tile sizes is used.
_OCCUPANCY: dict[tuple, int] = {}
# Under the interpreter a "GPU" of a few slots, so tests cover several rounds and a split tail.
_INTERPRETER_PROGRAMS = 3


def _persistent_programs(device: torch.device, occ_key: tuple, cfg: KernelConfig, elem_size: int) -> int:
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    sms, smem, regs = runtime.sm_resources(device)
    per_sm = _OCCUPANCY.get(occ_key)
    if per_sm is None:
        # ~168 registers a thread for a 128 x 128 fp32 accumulator over 4 warps.
        shared = _shared_estimate("sdd", cfg, elem_size)
        per_sm = max(1, min(smem // (shared + 1024), regs // (cfg.warps * 32 * 168)))
    return sms * per_sm


def _record_occupancy(device: torch.device, occ_key: tuple, compiled, cfg: KernelConfig) -> None:
    """Read the CTAs per SM off a compiled kernel (a real launch returns it; a traced one not)."""
    if device.type != "cuda" or occ_key in _OCCUPANCY or compiled is None:
        return
    try:
        shared = int(compiled.metadata.shared)
        n_regs = int(compiled.n_regs)
    except Exception:  # pragma: no cover - a triton without these attributes keeps the estimate
        return
    _, smem, regs = runtime.sm_resources(device)
    threads = cfg.warps * 32
    # Registers are allocated per warp in units of 256 (8 per thread, rounded up).
    reg_per_cta = cfg.warps * ((n_regs * 32 + 255) // 256 * 256)
    per_sm = min(smem // (shared + 1024), regs // max(reg_per_cta, 1), 2048 // threads, 32)
    _OCCUPANCY[occ_key] = max(1, per_sm)


# The persistent sdd sums the row-block counts in one vector (constexpr LINES lanes).
_SDD_MAX_LINES = 4096


# =========================================================================== launchers
@launch_plans.planned(runtime.launch_settings)
def dsd(a: Tensor, b: Tensor, keep: Tensor, scale: float, block: tuple[int, int], bias: Tensor | None = None,
        *, out_keep: Tensor | None = None, out: Tensor | None = None, config: KernelConfig | None = None,
        _supported: bool = False) -> Tensor:
    """out (B, M, N) = scale * (a ⊙ m) @ b (+ bias); a (B, M, K), b (Bb, K, N) with Bb in {1, B}.

    ``out_keep`` (B, cdiv(M, br), cdiv(N, bc)): the output is block-dropped too (``⊙ m_out``,
    bias included); its dropped tiles are not computed.

    ``_supported=True``: the caller has found ``unsupported_reason((a, b), block)`` to be None
    (the registered ops do, to choose the kernel), so the launcher does not run it again.
    """
    _check_common("dsd", a, b, keep, block, a.shape[1], a.shape[2], _supported)
    B, M, K = a.shape
    Bb, Kb, N = b.shape
    if not (Kb == K and (Bb == 1 or Bb == B)):
        _fail("dsd", f"b must be (1 or {B}, {K}, N), got {tuple(b.shape)} for a {tuple(a.shape)}")
    if bias is not None and not (tuple(bias.shape) == (N,) and bias.dtype == a.dtype and bias.device == a.device):
        _fail("dsd", f"bias must be a {a.dtype} vector of {N} on {a.device}, got {bias.dtype} {tuple(bias.shape)}")
    _check_second_keep("dsd", "out_keep", out_keep, a, M, N, block)
    out = _output(out, (B, M, N), a, "dsd")
    if known(out.numel() == 0):
        return out
    if known(K == 0):
        full = (bias if bias is not None else out.new_zeros(())).expand(B, M, N)
        return out.copy_(full if out_keep is None else _block_masked(full, out_keep, block))
    if config is None:
        plan = hopper.plan_dsd(a, b, keep, block, bias, out_keep, out)
        if hopper.serve(plan, hopper.wgmma_dsd, (a, b, keep, scale, *block, bias, out), scale, bias):
            return out
    br, bc = block
    b_k_contig = _k_contig(b)
    tma_ok = runtime.tma_enabled(a.device) and runtime.tma_view_ok(a) and runtime.tma_view_ok(_b_tma_view(b)) \
        and runtime.tma_view_ok(out)
    precision = _precision(a.dtype)

    def run(cfg: KernelConfig, a, b, keep, bias, out, out_keep) -> None:
        n_rblk = cdiv(M, br)
        if cfg.walk:  # every block visited, dropped ones read as zeros: no lists (see _dsd_kernel)
            counts = index = order = keep  # unused
        else:
            counts, index, order = kept_lists(keep, "row", order=True, blocks=(B, n_rblk, cdiv(K, bc)))
        balance = cfg.balance and order is not None and not cfg.walk
        if balance:  # every row block gets br // tile_m row tiles (see _dsd_kernel)
            grid = (B * n_rblk * (br // cfg.tile_m) * cdiv(N, cfg.tile_n),)
        else:
            grid = (B * cdiv(M, cfg.tile_m) * cdiv(N, cfg.tile_n),)
        if cfg.tma:
            runtime.set_scratch_allocator()
        sa, sb = _strides(a, cfg.tma), _b_strides(b, cfg.tma, b_k_contig)
        align = _operands_alignment(a.element_size(), N, K, sa, sb, b_k_contig)
        with runtime.device_guard(a):
            launch(_dsd_kernel)[grid](
                a, b, bias if bias is not None else out, out, counts, index, order if balance else counts,
                out_keep if out_keep is not None else keep, keep,
                B, M, N, K, Bb, n_rblk, cdiv(K, bc), B * n_rblk,
                *sa, *sb, bias.stride(0) if bias is not None else 0,
                *_strides(out, cfg.tma), *(out_keep if out_keep is not None else keep).stride(), *keep.stride(),
                float(scale),
                BLOCK_ROWS=br, BLOCK_COLS=bc, TILE_M=cfg.tile_m, TILE_N=cfg.tile_n, TILE_K=cfg.tile_k, GROUP=cfg.group,
                HAS_BIAS=bias is not None, **_masks(M, N, K, cfg, block),
                USE_TMA=cfg.tma, B_K_CONTIG=b_k_contig, OUT_DESC=cfg.tma,
                PRECISION=precision, UPCAST=interpreting() and a.dtype == torch.bfloat16, BALANCE=balance,
                OUT_KEEP=out_keep is not None, WALK=cfg.walk, ALIGN=align,
                num_warps=cfg.warps, num_stages=cfg.stages,
            )

    second = out_keep is not None
    key = ("dsd", hint(B), hint(Bb), hint(M), hint(N), hint(K), tuple(block), a.dtype, b_k_contig, tma_ok, precision,
           a.device.index, second)
    cfg = _choose("dsd", key, M, N, K, block, a.dtype, tma_ok, config, run, (a, b, keep, bias, out, out_keep), second)
    run(cfg, a, b, keep, bias, out, out_keep)
    return out


@launch_plans.planned(runtime.launch_settings)
def sdd(grad: Tensor, b: Tensor, keep: Tensor, scale: float, block: tuple[int, int], bias: Tensor | None = None,
        *, bias_scale: float | None = None, reduce_keep: Tensor | None = None, out: Tensor | None = None,
        config: KernelConfig | None = None, _supported: bool = False) -> Tensor:
    """out (B, M, K) = (scale * (grad @ bᵀ) + bias_scale * bias) ⊙ m; grad (B, M, N), b (Bb, K, N).
    Dropped blocks are 0 (bias included). ``bias`` (K,) is optional; ``bias_scale`` defaults to
    ``scale``. ``reduce_keep`` (B, cdiv(M, br), cdiv(N, bc)): grad is block-dropped too (``grad ⊙
    m_red``), and the reduction skips its dropped blocks.

    ``_supported``: as for ``dsd``, on (grad, b).
    """
    B, M, N = grad.shape
    Bb, K, Nb = b.shape
    _check_common("sdd", grad, b, keep, block, M, K, _supported)
    if not (Nb == N and (Bb == 1 or Bb == B)):
        _fail("sdd", f"b must be (1 or {B}, K, {N}), got {tuple(b.shape)} for grad {tuple(grad.shape)}")
    if bias is not None and not (tuple(bias.shape) == (K,) and bias.dtype == grad.dtype and bias.device == grad.device):
        _fail("sdd", f"bias must be a {grad.dtype} vector of {K} on {grad.device}, got {bias.dtype} {tuple(bias.shape)}")
    _check_second_keep("sdd", "reduce_keep", reduce_keep, grad, M, N, block)
    bias_scale = scale if bias_scale is None else bias_scale
    out = _output(out, (B, M, K), grad, "sdd")
    if known(out.numel() == 0):
        return out
    if known(N == 0):
        if bias is None:
            return out.zero_()
        return out.copy_(_block_masked((bias * bias_scale).expand(B, M, K), keep, block))
    if config is None:
        plan = hopper.plan_sdd(grad, b, keep, block, bias, reduce_keep, out)
        if hopper.serve(plan, hopper.wgmma_sdd, (grad, b, keep, scale, *block, bias, bias_scale, out), scale, bias,
                        bias_scale):
            return out
    br, bc = block
    n_rblk, n_cblk = cdiv(M, br), cdiv(K, bc)
    n_lines = B * n_rblk
    b_k_contig = _k_contig(b)
    tma_ok = runtime.tma_enabled(grad.device) and runtime.tma_view_ok(grad) and runtime.tma_view_ok(_b_tma_view(b)) \
        and runtime.tma_view_ok(out)
    precision = _precision(grad.dtype)
    # The persistent schedule sums all row-block counts in one vector of LINES lanes, so it needs
    # a bound on n_lines that holds for every size the code will see.
    lines_bound = known(n_lines <= _SDD_MAX_LINES)

    def run(cfg: KernelConfig, grad, b, keep, out, bias, reduce_keep):
        flags = keep
        persistent = cfg.balance and lines_bound
        # The tail split halves tile_k; keep the halves at least 16 wide (one mma column step).
        split = persistent and cfg.tile_k >= 32
        tiles = B * cdiv(M, cfg.tile_m) * cdiv(K, cfg.tile_k)
        masks = _masks(M, N, K, cfg, block)
        if persistent:
            counts, index = kept_lists(keep, "row", blocks=(B, n_rblk, n_cblk))
            occ_key = (grad.device.index, cfg, grad.dtype, b_k_contig, tuple(masks.values()))
            programs = _persistent_programs(grad.device, occ_key, cfg, grad.element_size())
            grid = (max(1, min(hint(tiles), programs)),)
        else:
            counts, index = flags, flags  # unused
            grid = (tiles,)
        if reduce_keep is not None:
            red_counts, red_index = kept_lists(reduce_keep, "row", blocks=(B, n_rblk, cdiv(N, bc)))
        else:
            red_counts, red_index = counts, index  # unused
        if cfg.tma:
            runtime.set_scratch_allocator()
        sg, sb = _strides(grad, cfg.tma), _b_strides(b, cfg.tma, b_k_contig)
        align = _operands_alignment(grad.element_size(), N, K, sg, sb, b_k_contig)
        with runtime.device_guard(grad):
            compiled = launch(_sdd_kernel)[grid](
                grad, b, out, flags, counts, index, bias if bias is not None else out, red_counts, red_index,
                B, M, N, K, Bb, n_rblk, n_cblk, n_lines, cdiv(N, bc),
                *sg, *sb, *_strides(out, cfg.tma),
                *flags.stride(), bias.stride(0) if bias is not None else 0,
                float(scale), float(bias_scale),
                BLOCK_ROWS=br, BLOCK_COLS=bc, TILE_M=cfg.tile_m, TILE_N=cfg.tile_n, TILE_K=cfg.tile_k, GROUP=cfg.group,
                **masks,
                USE_TMA=cfg.tma, B_K_CONTIG=b_k_contig, OUT_DESC=cfg.tma,
                PRECISION=precision, UPCAST=interpreting() and grad.dtype == torch.bfloat16,
                PERSISTENT=persistent, SPLIT_TAIL=split, HALF_K=cfg.tile_k // 2 if split else cfg.tile_k, LINES=max(16, next_pow2(hint(n_lines))) if persistent else 16,
                HAS_BIAS=bias is not None, RED_KEEP=reduce_keep is not None, ALIGN=align,
                num_warps=cfg.warps, num_stages=cfg.stages,
            )
        if persistent:
            _record_occupancy(grad.device, occ_key, compiled, cfg)

    second = reduce_keep is not None
    key = ("sdd", hint(B), hint(Bb), hint(M), hint(N), hint(K), tuple(block), grad.dtype, b_k_contig, tma_ok, precision,
           grad.device.index, second)
    cfg = _choose("sdd", key, M, N, K, block, grad.dtype, tma_ok, config, run, (grad, b, keep, out, bias, reduce_keep), second)
    run(cfg, grad, b, keep, out, bias, reduce_keep)
    return out


@launch_plans.planned(runtime.launch_settings)
def dsd_tn(a: Tensor, grad: Tensor, keep: Tensor, scale: float, block: tuple[int, int], batched_out: bool,
           *, grad_keep: Tensor | None = None, out: Tensor | None = None, config: KernelConfig | None = None,
           _supported: bool = False) -> Tensor:
    """out = scale * (a ⊙ m)ᵀ @ (grad [⊙ m_g]): (B, K, N) if batched_out, else (1, K, N) summed over B.

    ``grad_keep`` (B, cdiv(M, br), cdiv(N, bc)): grad is block-dropped too (its dropped blocks are
    read as zeros; only a's dropped row blocks are skipped).

    ``out`` may be any strided (B|1, K, N) view, e.g. ``w.new_empty(N, K).t().unsqueeze(0)`` so
    that linear's weight gradient lands in (N, K) row-major order without a transpose copy.
    ``_supported``: as for ``dsd``, on (a, grad).
    """
    B, M, K = a.shape
    _check_common("dsd_tn", a, grad, keep, block, M, K, _supported)
    if tuple(grad.shape[:2]) != tuple(a.shape[:2]):
        _fail("dsd_tn", f"grad must be ({B}, {M}, N), got {tuple(grad.shape)}")
    N = grad.shape[2]
    _check_second_keep("dsd_tn", "grad_keep", grad_keep, grad, M, N, block)
    Bo = B if batched_out else 1
    out = _output(out, (Bo, K, N), a, "dsd_tn")
    if known(out.numel() == 0):
        return out
    if known(M == 0) or known(B == 0):
        return out.zero_()
    if config is None:
        plan = hopper.plan_dsd_tn(a, grad, keep, block, batched_out, grad_keep, out)
        if hopper.serve(plan, hopper.wgmma_dsd_tn, (a, grad, keep, scale, *block, batched_out, out), scale):
            return out
    br, bc = block
    n_rblk, n_cblk = cdiv(M, br), cdiv(K, bc)
    tma_ok = runtime.tma_enabled(a.device) and runtime.tma_view_ok(a) and runtime.tma_view_ok(grad)
    out_desc_ok = tma_ok and runtime.tma_view_ok(out)
    precision = _precision(a.dtype)

    def run(cfg: KernelConfig, a, grad, keep, out, grad_keep):
        if cfg.walk:  # every row block visited, dropped ones read as zeros: no lists (see _dsd_tn_kernel)
            counts = index = order = keep  # unused
        else:
            counts, index, order = kept_lists(keep, "col" if batched_out else "col_sum", order=True,
                                              blocks=(B, n_rblk, n_cblk))
        balance = cfg.balance and order is not None and not cfg.walk
        if balance:  # every column block gets bc // tile_k tiles along K (see _dsd_tn_kernel)
            grid = (Bo * n_cblk * (bc // cfg.tile_k) * cdiv(N, cfg.tile_n),)
        else:
            grid = (Bo * cdiv(K, cfg.tile_k) * cdiv(N, cfg.tile_n),)
        out_desc = cfg.tma and out_desc_ok and cfg.split == 1
        # split: cfg.split programs an output tile, their fp32 sums added by a second launch
        part = launch_plans.empty((cfg.split, Bo, K, N), torch.float32, a.device) if cfg.split > 1 else None
        if cfg.tma:
            runtime.set_scratch_allocator()
        sa, sg = _strides(a, cfg.tma), _strides(grad, cfg.tma)
        align = _operands_alignment(a.element_size(), N, K, sa, sg)
        with runtime.device_guard(a):
            launch(_dsd_tn_kernel)[(grid[0] * cfg.split,)](
                a, grad, out, counts, index, order if balance else counts, grad_keep if grad_keep is not None else keep,
                keep, part if part is not None else out,
                B, Bo, M, N, K, n_rblk, n_cblk, n_rblk if batched_out else B * n_rblk, Bo * n_cblk,
                *sa, *sg, *_strides(out, out_desc),
                *(grad_keep if grad_keep is not None else keep).stride(), *keep.stride(),
                float(scale),
                BLOCK_ROWS=br, BLOCK_COLS=bc, TILE_M=cfg.tile_m, TILE_N=cfg.tile_n, TILE_K=cfg.tile_k, GROUP=cfg.group,
                **_masks(M, N, K, cfg, block),
                USE_TMA=cfg.tma, OUT_DESC=out_desc,
                PRECISION=precision, UPCAST=interpreting() and a.dtype == torch.bfloat16, BALANCE=balance,
                GRAD_KEEP=grad_keep is not None, WALK=cfg.walk, SPLIT=cfg.split, ALIGN=align,
                num_warps=cfg.warps, num_stages=cfg.stages,
            )
            if part is not None:
                launch(_sum_splits_kernel)[(cdiv(K, 64), cdiv(N, 64), Bo)](
                    part, out, K, N, part[0].numel(), *out.stride(), SPLIT=cfg.split, TILE_K=64, TILE_N=64)

    second = grad_keep is not None
    key = ("dsd_tn", hint(B), Bo if isinstance(Bo, int) else hint(Bo), hint(M), hint(N), hint(K), tuple(block), a.dtype,
           known(out.stride(-1) == 1), tma_ok, precision, a.device.index, second)
    cfg = _choose("dsd_tn", key, M, N, K, block, a.dtype, tma_ok, config, run, (a, grad, keep, out, grad_keep), second,
                  split_over=(M if batched_out else B * M, Bo))
    run(cfg, a, grad, keep, out, grad_keep)
    return out

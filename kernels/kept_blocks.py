"""Lists of a block mask's kept blocks, built on the device in one launch each (no host sync):
what the block-sparse kernels walk instead of testing every block's flag. Host side; the kernels
are in ``kept_blocks_kernels.py``. Used by the portable launchers
(``block_sparse_matmul_triton.py``) and the Hopper ones (``block_sparse_matmul_hopper.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import launch_plans, runtime
from .block_mask import cdiv
from .kept_blocks_kernels import _kept_grouped_kernel, _kept_lists_kernel, _kept_pairs_kernel
from .runtime import hint, known, launch, next_pow2


def kept_lists(keep: Tensor, by: str, order: bool = False, blocks: tuple | None = None, dropped: bool = False,
               stream_k: int = 0):
    """Per-line lists of kept blocks, built on the device in one launch (no host sync).

    by="row":      lines (b, r), entries c       -> counts (B*nR,), index (B*nR, nC)
    by="col":      lines (b, c), entries r       -> counts (B*nC,), index (B*nC, nR)
    by="col_sum":  lines c, entries b*nR + r     -> counts (nC,),   index (nC, B*nR)
    by="all":      one line, entries (b*nR + r)*nC + c -> counts (1,), index (B*nR*nC,)
                   (keep's batch must fold into its rows: stride 0 == nR * stride 1)
    Entries are in increasing order; index[l, counts[l]:] is left unwritten. The index is int16
    when entries fit (see below), else int32.

    The buffers are flat and one entry longer than the lists (counts (n_lines + 1,), index
    (n_lines * line_len + 1,), line l at l * line_len; the last entry is never used): a dim that
    is a bare block count may be 1, and when a traced launch is functionalised, torch's
    contiguity checks on the kernel's outputs would guard on that (one recompile per side of
    one block), as a padded keep avoids for the flags.

    With ``order=True`` returns (counts, index, order): order (int32, n_lines) lists the lines
    by kept count, descending (ties by line number), computed in the same launch; order is None
    when the mask is too large for that (see _ORDER_MAX_FLAG_READS).

    ``dropped=True`` lists the dropped blocks instead (without ``order``).

    ``stream_k=P`` (with ``order``) returns (counts, index, order, schedule): schedule (int32,
    n_lines + 1 + P) holds at [k] the kept blocks of the lines ranked before order[k], at
    [n_lines] all kept blocks, then P zeros (the flags of the Hopper kernel's stream-K
    schedule, ``block_sparse_matmul_hopper_stream_k.py``); None when order is.

    ``blocks`` = (B, nR, nC) when ``keep`` is padded (block_mask.padded): the flags are read
    through keep's strides, so the extra row and column are never seen.
    """
    B, nR, nC = keep.shape if blocks is None else blocks
    flags = keep  # bool tensors go to Triton as they are (i1 pointers): Inductor cannot lower a bool -> uint8 view
    sb, sr, sc = flags.stride()
    if by == "row":
        n_lines, line_len, L0, sl1, sl0, E0, se1, se0 = B * nR, nC, nR, sb, sr, nC, 0, sc
    elif by == "col":
        n_lines, line_len, L0, sl1, sl0, E0, se1, se0 = B * nC, nR, nC, sb, sc, nR, 0, sr
    elif by == "col_sum":
        n_lines, line_len, L0, sl1, sl0, E0, se1, se0 = nC, B * nR, nC, 0, sc, nR, sb, sr
    elif by == "all":
        n_lines, line_len, L0, sl1, sl0, E0, se1, se0 = 1, B * nR * nC, 1, 0, 0, nC, sr, sc
    else:
        raise ValueError(f"kept_lists: by={by!r}, expected 'row', 'col', 'col_sum' or 'all'")
    device = keep.device
    counts = launch_plans.empty(n_lines + 1, torch.int32, device)
    lines, length = hint(n_lines), hint(line_len)
    with_order = order and not dropped and lines > 0 and length > 0 and lines * lines * length <= _ORDER_MAX_FLAG_READS
    order_t = launch_plans.empty(n_lines + 1, torch.int32, device) if with_order else None
    schedule = launch_plans.empty(n_lines + 1 + stream_k, torch.int32, device) if with_order and stream_k else None
    # int16 entries on purpose: Triton's pipeliner skips loads narrower than 32 bits, so the
    # index load stays a plain (L1-hit) load issued with the tile loads it feeds. An int32 index
    # would be pipelined as a load of its own and split the stages between the two levels of
    # indirection, leaving the tile loads only one iteration ahead (2 smem buffers, not 3-4).
    index_dtype = torch.int16 if known(line_len <= 2**15 - 1) else torch.int32
    index = launch_plans.empty(n_lines * line_len + 1, index_dtype, device)
    if not known(n_lines == 0):
        # Entries per step, for the compaction and the ranking alike: the line length rounded
        # up to a power of two, 16 to 1024 (any value is correct; this one is fast).
        chunk = min(max(next_pow2(length), 16), 1024)
        order_lines = max(1, min(next_pow2(lines), 4096 // chunk))
        with runtime.device_guard(keep):
            launch(_kept_lists_kernel)[(n_lines,)](
                flags, counts, index, order_t if with_order else counts, counts if schedule is None else schedule,
                n_lines, line_len, L0, sl1, sl0, E0, se1, se0, stream_k,
                CHUNK=chunk, ORDER=with_order, ORDER_LINES=order_lines, ORDER_ENTRIES=chunk, DROPPED=dropped,
                SCHEDULE=schedule is not None, num_warps=4,
            )
    if stream_k and order:
        return counts, index, order_t, schedule
    return (counts, index, order_t) if order else (counts, index)


def _block_lists(blocks: tuple, extra: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """The buffers of one launch's lists of kept and dropped blocks of a (B, nR, nC) mask: counts
    (3,), index (blocks + extra + 1,), drop_index (blocks + 1,); entries int16 where block numbers
    fit (see kept_lists), a spare entry each (see kept_lists)."""
    B, nR, nC = blocks
    index_dtype = torch.int16 if known(B * nR * nC <= 2**15 - 1) else torch.int32
    return (launch_plans.empty(3, torch.int32, device),
            launch_plans.empty(B * nR * nC + extra + 1, index_dtype, device),
            launch_plans.empty(B * nR * nC + 1, index_dtype, device))


def pairs_fit(blocks: tuple) -> bool:
    """Whether kept_pairs takes a (B, nR, nC) mask: not empty, and small enough for its
    kernel's recount (each of the nC programs reads every flag; _ORDER_MAX_FLAG_READS)."""
    B, nR, nC = blocks
    n_blocks = hint(B * nR * nC)
    return n_blocks > 0 and hint(nC) * n_blocks <= _ORDER_MAX_FLAG_READS


def kept_pairs(keep: Tensor, blocks: tuple | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The paired sdd's lists (see _kept_pairs_kernel), built on the device in one launch:
    (counts, index, drop_index) with counts[0] = pairs, counts[1] = dropped blocks; the pairs
    are index[2i], index[2i + 1], two kept blocks of one column, numbered (b*nR + r)*nC + c;
    the dropped blocks are drop_index[:counts[1]]. ``blocks`` as in kept_lists; the mask must
    pass pairs_fit."""
    B, nR, nC = keep.shape if blocks is None else blocks
    if not pairs_fit((B, nR, nC)):
        raise ValueError(f"kept_pairs: a mask of {(B, nR, nC)} blocks is empty or too large for the one-launch "
                         f"lists (nC * blocks > {_ORDER_MAX_FLAG_READS}); check pairs_fit first")
    n_entries = hint(B * nR)
    counts, index, drop_index = _block_lists((B, nR, nC), nC, keep.device)  # + one repeat per odd column
    sb, sr, sc = keep.stride()
    chunk = min(max(next_pow2(n_entries), 16), 1024)
    with runtime.device_guard(keep):
        launch(_kept_pairs_kernel)[(nC,)](
            keep, counts, index, drop_index, nC, B * nR, sb, sr, sc, nR,
            CHUNK=chunk, COUNT_LINES=max(1, min(next_pow2(hint(nC)), 4096 // chunk)), COUNT_ENTRIES=chunk,
            num_warps=4,
        )
    return counts, index, drop_index


def grouped_fit(blocks: tuple, group: int) -> bool:
    """Whether kept_grouped takes a (B, nR, nC) mask in groups of ``group`` row blocks: not
    empty, and small enough for its kernel's recount (each of its programs reads every flag)."""
    B, nR, nC = blocks
    n_blocks = hint(B * nR * nC)
    return n_blocks > 0 and hint(cdiv(B * nR, group) * nC) * n_blocks <= _ORDER_MAX_FLAG_READS


def kept_grouped(keep: Tensor, group: int, blocks: tuple | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The flat sdd's lists in tile order (see _kept_grouped_kernel), built on the device in one
    launch: (counts, index, drop_index) with counts[0] = kept blocks, counts[1] = dropped ones;
    the kept blocks are index[:counts[0]], group by group of ``group`` row blocks (a power of two,
    batch entries' rows in sequence), column by column within a group, numbered
    (b*nR + r)*nC + c; the dropped ones drop_index[:counts[1]]. ``blocks`` as in kept_lists; the
    mask must pass grouped_fit."""
    B, nR, nC = keep.shape if blocks is None else blocks
    if not grouped_fit((B, nR, nC), group) or group & (group - 1):
        raise ValueError(f"kept_grouped: a mask of {(B, nR, nC)} blocks in groups of {group} rows is empty or too "
                         f"large for the one-launch lists, or {group} is not a power of two; check grouped_fit first")
    n_entries = hint(B * nR)
    counts, index, drop_index = _block_lists((B, nR, nC), 0, keep.device)
    sb, sr, sc = keep.stride()
    entries = min(max(next_pow2(n_entries), 16), 1024)
    with runtime.device_guard(keep):
        launch(_kept_grouped_kernel)[(cdiv(B * nR, group) * nC,)](
            keep, counts, index, drop_index, nC, B * nR, sb, sr, sc, nR,
            GROUP=group, COUNT_LINES=max(1, min(next_pow2(hint(nC)), 4096 // entries)), COUNT_ENTRIES=entries,
            num_warps=4,
        )
    return counts, index, drop_index


# Each program of the lists kernel reads the whole mask once more to rank its line, so the
# ranking is only done while n_lines * (total flags) stays small: 2**25 byte reads, e.g. 1024
# lines of 32 blocks (a 4096-row attention batch) or 4096 lines of 2 blocks. Larger masks have
# many waves of tiles, where the tail the ordering shortens matters little.
_ORDER_MAX_FLAG_READS = 2**25

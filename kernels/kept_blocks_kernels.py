"""The kernels that list a block mask's kept blocks on the device, for the block-sparse kernels
to walk (``@triton.jit`` code only; the host side is ``kept_blocks.py``).

    _kept_lists_kernel  per-line lists of kept (or dropped) blocks, optionally ranked
    _kept_pairs_kernel  the paired sdd's lists (Hopper): kept blocks two per column, dropped ones
    _kept_grouped_kernel  the flat sdd's lists (Hopper): kept blocks in groups of rows, column by
                        column within a group (an L2-friendly tile order), dropped ones
"""
import triton
import triton.language as tl


@triton.jit
def _kept_lists_kernel(
    keep_ptr, count_ptr, index_ptr, order_ptr, schedule_ptr,
    n_lines, line_len, L0, stride_l1, stride_l0, E0, stride_e1, stride_e0, n_flags,
    CHUNK: tl.constexpr, ORDER: tl.constexpr, ORDER_LINES: tl.constexpr, ORDER_ENTRIES: tl.constexpr,
    DROPPED: tl.constexpr = False, SCHEDULE: tl.constexpr = False,
):
    """One program per line of the mask: count its kept entries and write their numbers, in
    increasing order, to the front of the line's slot in ``index`` (a compaction by prefix sum).
    With DROPPED the dropped entries instead (no ORDER then).

    A line is (l1, l0) = divmod(line, L0); an entry is (e1, e0) = divmod(e, E0); the flag sits at
    keep + l1*stride_l1 + l0*stride_l0 + e1*stride_e1 + e0*stride_e0. This covers row lists,
    per-batch column lists and batch-summed column lists (entries (b, r)) without copies.

    With ORDER, the program also writes its line number to ``order[rank]``, rank being the
    line's place when lines are sorted by kept count, descending, ties by line number (a
    counting sort: rank = #lines with more kept + #earlier lines with as many). A program cannot
    see the others' counts without a grid-wide barrier, so it recounts every line itself: the
    whole mask is read once per line, which the launcher only allows for small masks (a few
    thousand lines; the flags stay in L2). This costs no extra launch and no host sync.

    With SCHEDULE (and ORDER), the stream-K schedule of the Hopper kernel as well: the kept
    blocks of the lines ranked before this one go to ``schedule[rank]`` (an exclusive prefix sum
    in ``order``'s order), program 0 writes the total to ``schedule[n_lines]`` and zeroes the
    ``n_flags`` flags after it (the kernel's partial-tile flags, which must start at 0).
    """
    line = tl.program_id(0)
    base = keep_ptr + (line // L0).to(tl.int64) * stride_l1 + (line % L0).to(tl.int64) * stride_l0
    out = index_ptr + line.to(tl.int64) * line_len
    total = 0
    for start in range(0, line_len, CHUNK):
        e = start + tl.arange(0, CHUNK)
        valid = e < line_len
        flag = tl.load(base + (e // E0) * stride_e1 + (e % E0) * stride_e0, mask=valid, other=0)
        if DROPPED:
            kept = (flag == 0) & valid
        else:
            kept = (flag != 0) & valid
        ones = kept.to(tl.int32)
        pos = total + tl.cumsum(ones, 0) - ones
        tl.store(out + pos, e.to(index_ptr.dtype.element_ty), mask=kept)
        total += tl.sum(ones, 0)
    tl.store(count_ptr + line, total)
    if ORDER:
        rank = 0
        kept_before = 0
        kept_all = 0
        for j0 in range(0, n_lines, ORDER_LINES):
            j = j0 + tl.arange(0, ORDER_LINES)
            j_ok = j < n_lines
            c_j = tl.zeros((ORDER_LINES,), dtype=tl.int32)
            for e0 in range(0, line_len, ORDER_ENTRIES):
                offsets, ok = _flag_offsets(j, j_ok, e0, line_len, L0, stride_l1, stride_l0, E0, stride_e1, stride_e0,
                                            ORDER_ENTRIES)
                c_j += tl.sum((tl.load(keep_ptr + offsets, mask=ok, other=0) != 0).to(tl.int32), 1)
            before = j_ok & ((c_j > total) | ((c_j == total) & (j < line)))
            rank += tl.sum(before.to(tl.int32), 0)
            if SCHEDULE:
                kept_before += tl.sum(tl.where(before, c_j, 0), 0)
                kept_all += tl.sum(tl.where(j_ok, c_j, 0), 0)
        tl.store(order_ptr + rank, line)
        if SCHEDULE:
            tl.store(schedule_ptr + rank, kept_before)
            if line == 0:
                tl.store(schedule_ptr + n_lines, kept_all)
                for f0 in range(0, n_flags, CHUNK):
                    f = f0 + tl.arange(0, CHUNK)
                    tl.store(schedule_ptr + n_lines + 1 + f, tl.zeros((CHUNK,), tl.int32), mask=f < n_flags)


@triton.jit
def _flag_offsets(j, j_ok, e0, line_len, L0, stride_l1, stride_l0, E0, stride_e1, stride_e0, ENTRIES: tl.constexpr):
    """Offsets from keep of the flags of lines ``j`` (a vector), entries e0 .. e0 + ENTRIES, in
    the geometry of _kept_lists_kernel, and which of them exist: how a program counts the other
    lines' kept entries without a grid-wide barrier, by reading their flags itself.

    Offsets, not pointers or counts, on purpose: when torch traces a launch it counts as written
    every argument from which a store's address is computed, and through a call every argument
    of the call. The counts address stores (a line's rank, its place in the lists), so a helper
    taking ``keep`` and returning counts made keep count as written, and compiled code at sizes
    with kept-block lists failed to build (Inductor, torch 2.11: KeyError in the scheduler)."""
    j_base = (j // L0).to(tl.int64) * stride_l1 + (j % L0).to(tl.int64) * stride_l0
    e = e0 + tl.arange(0, ENTRIES)
    e_off = (e // E0) * stride_e1 + (e % E0) * stride_e0
    return j_base[:, None] + e_off[None, :], j_ok[:, None] & (e < line_len)[None, :]


@triton.jit
def _kept_pairs_kernel(
    keep_ptr, count_ptr, index_ptr, drop_index_ptr,
    n_cols, n_entries, stride_b, stride_r, stride_c, n_rblk,
    CHUNK: tl.constexpr, COUNT_LINES: tl.constexpr, COUNT_ENTRIES: tl.constexpr,
):
    """The lists of the paired sdd (Hopper), in one launch. One program per column block c of a
    (B, nR, nC) mask; its entries are e = b*nR + r (every batch entry's rows), a block is numbered
    (b*nR + r)*nC + c as in kept_lists(by="all").

    Kept blocks, column by column, two per pair: column c's kept blocks in increasing order, and
    its last one once more when their count is odd, so the two blocks of a pair always share a
    column (the paired kernel computes both with one tile of the right operand). They start at
    index[2 * (pairs of the columns before c)].
    Dropped blocks, column by column, from drop_index[(dropped blocks of the columns before c)].
    count[0] = pairs, count[1] = dropped blocks, written by program 0.

    Each program counts every column itself (_flag_offsets), as the ranking of _kept_lists_kernel
    does: the launcher allows it for small masks only.
    """
    c = tl.program_id(0)
    pairs_before = 0
    dropped_before = 0
    pairs_all = 0
    dropped_all = 0
    for j0 in range(0, n_cols, COUNT_LINES):
        j = j0 + tl.arange(0, COUNT_LINES)
        j_ok = j < n_cols
        c_j = tl.zeros((COUNT_LINES,), dtype=tl.int32)
        for e0 in range(0, n_entries, COUNT_ENTRIES):
            offsets, ok = _flag_offsets(j, j_ok, e0, n_entries, n_cols, 0, stride_c, n_rblk, stride_b, stride_r,
                                        COUNT_ENTRIES)
            c_j += tl.sum((tl.load(keep_ptr + offsets, mask=ok, other=0) != 0).to(tl.int32), 1)
        pairs_j = (c_j + 1) // 2
        dropped_j = tl.where(j_ok, n_entries - c_j, 0)
        pairs_before += tl.sum(tl.where(j < c, pairs_j, 0), 0)
        dropped_before += tl.sum(tl.where(j < c, dropped_j, 0), 0)
        pairs_all += tl.sum(pairs_j, 0)
        dropped_all += tl.sum(dropped_j, 0)
    kept_out = index_ptr + 2 * pairs_before.to(tl.int64)
    dropped_out = drop_index_ptr + dropped_before.to(tl.int64)
    base = keep_ptr + c.to(tl.int64) * stride_c
    kept_n = 0
    dropped_n = 0
    last = -1
    for start in range(0, n_entries, CHUNK):
        e = start + tl.arange(0, CHUNK)
        valid = e < n_entries
        flag = tl.load(base + (e // n_rblk) * stride_b + (e % n_rblk) * stride_r, mask=valid, other=0)
        number = e * n_cols + c
        kept = (flag != 0) & valid
        ones = kept.to(tl.int32)
        tl.store(kept_out + kept_n + tl.cumsum(ones, 0) - ones, number.to(index_ptr.dtype.element_ty), mask=kept)
        kept_n += tl.sum(ones, 0)
        last = tl.maximum(last, tl.max(tl.where(kept, number, -1), 0))
        dropped = (flag == 0) & valid
        ones = dropped.to(tl.int32)
        tl.store(dropped_out + dropped_n + tl.cumsum(ones, 0) - ones, number.to(drop_index_ptr.dtype.element_ty),
                 mask=dropped)
        dropped_n += tl.sum(ones, 0)
    # an odd column's last block pairs with itself (the kernel stores it once)
    tl.store(kept_out + kept_n, last.to(index_ptr.dtype.element_ty), mask=(kept_n % 2) == 1)
    tl.store(count_ptr, pairs_all, mask=c == 0)
    tl.store(count_ptr + 1, dropped_all, mask=c == 0)


@triton.jit
def _kept_grouped_kernel(
    keep_ptr, count_ptr, index_ptr, drop_index_ptr,
    n_cols, n_entries, stride_b, stride_r, stride_c, n_rblk,
    GROUP: tl.constexpr, COUNT_LINES: tl.constexpr, COUNT_ENTRIES: tl.constexpr,
):
    """The flat sdd's lists (Hopper), in one launch, in the order its tiles should run: one
    program per line (g, c) = divmod(line, n_cols), the blocks of column c whose entries
    e = b*nR + r lie in group g (GROUP entries each); lines group by group, column by column.
    A wave of tiles then reads a few row blocks of the left operand and a run of column blocks of
    the right one, which stay in L2; in plain row-major order a wave of a wide output streams the
    whole right operand once per row block, column-major the whole left one per column.

    Kept blocks go to index from the kept blocks of the lines before this one, dropped blocks to
    drop_index likewise, each numbered (b*nR + r)*nC + c as in kept_lists(by="all"). count[0] =
    kept blocks, count[1] = dropped blocks, written by program 0. Each program counts the blocks
    of the lines before it itself (_flag_offsets), as _kept_pairs_kernel does: small masks only.
    """
    line = tl.program_id(0)
    g = line // n_cols
    c = line % n_cols
    kept_before = 0
    dropped_before = 0
    kept_all = 0
    for j0 in range(0, n_cols, COUNT_LINES):
        j = j0 + tl.arange(0, COUNT_LINES)
        j_ok = j < n_cols
        for e0 in range(0, n_entries, COUNT_ENTRIES):
            offsets, ok = _flag_offsets(j, j_ok, e0, n_entries, n_cols, 0, stride_c, n_rblk, stride_b, stride_r,
                                        COUNT_ENTRIES)
            kept = tl.load(keep_ptr + offsets, mask=ok, other=0) != 0
            grp = (e0 + tl.arange(0, COUNT_ENTRIES)) // GROUP
            earlier = ok & ((grp[None, :] < g) | ((grp[None, :] == g) & (j[:, None] < c)))
            kept_before += tl.sum(tl.sum((kept & earlier).to(tl.int32), 1), 0)
            dropped_before += tl.sum(tl.sum((~kept & earlier).to(tl.int32), 1), 0)
            kept_all += tl.sum(tl.sum((kept & ok).to(tl.int32), 1), 0)
    e = g * GROUP + tl.arange(0, GROUP)
    valid = e < n_entries
    flag = tl.load(keep_ptr + c.to(tl.int64) * stride_c + (e // n_rblk) * stride_b + (e % n_rblk) * stride_r,
                   mask=valid, other=0)
    number = e * n_cols + c
    kept = (flag != 0) & valid
    ones = kept.to(tl.int32)
    tl.store(index_ptr + kept_before + tl.cumsum(ones, 0) - ones, number.to(index_ptr.dtype.element_ty), mask=kept)
    dropped = (flag == 0) & valid
    ones = dropped.to(tl.int32)
    tl.store(drop_index_ptr + dropped_before + tl.cumsum(ones, 0) - ones, number.to(drop_index_ptr.dtype.element_ty),
             mask=dropped)
    tl.store(count_ptr, kept_all, mask=line == 0)
    tl.store(count_ptr + 1, n_cols * n_entries - kept_all, mask=line == 0)

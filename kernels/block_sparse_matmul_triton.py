"""Block-sparse Triton matmuls for SparseDrop: dsd (forward), sdd (grad of the activation), dsd_tn
(grad of the right operand). Same signatures and semantics as the ``reference_*`` functions in
``block_sparse_matmul.py``, which the tests use as the oracle.

Every kernel skips dropped mask blocks instead of multiplying by zero:

    dsd    out (M x N) tiles; the reduction over K visits only the kept column blocks of the tile's
           row block (a per-row-block list built on the device).
    sdd    out (M x K) tiles, each inside one mask block; a dropped block's tiles run zero
           iterations and store zeros, kept ones run the full reduction over N.
    dsd_tn out (K x N) tiles; the reduction over rows visits only the kept row blocks of the tile's
           column block (and every batch entry when the batch is summed).

Tiles are independent of the mask block ("block splitting", report 3.3): tile_m divides the mask
block's rows and tile_k its columns, so one mask block is covered by several tiles. Every kernel
walks ONE flat loop over (kept blocks x tiles per block) so Triton's software pipeliner sees a
single loop with an index load feeding the tile loads.

Work balance (``KernelConfig.balance``, first in the candidate lists): the work of a tile depends
on the mask, so plain grid order leaves a long last wave. sdd then runs persistent (one program
per CTA slot, kept tiles dealt out evenly, the last partial round split into half tiles); dsd and
dsd_tn order their tiles by cost on the device (lines sorted by kept count inside the kept-list
kernel) so the hardware's dispatch becomes longest-job-first. See benchmarks/NOTES_kernels.md §7.

Nothing here synchronises with the host: the kept lists come from one small Triton kernel, grids
are sized from shapes only, so every launcher can be captured in a CUDA graph.

Tuning: each launcher picks a config from a short list (``candidate_configs``) by timing them on
the first call per problem key (sizes, block, dtype, layout); the choice is cached per process.
Environment knobs:
    SPARSEDROP_AUTOTUNE=0   take the first (heuristic) candidate, no timing
    SPARSEDROP_TMA=0        never use TMA tensor descriptors (pointer loads only)
    SPARSEDROP_FAST_LAUNCH=0  launch through JITFunction.run every time (see _launch.py)
Under the interpreter (TRITON_INTERPRET=1) a single small config is used and TMA is off.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable, NoReturn, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import fast
from .block_mask import cdiv

try:  # host-side TMA descriptors (triton >= 3.4); absent or unusable -> pointer loads only
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the triton build
    TensorDescriptor = None

__all__ = [
    "dsd",
    "sdd",
    "dsd_tn",
    "unsupported_reason",
    "KernelConfig",
    "candidate_configs",
    "kept_lists",
    "tuned_configs",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Pointer offsets inside one matrix are int32 (cheaper address math in the inner loop); the batch
# offset is int64. Leave room for the masked lanes of the last tile, which compute (unused)
# addresses up to one tile past the end.
_MAX_MATRIX_SPAN = 2**31 - 2**24


# Triton reads TRITON_INTERPRET when it decorates this module's kernels (at import), so whether
# they are interpreted is fixed from then on; read it once, at the same moment, not per call.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreting() -> bool:
    """Whether this module's kernels run under Triton's CPU interpreter."""
    return _INTERPRET


# Host-side integer helpers: triton.cdiv / triton.next_power_of_2 are constexpr-function wrappers
# that unwrap every argument per call; block_mask.cdiv and this give the same ints at a fraction
# of the launch-path cost. (tl.cdiv inside @triton.jit code is a different function.)
def _next_pow2(n: int) -> int:
    """Smallest power of two >= n, as triton.next_power_of_2 (0 for n <= 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# =========================================================================== Triton kernels
@triton.jit
def _grouped_tile(tile, grid_r, grid_c, GROUP: tl.constexpr):
    """Tile number -> (row, col) tile, GROUP row tiles at a time, so that programs running at
    the same moment share their row band of the left operand and their column band of the
    right one in L2."""
    width = GROUP * grid_c
    group = tile // width
    first_r = group * GROUP
    size_r = tl.minimum(grid_r - first_r, GROUP)
    in_group = tile % width
    return first_r + in_group % size_r, in_group // size_r


@triton.jit
def _load_tile(ptrs, offs_r, offs_c, R, C, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """Load a 2-D tile, masking only the edges that can be out of range (constexpr flags), so
    interior shapes keep unpredicated, vectorised loads."""
    if MASK_R and MASK_C:
        t = tl.load(ptrs, mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0)
    elif MASK_R:
        t = tl.load(ptrs, mask=offs_r[:, None] < R, other=0.0)
    elif MASK_C:
        t = tl.load(ptrs, mask=offs_c[None, :] < C, other=0.0)
    else:
        t = tl.load(ptrs)
    return t


@triton.jit
def _store_tile(ptrs, value, offs_r, offs_c, R, C, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    if MASK_R and MASK_C:
        tl.store(ptrs, value, mask=(offs_r[:, None] < R) & (offs_c[None, :] < C))
    elif MASK_R:
        tl.store(ptrs, value, mask=offs_r[:, None] < R)
    elif MASK_C:
        tl.store(ptrs, value, mask=offs_c[None, :] < C)
    else:
        tl.store(ptrs, value)


@triton.jit
def _mma(acc, x, y, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's CPU interpreter returns garbage from tl.dot on bf16 operands (and raises on some
    # bf16 scalar arithmetic), so interpreted bf16 tiles are widened to fp32 first. On the GPU
    # UPCAST is False and the dot runs natively on bf16 tensor cores.
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision=PRECISION)


@triton.jit
def _kept_lists_kernel(
    keep_ptr, count_ptr, index_ptr, order_ptr,
    n_lines, line_len, L0, stride_l1, stride_l0, E0, stride_e1, stride_e0,
    CHUNK: tl.constexpr, ORDER: tl.constexpr, ORDER_LINES: tl.constexpr, ORDER_ENTRIES: tl.constexpr,
):
    """One program per line of the mask: count its kept entries and write their numbers, in
    increasing order, to the front of the line's slot in ``index`` (a compaction by prefix sum).

    A line is (l1, l0) = divmod(line, L0); an entry is (e1, e0) = divmod(e, E0); the flag sits at
    keep + l1*stride_l1 + l0*stride_l0 + e1*stride_e1 + e0*stride_e0. This covers row lists,
    per-batch column lists and batch-summed column lists (entries (b, r)) without copies.

    With ORDER, the program also writes its line number to ``order[rank]``, rank being the
    line's place when lines are sorted by kept count, descending, ties by line number (a
    counting sort: rank = #lines with more kept + #earlier lines with as many). A program cannot
    see the others' counts without a grid-wide barrier, so it recounts every line itself: the
    whole mask is read once per line, which the launcher only allows for small masks (a few
    thousand lines; the flags stay in L2). This costs no extra launch and no host sync.
    """
    line = tl.program_id(0)
    base = keep_ptr + (line // L0).to(tl.int64) * stride_l1 + (line % L0).to(tl.int64) * stride_l0
    out = index_ptr + line.to(tl.int64) * line_len
    total = 0
    for start in range(0, line_len, CHUNK):
        e = start + tl.arange(0, CHUNK)
        valid = e < line_len
        flag = tl.load(base + (e // E0) * stride_e1 + (e % E0) * stride_e0, mask=valid, other=0)
        kept = (flag != 0) & valid
        ones = kept.to(tl.int32)
        pos = total + tl.cumsum(ones, 0) - ones
        tl.store(out + pos, e.to(index_ptr.dtype.element_ty), mask=kept)
        total += tl.sum(ones, 0)
    tl.store(count_ptr + line, total)
    if ORDER:
        rank = 0
        for j0 in range(0, n_lines, ORDER_LINES):
            j = j0 + tl.arange(0, ORDER_LINES)
            j_ok = j < n_lines
            j_base = (j // L0).to(tl.int64) * stride_l1 + (j % L0).to(tl.int64) * stride_l0
            c_j = tl.zeros((ORDER_LINES,), dtype=tl.int32)
            for e0 in range(0, line_len, ORDER_ENTRIES):
                e = e0 + tl.arange(0, ORDER_ENTRIES)
                e_off = (e // E0) * stride_e1 + (e % E0) * stride_e0
                f = tl.load(keep_ptr + j_base[:, None] + e_off[None, :], mask=j_ok[:, None] & (e < line_len)[None, :], other=0)
                c_j += tl.sum((f != 0).to(tl.int32), 1)
            before = j_ok & ((c_j > total) | ((c_j == total) & (j < line)))
            rank += tl.sum(before.to(tl.int32), 0)
        tl.store(order_ptr + rank, line)


@triton.jit
def _dsd_kernel(
    a, b, bias_ptr, out_ptr, out_desc, row_count_ptr, row_index_ptr, order_ptr,
    M, N, K, Bb, n_rblk, n_cblk, n_lines,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_bias,
    stride_ob, stride_om, stride_on,
    scale,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr, GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr, MASK_K: tl.constexpr,
    USE_TMA: tl.constexpr, B_K_CONTIG: tl.constexpr, OUT_DESC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BALANCE: tl.constexpr,
):
    """out[bat] = scale * (a[bat] ⊙ m) @ b[bat % Bb] (+ bias); one program per (bat, M tile, N tile).

    With USE_TMA, ``a`` and ``b`` are rank-3 tensor descriptors (zero fill out of range, so no
    masks); otherwise they are pointers with explicit strides (any layout, masked edges).

    BALANCE: a tile costs its row block's kept count, so the programs take the row blocks (of
    all batch entries) in ``order``, most kept blocks first. The hardware hands the next program
    to whichever SM slot frees up first, so this is longest-job-first list scheduling: the last
    wave holds the cheapest tiles and the tail shrinks from "one expensive tile" to "one cheap
    one". Groups of GROUP row tiles still run side by side for L2 reuse.
    """
    grid_m = tl.cdiv(M, TILE_M)
    grid_n = tl.cdiv(N, TILE_N)
    pid = tl.program_id(0)
    if BALANCE:
        # Every row block is given BLOCK_ROWS // TILE_M row tiles, also the ragged last one:
        # its tiles past M (MASK_M is set then) run no iterations and store nothing visible.
        TILES_PER_LINE: tl.constexpr = BLOCK_ROWS // TILE_M
        pid_r, pid_n = _grouped_tile(pid, n_lines * TILES_PER_LINE, grid_n, GROUP)
        line = tl.load(order_ptr + pid_r // TILES_PER_LINE)
        bat = line // n_rblk
        m0 = (line % n_rblk) * BLOCK_ROWS + (pid_r % TILES_PER_LINE) * TILE_M
        count = tl.where(m0 < M, tl.load(row_count_ptr + line), 0)
    else:
        tiles = grid_m * grid_n
        bat = pid // tiles
        pid_m, pid_n = _grouped_tile(pid % tiles, grid_m, grid_n, GROUP)
        m0 = pid_m * TILE_M
        # TILE_M divides BLOCK_ROWS, so the whole tile lies in one row block and shares its list.
        line = bat * n_rblk + m0 // BLOCK_ROWS
        count = tl.load(row_count_ptr + line)
    bat_b = bat % Bb
    n0 = pid_n * TILE_N
    kept_blocks = row_index_ptr + line.to(tl.int64) * n_cblk
    TILES_PER_BLOCK: tl.constexpr = BLOCK_COLS // TILE_K

    offs_m = m0 + tl.arange(0, TILE_M)
    offs_n = n0 + tl.arange(0, TILE_N)
    offs_k = tl.arange(0, TILE_K)
    acc = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
    if USE_TMA:
        for it in range(0, count * TILES_PER_BLOCK):
            k0 = tl.load(kept_blocks + it // TILES_PER_BLOCK).to(tl.int32) * BLOCK_COLS + (it % TILES_PER_BLOCK) * TILE_K
            a_t = a.load([bat, m0, k0]).reshape(TILE_M, TILE_K)
            if B_K_CONTIG:  # b is stored as (N, K) rows, e.g. linear's weight
                b_t = b.load([bat_b, n0, k0]).reshape(TILE_N, TILE_K).T
            else:
                b_t = b.load([bat_b, k0, n0]).reshape(TILE_K, TILE_N)
            acc = _mma(acc, a_t, b_t, PRECISION, False)
    else:
        a_rows = a + bat.to(tl.int64) * stride_ab + offs_m[:, None] * stride_am
        b_cols = b + bat_b.to(tl.int64) * stride_bb + offs_n[None, :] * stride_bn
        for it in range(0, count * TILES_PER_BLOCK):
            k0 = tl.load(kept_blocks + it // TILES_PER_BLOCK).to(tl.int32) * BLOCK_COLS + (it % TILES_PER_BLOCK) * TILE_K
            ks = k0 + offs_k
            a_t = _load_tile(a_rows + ks[None, :] * stride_ak, offs_m, ks, M, K, MASK_M, MASK_K)
            b_t = _load_tile(b_cols + ks[:, None] * stride_bk, ks, offs_n, K, N, MASK_K, MASK_N)
            acc = _mma(acc, a_t, b_t, PRECISION, UPCAST)

    acc = acc * scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=offs_n < N, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    val = acc.to(out_ptr.dtype.element_ty)
    if OUT_DESC:
        out_desc.store([bat, m0, n0], val.reshape(1, TILE_M, TILE_N))
    else:
        ptrs = out_ptr + bat.to(tl.int64) * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        _store_tile(ptrs, val, offs_m, offs_n, M, N, MASK_M, MASK_N)


@triton.jit
def _sdd_tile(
    g, b, out_ptr, out_desc, bat, bat_b, m0, k0, n_iter,
    M, N, K,
    stride_gb, stride_gm, stride_gn,
    stride_bb, stride_bk, stride_bn,
    stride_ob, stride_om, stride_ok,
    scale,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr,
    MASK_M: tl.constexpr, MASK_N: tl.constexpr, MASK_K: tl.constexpr,
    USE_TMA: tl.constexpr, B_K_CONTIG: tl.constexpr, OUT_DESC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One TILE_M x TILE_K output tile of sdd at (bat, m0, k0): n_iter reduction steps over N
    (0 for a dropped block: the tile is stored as zeros)."""
    offs_m = m0 + tl.arange(0, TILE_M)
    offs_k = k0 + tl.arange(0, TILE_K)
    offs_n = tl.arange(0, TILE_N)
    acc = tl.zeros((TILE_M, TILE_K), dtype=tl.float32)
    if USE_TMA:
        for it in range(0, n_iter):
            n_start = it * TILE_N
            g_t = g.load([bat, m0, n_start]).reshape(TILE_M, TILE_N)
            if B_K_CONTIG:  # b stored as (N, K) rows: bᵀ tiles load directly
                bt_t = b.load([bat_b, n_start, k0]).reshape(TILE_N, TILE_K)
            else:
                bt_t = b.load([bat_b, k0, n_start]).reshape(TILE_K, TILE_N).T
            acc = _mma(acc, g_t, bt_t, PRECISION, False)
    else:
        g_rows = g + bat.to(tl.int64) * stride_gb + offs_m[:, None] * stride_gm
        bt_cols = b + bat_b.to(tl.int64) * stride_bb + offs_k[None, :] * stride_bk
        for it in range(0, n_iter):
            ns = it * TILE_N + offs_n
            g_t = _load_tile(g_rows + ns[None, :] * stride_gn, offs_m, ns, M, N, MASK_M, MASK_N)
            bt_t = _load_tile(bt_cols + ns[:, None] * stride_bn, ns, offs_k, N, K, MASK_N, MASK_K)
            acc = _mma(acc, g_t, bt_t, PRECISION, UPCAST)

    val = (acc * scale).to(out_ptr.dtype.element_ty)
    if OUT_DESC:
        out_desc.store([bat, m0, k0], val.reshape(1, TILE_M, TILE_K))
    else:
        ptrs = out_ptr + bat.to(tl.int64) * stride_ob + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok
        _store_tile(ptrs, val, offs_m, offs_k, M, K, MASK_M, MASK_K)


@triton.jit
def _sdd_kept_unit(u, count_ptr, index_ptr, n_lines, n_rblk, n_cblk,
                   BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, TILE_M: tl.constexpr, TILE_K: tl.constexpr,
                   LINES: tl.constexpr):
    """Kept unit u (in row-major order of the kept blocks, TILES_PER_BLOCK tiles each) ->
    (bat, m0, k0). The kept block number is found in the per-row-block lists: a prefix sum of
    the line counts (recomputed here, so nothing stays live across the caller's loop) tells
    which line it is in."""
    TPB_M: tl.constexpr = BLOCK_ROWS // TILE_M
    TPB_K: tl.constexpr = BLOCK_COLS // TILE_K
    kb = u // (TPB_M * TPB_K)
    sub = u % (TPB_M * TPB_K)
    lanes = tl.arange(0, LINES)
    cnt = tl.load(count_ptr + lanes, mask=lanes < n_lines, other=0)
    ends = tl.cumsum(cnt, 0)
    line = tl.sum((ends <= kb).to(tl.int32), 0)
    start = tl.sum(tl.where(lanes == line, ends - cnt, 0), 0)
    c = tl.load(index_ptr + line.to(tl.int64) * n_cblk + (kb - start)).to(tl.int32)
    bat = line // n_rblk
    m0 = (line % n_rblk) * BLOCK_ROWS + (sub // TPB_K) * TILE_M
    k0 = c * BLOCK_COLS + (sub % TPB_K) * TILE_K
    return bat, m0, k0


@triton.jit
def _sdd_kernel(
    g, b, out_ptr, out_desc, keep_ptr, b_half, out_half_desc, count_ptr, index_ptr,
    M, N, K, Bb, n_rblk, n_cblk, n_lines,
    stride_gb, stride_gm, stride_gn,
    stride_bb, stride_bk, stride_bn,
    stride_ob, stride_om, stride_ok,
    stride_keep_b, stride_keep_r, stride_keep_c,
    scale,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr, GROUP: tl.constexpr,
    MASK_M: tl.constexpr, MASK_N: tl.constexpr, MASK_K: tl.constexpr,
    USE_TMA: tl.constexpr, B_K_CONTIG: tl.constexpr, OUT_DESC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    PERSISTENT: tl.constexpr, SPLIT_TAIL: tl.constexpr, LINES: tl.constexpr,
):
    """out[bat] = scale * (g[bat] @ b[bat % Bb]ᵀ) ⊙ m.

    Not PERSISTENT: one program per (bat, M tile, K tile). A tile lies inside one mask block. A
    dropped block gets a zero trip count, so its programs skip every load and store zeros: the
    output needs no separate zero fill.

    PERSISTENT (grid = the number of CTAs that fit on the GPU at once, S): every kept tile costs
    the same full reduction over N, so what matters is how many of them each slot runs. The S
    programs deal the kept tiles out round-robin (kept-first order, row-major over the kept
    blocks, so tiles running side by side share g rows and b columns in L2): F = kept // S full
    rounds, then R = kept % S tiles left. Those R would take a whole tile time on R slots while
    S - R idle; with SPLIT_TAIL and 2R <= S each is cut into two TILE_M x TILE_K/2 halves (own
    output columns, no reduction across programs, no atomics) run by 2R programs. Then each
    program stores zeros into its share of the dropped tiles (cheap, and overlapping the other
    programs' matmuls).
    """
    if PERSISTENT:
        pid = tl.program_id(0)
        S = tl.num_programs(0)
        TPB: tl.constexpr = (BLOCK_ROWS // TILE_M) * (BLOCK_COLS // TILE_K)
        lanes = tl.arange(0, LINES)
        kept = tl.sum(tl.load(count_ptr + lanes, mask=lanes < n_lines, other=0), 0) * TPB
        rounds = kept // S
        rest = kept - rounds * S
        n_full = tl.cdiv(N, TILE_N)
        for i in range(0, rounds):
            bat, m0, k0 = _sdd_kept_unit(pid + i * S, count_ptr, index_ptr, n_lines, n_rblk, n_cblk,
                                         BLOCK_ROWS, BLOCK_COLS, TILE_M, TILE_K, LINES)
            # Tiles of a ragged last block that lie wholly past M or K: nothing to compute.
            n_iter = tl.where((m0 < M) & (k0 < K), n_full, 0)
            _sdd_tile(g, b, out_ptr, out_desc, bat, bat % Bb, m0, k0, n_iter, M, N, K,
                      stride_gb, stride_gm, stride_gn, stride_bb, stride_bk, stride_bn, stride_ob, stride_om, stride_ok,
                      scale, TILE_M, TILE_N, TILE_K, MASK_M, MASK_N, MASK_K, USE_TMA, B_K_CONTIG, False, PRECISION, UPCAST)
        split = False
        if SPLIT_TAIL:
            split = 2 * rest <= S
        if split:
            if pid < 2 * rest:
                bat, m0, k0 = _sdd_kept_unit(rounds * S + pid // 2, count_ptr, index_ptr, n_lines, n_rblk, n_cblk,
                                             BLOCK_ROWS, BLOCK_COLS, TILE_M, TILE_K, LINES)
                k0 = k0 + (pid % 2) * (TILE_K // 2)
                n_iter = tl.where((m0 < M) & (k0 < K), n_full, 0)
                _sdd_tile(g, b_half, out_ptr, out_half_desc, bat, bat % Bb, m0, k0, n_iter, M, N, K,
                          stride_gb, stride_gm, stride_gn, stride_bb, stride_bk, stride_bn, stride_ob, stride_om, stride_ok,
                          scale, TILE_M, TILE_N, TILE_K // 2, MASK_M, MASK_N, MASK_K, USE_TMA, B_K_CONTIG, False,
                          PRECISION, UPCAST)
        else:
            if pid < rest:
                bat, m0, k0 = _sdd_kept_unit(rounds * S + pid, count_ptr, index_ptr, n_lines, n_rblk, n_cblk,
                                             BLOCK_ROWS, BLOCK_COLS, TILE_M, TILE_K, LINES)
                n_iter = tl.where((m0 < M) & (k0 < K), n_full, 0)
                _sdd_tile(g, b, out_ptr, out_desc, bat, bat % Bb, m0, k0, n_iter, M, N, K,
                          stride_gb, stride_gm, stride_gn, stride_bb, stride_bk, stride_bn, stride_ob, stride_om, stride_ok,
                          scale, TILE_M, TILE_N, TILE_K, MASK_M, MASK_N, MASK_K, USE_TMA, B_K_CONTIG, False,
                          PRECISION, UPCAST)
        # Dropped tiles, in plain grid order (a flag read each; the kept ones are skipped).
        grid_m = tl.cdiv(M, TILE_M)
        grid_k = tl.cdiv(K, TILE_K)
        for t in range(pid, (n_lines // n_rblk) * grid_m * grid_k, S):
            bat = t // (grid_m * grid_k)
            m0 = (t // grid_k) % grid_m * TILE_M
            k0 = t % grid_k * TILE_K
            flag = tl.load(keep_ptr + bat.to(tl.int64) * stride_keep_b + (m0 // BLOCK_ROWS) * stride_keep_r
                           + (k0 // BLOCK_COLS) * stride_keep_c)
            if flag == 0:
                _sdd_tile(g, b, out_ptr, out_desc, bat, bat % Bb, m0, k0, 0, M, N, K,
                          stride_gb, stride_gm, stride_gn, stride_bb, stride_bk, stride_bn, stride_ob, stride_om, stride_ok,
                          scale, TILE_M, TILE_N, TILE_K, MASK_M, MASK_N, MASK_K, USE_TMA, B_K_CONTIG, False,
                          PRECISION, UPCAST)
    else:
        grid_m = tl.cdiv(M, TILE_M)
        grid_k = tl.cdiv(K, TILE_K)
        tiles = grid_m * grid_k
        pid = tl.program_id(0)
        bat = pid // tiles
        pid_m, pid_k = _grouped_tile(pid % tiles, grid_m, grid_k, GROUP)
        m0 = pid_m * TILE_M
        k0 = pid_k * TILE_K
        flag = tl.load(
            keep_ptr + bat.to(tl.int64) * stride_keep_b + (m0 // BLOCK_ROWS) * stride_keep_r + (k0 // BLOCK_COLS) * stride_keep_c
        )
        n_iter = tl.where(flag != 0, tl.cdiv(N, TILE_N), 0)
        _sdd_tile(g, b, out_ptr, out_desc, bat, bat % Bb, m0, k0, n_iter, M, N, K,
                  stride_gb, stride_gm, stride_gn, stride_bb, stride_bk, stride_bn, stride_ob, stride_om, stride_ok,
                  scale, TILE_M, TILE_N, TILE_K, MASK_M, MASK_N, MASK_K, USE_TMA, B_K_CONTIG, OUT_DESC, PRECISION, UPCAST)


@triton.jit
def _dsd_tn_kernel(
    a, g, out_ptr, out_desc, col_count_ptr, col_index_ptr, order_ptr,
    M, N, K, n_rblk, n_cblk, list_len, n_lines,
    stride_ab, stride_am, stride_ak,
    stride_gb, stride_gm, stride_gn,
    stride_ob, stride_ok, stride_on,
    scale,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr, GROUP: tl.constexpr,
    MASK_M: tl.constexpr, MASK_N: tl.constexpr, MASK_K: tl.constexpr,
    USE_TMA: tl.constexpr, OUT_DESC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BALANCE: tl.constexpr,
):
    """out[ob] = scale * Σ (a[bat] ⊙ m)ᵀ @ g[bat]; one program per (ob, K tile, N tile).

    The list of the tile's column block holds entries e = (bat - ob) * n_rblk + row_block: for a
    batched output only this batch entry's row blocks, for a summed one every (bat, row block)
    pair, so summing over the batch is the same single flat loop.

    BALANCE: column blocks (lines) in ``order``, most kept row blocks first, as in _dsd_kernel.
    """
    grid_k = tl.cdiv(K, TILE_K)
    grid_n = tl.cdiv(N, TILE_N)
    pid = tl.program_id(0)
    if BALANCE:
        TILES_PER_LINE: tl.constexpr = BLOCK_COLS // TILE_K
        pid_k, pid_n = _grouped_tile(pid, n_lines * TILES_PER_LINE, grid_n, GROUP)
        line = tl.load(order_ptr + pid_k // TILES_PER_LINE)
        ob = line // n_cblk
        k0 = (line % n_cblk) * BLOCK_COLS + (pid_k % TILES_PER_LINE) * TILE_K
        count = tl.where(k0 < K, tl.load(col_count_ptr + line), 0)
    else:
        tiles = grid_k * grid_n
        ob = pid // tiles
        pid_k, pid_n = _grouped_tile(pid % tiles, grid_k, grid_n, GROUP)
        k0 = pid_k * TILE_K
        line = ob * n_cblk + k0 // BLOCK_COLS
        count = tl.load(col_count_ptr + line)
    n0 = pid_n * TILE_N
    entries = col_index_ptr + line.to(tl.int64) * list_len
    TILES_PER_BLOCK: tl.constexpr = BLOCK_ROWS // TILE_M

    offs_k = k0 + tl.arange(0, TILE_K)
    offs_n = n0 + tl.arange(0, TILE_N)
    offs_m = tl.arange(0, TILE_M)
    acc = tl.zeros((TILE_K, TILE_N), dtype=tl.float32)
    if USE_TMA:
        for it in range(0, count * TILES_PER_BLOCK):
            e = tl.load(entries + it // TILES_PER_BLOCK).to(tl.int32)
            bat = ob + e // n_rblk
            m_start = (e % n_rblk) * BLOCK_ROWS + (it % TILES_PER_BLOCK) * TILE_M
            a_t = a.load([bat, m_start, k0]).reshape(TILE_M, TILE_K)
            g_t = g.load([bat, m_start, n0]).reshape(TILE_M, TILE_N)
            acc = _mma(acc, a_t.T, g_t, PRECISION, False)
    else:
        a_cols = a + offs_k[None, :] * stride_ak
        g_cols = g + offs_n[None, :] * stride_gn
        for it in range(0, count * TILES_PER_BLOCK):
            e = tl.load(entries + it // TILES_PER_BLOCK).to(tl.int32)
            bat = (ob + e // n_rblk).to(tl.int64)
            ms = (e % n_rblk) * BLOCK_ROWS + (it % TILES_PER_BLOCK) * TILE_M + offs_m
            a_t = _load_tile(a_cols + bat * stride_ab + ms[:, None] * stride_am, ms, offs_k, M, K, MASK_M, MASK_K)
            g_t = _load_tile(g_cols + bat * stride_gb + ms[:, None] * stride_gm, ms, offs_n, M, N, MASK_M, MASK_N)
            acc = _mma(acc, tl.trans(a_t), g_t, PRECISION, UPCAST)

    val = (acc * scale).to(out_ptr.dtype.element_ty)
    if OUT_DESC:
        out_desc.store([ob, k0, n0], val.reshape(1, TILE_K, TILE_N))
    else:
        ptrs = out_ptr + ob.to(tl.int64) * stride_ob + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on
        _store_tile(ptrs, val, offs_k, offs_n, K, N, MASK_K, MASK_N)


# =========================================================================== configs
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. Tile names follow the problem's dims in every kernel:
    tile_m runs along M (the activation's rows), tile_n along N, tile_k along K (the
    activation's columns). So tile_m must divide the mask block's rows and tile_k its columns.

        dsd    output tile tile_m x tile_n, reduction step tile_k
        sdd    output tile tile_m x tile_k, reduction step tile_n
        dsd_tn output tile tile_k x tile_n, reduction step tile_m
    """

    tile_m: int
    tile_n: int
    tile_k: int
    stages: int
    warps: int
    group: int = 8
    tma: bool = False
    # Work-balanced schedule (see the kernels' docstrings): sdd runs persistent, one program per
    # CTA slot of the GPU, dealing out the kept tiles evenly and splitting the last partial
    # round; dsd and dsd_tn launch their tiles most-kept-blocks-first. Off: grid order.
    balance: bool = False

    def __str__(self) -> str:
        return (
            f"m{self.tile_m}n{self.tile_n}k{self.tile_k}_s{self.stages}w{self.warps}g{self.group}"
            + ("_tma" if self.tma else "_ptr")
            + ("_bal" if self.balance else "")
        )


# Ordered best-first by expectation on H100/H200 for bf16 at ~4k sizes; the first one that fits
# is used without timing when tuning is off or a CUDA graph is being captured. Kept short so the
# first training step compiles few variants (report 3.3: forward and backward tiles differ).
# A 128 x 128 output tile with 3 stages (96 KB of shared memory, ~154 registers a thread) lets two
# CTAs share an SM, so one's epilogue and pipeline fill hide under the other's main loop; the
# 128 x 256 tiles reuse more per byte loaded but run one CTA per SM.
_BASE_CONFIGS_16 = {
    # out M x N, reduce K over the kept column blocks
    "dsd": [
        (128, 128, 64, 3, 4),
        (128, 256, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 256, 64, 4, 8),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ],
    # out M x K (inside one mask block), reduce N densely
    "sdd": [
        (128, 64, 128, 3, 4),
        (128, 64, 128, 4, 8),
        (128, 64, 128, 4, 4),
        (128, 128, 128, 3, 8),
        (64, 64, 128, 4, 4),
        (128, 64, 64, 4, 4),
    ],
    # out K x N, reduce M over the kept row blocks
    "dsd_tn": [
        (64, 128, 128, 3, 4),
        (64, 256, 128, 3, 8),
        (64, 128, 128, 4, 4),
        (64, 256, 128, 4, 8),
        (64, 64, 128, 4, 4),
        (64, 128, 64, 4, 4),
    ],
}
# fp32 tiles take twice the shared memory per element: shorter reduction steps, fewer stages.
_BASE_CONFIGS_32 = {
    "dsd": [(128, 128, 32, 3, 8), (64, 128, 32, 3, 4), (64, 64, 32, 3, 4)],
    "sdd": [(128, 32, 128, 3, 8), (64, 32, 64, 3, 4), (64, 32, 128, 3, 4)],
    "dsd_tn": [(32, 128, 128, 3, 8), (32, 64, 64, 3, 4), (32, 128, 64, 3, 4)],
}
_MAX_CANDIDATES = 8


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides n and is <= cap (n is a multiple of 16 here)."""
    d = 16
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def _fit_dim(extent: int, tile: int, floor: int = 16) -> int:
    """Shrink a tile toward a small extent: no point in a 256-wide tile over 45 columns."""
    return max(floor, min(tile, _next_pow2(max(extent, 1))))


def candidate_configs(kind: str, M: int, N: int, K: int, block: tuple[int, int], dtype: torch.dtype, tma: bool = False) -> list[KernelConfig]:
    """The short, shape-pruned config list for one kernel and problem, best guess first.

    Tiles are clamped so tile_m divides the block rows and tile_k the block columns, and shrunk
    toward small problem extents; duplicates are dropped.
    """
    if kind not in _BASE_CONFIGS_16:
        raise ValueError(f"candidate_configs: kind={kind!r}, expected one of {sorted(_BASE_CONFIGS_16)}")
    br, bc = block
    if _interpreting():
        # The interpreter runs numpy per program: one small config keeps the tests fast.
        return [KernelConfig(_pow2_divisor(br, 32), _fit_dim(N, 32), _pow2_divisor(bc, 32), 1, 4, 4, False)]
    base = (_BASE_CONFIGS_32 if dtype == torch.float32 else _BASE_CONFIGS_16)[kind]
    out_rows, out_cols = {"dsd": (M, N), "sdd": (M, K), "dsd_tn": (K, N)}[kind]
    # With at least ~2 waves of 128 x 128 output tiles, smaller tiles only lose reuse.
    big = cdiv(out_rows, 128) * cdiv(out_cols, 128) >= 256
    out: list[tuple[KernelConfig, int]] = []
    for tm, tn, tk, stages, warps in base:
        tm = min(_pow2_divisor(br, tm), _fit_dim(M, tm))
        tk = min(_pow2_divisor(bc, tk), _fit_dim(K, tk))
        tn = _fit_dim(N, tn)
        # Two warpgroups only pay on a 128 x 128 output tile or larger (each wgmma takes 64 rows).
        out_tile = {"dsd": tm * tn, "sdd": tm * tk, "dsd_tn": tk * tn}[kind]
        if out_tile < 128 * 128 and warps > 4:
            warps = 4
        cfg = KernelConfig(tm, tn, tk, stages, warps, 8, tma)
        if all(cfg != c for c, _ in out):
            out.append((cfg, out_tile))
    large = [c for c, area in out if area >= 128 * 128]
    out = large if big and large else [c for c, _ in out]
    if tma:
        # TMA usually wins on Hopper, but time the two best pointer variants against it too.
        out = out[: _MAX_CANDIDATES - 4] + [dataclasses.replace(c, tma=False) for c in out[:2]]
    # The work-balanced schedule of the two best tilings goes first: at p = 0 it should cost
    # about what grid order does, with dropped blocks it is what makes time scale with (1 - p)
    # (the tuner also prefers it on near ties; see _Tuner.pick).
    out = [dataclasses.replace(c, balance=True) for c in out[:2]] + out
    return out[:_MAX_CANDIDATES]


# =========================================================================== tuning
class _Tuner:
    """Picks and caches one config per problem key by timing the candidates once.

    Why not triton.autotune: the candidates depend on the mask block and on whether TMA
    descriptors can be built for these operands (host objects made per config), and tuning must
    be skipped, not crash, while a CUDA graph is being captured.
    """

    def __init__(self) -> None:
        self.best: dict[tuple, KernelConfig] = {}
        self.timings: dict[tuple, list[tuple[KernelConfig, float | str]]] = {}

    def pick(self, key: tuple, candidates: Sequence[KernelConfig], launch: Callable[[KernelConfig], None]) -> tuple[KernelConfig, bool]:
        """The config for ``key`` and whether ``launch`` has already run with it (so the output
        is written and the caller need not launch again)."""
        cfg = self.best.get(key)
        if cfg is not None:
            return cfg, False
        if len(candidates) == 1 or _interpreting() or os.environ.get("SPARSEDROP_AUTOTUNE", "1") == "0":
            return self._first_that_runs(key, candidates, launch), True
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # Timing would synchronise inside the capture; use the heuristic choice for now and
            # tune on the next uncaptured call.
            return candidates[0], False
        results: list[tuple[KernelConfig, float | str]] = []
        for c in candidates:
            try:
                launch(c)  # compile outside the timed region
                ms = triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=20, return_mode="median")
                results.append((c, ms))
            except Exception as err:  # a config that does not compile or fit is skipped
                results.append((c, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
        self.timings[key] = results
        timed = [(ms, i) for i, (_, ms) in enumerate(results) if isinstance(ms, float)]
        if not timed:
            raise RuntimeError(
                f"sparsedrop: no kernel config could run for {key}: "
                + "; ".join(f"{c}: {r}" for c, r in results)
                + ". Set SPARSEDROP_TMA=0 to rule out TMA descriptors, or use kernel='reference'."
            )
        # Tuning runs once, on whatever mask the first call brings (often p = 0, where every
        # tile costs the same and grid order loses nothing), but the choice is kept for all
        # later masks, where the balanced schedule is the one that scales. So a balanced config
        # within _BALANCE_TIE of the fastest is taken instead of it.
        fastest = min(timed)[0]
        balanced = [(ms, i) for ms, i in timed if candidates[i].balance and ms <= fastest * (1 + _BALANCE_TIE)]
        best = candidates[min(balanced or timed)[1]]
        self.best[key] = best
        return best, False  # the last launch was the last candidate, not necessarily the best

    def _first_that_runs(self, key, candidates, launch):
        """Untimed choice: the first candidate that compiles and launches (e.g. the first may
        not fit a GPU with less shared memory)."""
        errors = []
        for c in candidates:
            try:
                launch(c)
            except Exception as err:
                errors.append(f"{c}: {type(err).__name__}: {err}")
                continue
            self.best[key] = c
            return c
        raise RuntimeError(f"sparsedrop: no kernel config could run for {key}: " + "; ".join(errors))


_TUNER = _Tuner()
_BALANCE_TIE = 0.03


def tuned_configs() -> dict[tuple, KernelConfig]:
    """The configs chosen so far in this process, by problem key (for logs and benchmarks)."""
    return dict(_TUNER.best)


# =========================================================================== host helpers
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
    elif not (device.type == "cpu" and _interpreting()):
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


def _fail(name: str, msg: str) -> NoReturn:
    """Raise a launcher's input error. Callers test the condition first and format ``msg`` only
    when it fails: formatting every message on every call cost more than the checks."""
    raise ValueError(f"sparsedrop {name}: {msg}")


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
    if not (keep.dtype == torch.bool and tuple(keep.shape) == expected):
        _fail(name, f"keep must be a bool tensor of shape {expected}, got {keep.dtype} {tuple(keep.shape)}")
    if keep.device != x.device:
        _fail(name, f"keep is on {keep.device}, operands on {x.device}")


def _precision(dtype: torch.dtype) -> str:
    """Follow torch's fp32 matmul setting: 'highest' (the default) means IEEE fp32."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _tma_enabled(device: torch.device) -> bool:
    if TensorDescriptor is None or _interpreting() or device.type != "cuda":
        return False
    if os.environ.get("SPARSEDROP_TMA", "1") == "0" or _TMA_BROKEN:
        return False
    return _capability(device)[0] >= 9


_CAPABILITY: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    """torch.cuda.get_device_capability, cached per device index (it cannot change)."""
    index = _cuda_index(device)
    cap = _CAPABILITY.get(index)
    if cap is None:
        cap = _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return cap


def _cuda_index(device: torch.device) -> int:
    """The device's index; the current device for a bare torch.device("cuda")."""
    return device.index if device.index is not None else torch.cuda.current_device()


_TMA_BROKEN = False


def _tma_view_ok(t: Tensor) -> bool:
    """Can a rank-3 TMA descriptor cover this (B, R, C) view? 16-byte aligned base and strides,
    unit last stride, 16-bit dtype (fp32 stays on pointer loads: not the speed path)."""
    if t.dtype not in (torch.float16, torch.bfloat16) or t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    es = t.element_size()
    # Broadcast (stride 0) dims are left to the pointer path: TMA wants real, aligned strides.
    return all(st > 0 and st * es % 16 == 0 for s, st in zip(t.shape[:-1], t.stride()[:-1]) if s > 1)


def _desc3(t: Tensor, block_shape: list[int]):
    """Rank-3 descriptor over a (B, R, C) view; a size-1 dim's stride is never used by the
    hardware but must still be 16-byte aligned, so give it the packed value."""
    shape = list(t.shape)
    strides = list(t.stride())
    es = t.element_size()
    if shape[1] == 1:
        strides[1] = cdiv(shape[2] * es, 16) * 16 // es
    if shape[0] == 1:
        strides[0] = shape[1] * strides[1]
    return TensorDescriptor(t, shape, strides, block_shape)


def _masks(M: int, N: int, K: int, cfg: KernelConfig, block) -> dict:
    """Which edges need masked loads. M and K edges must also cover whole tiles past the end
    inside the last (ragged) mask block, hence the block-size test."""
    return dict(
        MASK_M=M % block[0] != 0 or M % cfg.tile_m != 0,
        MASK_N=N % cfg.tile_n != 0,
        MASK_K=K % block[1] != 0 or K % cfg.tile_k != 0,
    )


def _device_guard(t: Tensor):
    """Make t's GPU the current device for a launch (Triton launches on the current one).
    Nothing to do, and no context switch, on CPU or when it already is (the usual case)."""
    device = t.device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NULL_CTX


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL_CTX = _NullCtx()  # stateless, so one instance serves every launch


def _launch_with_tma_fallback(launch: Callable[[KernelConfig], None], cfg: KernelConfig) -> None:
    """Run a config; if a TMA variant fails on this triton build, switch TMA off for the process
    and rerun the same tiles with pointer loads (a slower kernel beats a crashed step)."""
    if cfg.tma and _TMA_BROKEN:
        launch(dataclasses.replace(cfg, tma=False))
        return
    try:
        launch(cfg)
    except Exception as err:
        if not cfg.tma:
            raise
        _disable_tma(f"TMA kernel {cfg} failed ({type(err).__name__}: {err})")
        launch(dataclasses.replace(cfg, tma=False))


def _disable_tma(why: str) -> None:
    global _TMA_BROKEN
    if not _TMA_BROKEN:
        warnings.warn(f"sparsedrop: {why}; using pointer loads from now on (SPARSEDROP_TMA=0 silences this)")
    _TMA_BROKEN = True


def _run(kind: str, key: tuple, M: int, N: int, K: int, block, dtype, tma_ok: bool, launch, config: KernelConfig | None) -> KernelConfig:
    if config is not None:
        if not (config.tile_m > 0 and block[0] % config.tile_m == 0 and block[1] % config.tile_k == 0):
            _fail(kind, f"config {config} must have tile_m dividing block rows {block[0]} and tile_k dividing block cols {block[1]}")
        if config.tma and not tma_ok:
            _fail(kind, f"config {config} asks for TMA but these operands/device cannot use it")
        launch(config)
        return config
    # The usual call finds its config cached: the candidate list is only built to tune.
    cfg = _TUNER.best.get(key)
    launched = False
    if cfg is None:
        cands = candidate_configs(kind, M, N, K, block, dtype, tma=tma_ok)
        try:
            cfg, launched = _TUNER.pick(key, cands, launch)
        except RuntimeError as err:
            if not tma_ok:
                raise
            _disable_tma(f"no TMA config of {kind} could run ({err})")
            cands = [dataclasses.replace(c, tma=False) for c in cands]
            cfg, launched = _TUNER.pick(key + ("no_tma",), cands, launch)
    if not launched:
        _launch_with_tma_fallback(launch, cfg)
    return cfg


# =========================================================================== persistent grids
# A persistent kernel must not launch more programs than fit on the GPU at once, or the extra
# ones run as a second wave after everything else. How many CTAs fit per SM is read off the
# compiled binary (shared memory and registers) once the config has been launched; before that
# (its first launch, which the tuner does untimed) an estimate from the tile sizes is used.
_OCCUPANCY: dict[tuple, int] = {}
# Under the interpreter a "GPU" of a few slots, so tests cover several rounds and a split tail.
_INTERPRETER_PROGRAMS = 3


_SM_RESOURCES: dict[int, tuple[int, int, int]] = {}


def _sm_resources(device: torch.device) -> tuple[int, int, int]:
    """(SMs, shared memory and registers per SM) of a GPU, cached per device index."""
    index = _cuda_index(device)
    res = _SM_RESOURCES.get(index)
    if res is None:
        props = torch.cuda.get_device_properties(index)
        smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
        regs = getattr(props, "regs_per_multiprocessor", 65536)
        res = _SM_RESOURCES[index] = (props.multi_processor_count, smem, regs)
    return res


def _persistent_programs(device: torch.device, occ_key: tuple, cfg: KernelConfig, elem_size: int) -> int:
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    sms, smem, regs = _sm_resources(device)
    per_sm = _OCCUPANCY.get(occ_key)
    if per_sm is None:
        # sdd's pipeline buffers (g and b tiles per stage) plus a TMA epilogue tile; ~168
        # registers a thread for a 128 x 128 fp32 accumulator over 4 warps.
        tile_bytes = (cfg.tile_m * cfg.tile_n + cfg.tile_n * cfg.tile_k) * elem_size
        shared = cfg.stages * tile_bytes + (cfg.tile_m * cfg.tile_k * elem_size if cfg.tma else 0)
        per_sm = max(1, min(smem // (shared + 1024), regs // (cfg.warps * 32 * 168)))
    return sms * per_sm


def _record_occupancy(device: torch.device, occ_key: tuple, compiled, cfg: KernelConfig) -> None:
    if device.type != "cuda" or occ_key in _OCCUPANCY:
        return
    try:
        shared = int(compiled.metadata.shared)
        n_regs = int(compiled.n_regs)
    except Exception:  # pragma: no cover - a triton without these attributes keeps the estimate
        return
    _, smem, regs = _sm_resources(device)
    threads = cfg.warps * 32
    # Registers are allocated per warp in units of 256 (8 per thread, rounded up).
    reg_per_cta = cfg.warps * ((n_regs * 32 + 255) // 256 * 256)
    per_sm = min(smem // (shared + 1024), regs // max(reg_per_cta, 1), 2048 // threads, 32)
    _OCCUPANCY[occ_key] = max(1, per_sm)


# =========================================================================== kept lists
def kept_lists(keep: Tensor, by: str, order: bool = False):
    """Per-line lists of kept blocks, built on the device in one launch (no host sync).

    by="row":      lines (b, r), entries c       -> counts (B*nR,), index (B*nR, nC)
    by="col":      lines (b, c), entries r       -> counts (B*nC,), index (B*nC, nR)
    by="col_sum":  lines c, entries b*nR + r     -> counts (nC,),   index (nC, B*nR)
    Entries are in increasing order; index[l, counts[l]:] is left unwritten. The index is int16
    when entries fit (see below), else int32.

    With ``order=True`` returns (counts, index, order): order (int32, n_lines) lists the lines
    by kept count, descending (ties by line number), computed in the same launch; order is None
    when the mask is too large for that (see _ORDER_MAX_FLAG_READS).
    """
    B, nR, nC = keep.shape
    flags = keep.view(torch.uint8) if keep.dtype == torch.bool else keep
    sb, sr, sc = flags.stride()
    if by == "row":
        n_lines, line_len, L0, sl1, sl0, E0, se1, se0 = B * nR, nC, nR, sb, sr, nC, 0, sc
    elif by == "col":
        n_lines, line_len, L0, sl1, sl0, E0, se1, se0 = B * nC, nR, nC, sb, sc, nR, 0, sr
    elif by == "col_sum":
        n_lines, line_len, L0, sl1, sl0, E0, se1, se0 = nC, B * nR, nC, 0, sc, nR, sb, sr
    else:
        raise ValueError(f"kept_lists: by={by!r}, expected 'row', 'col' or 'col_sum'")
    device = keep.device
    counts = torch.empty(n_lines, dtype=torch.int32, device=device)
    with_order = order and n_lines > 0 and line_len > 0 and n_lines * n_lines * line_len <= _ORDER_MAX_FLAG_READS
    order_t = torch.empty(n_lines, dtype=torch.int32, device=device) if with_order else None
    # int16 entries on purpose: Triton's pipeliner skips loads narrower than 32 bits, so the
    # index load stays a plain (L1-hit) load issued with the tile loads it feeds. An int32 index
    # would be pipelined as a load of its own and split the stages between the two levels of
    # indirection, leaving the tile loads only one iteration ahead (2 smem buffers, not 3-4).
    index_dtype = torch.int16 if line_len <= 2**15 - 1 else torch.int32
    index = torch.empty((n_lines, line_len), dtype=index_dtype, device=device)
    if n_lines > 0 and line_len == 0:
        counts.zero_()
    elif n_lines > 0:
        # Entries per step, for the compaction and the ranking alike: the line length rounded
        # up to a power of two, 16 to 1024.
        chunk = min(max(_next_pow2(line_len), 16), 1024)
        order_lines = max(1, min(_next_pow2(n_lines), 4096 // chunk))
        with _device_guard(keep):
            fast(_kept_lists_kernel)[(n_lines,)](
                flags, counts, index, order_t if with_order else counts,
                n_lines, line_len, max(L0, 1), sl1, sl0, max(E0, 1), se1, se0,
                CHUNK=chunk, ORDER=with_order, ORDER_LINES=order_lines, ORDER_ENTRIES=chunk, num_warps=4,
            )
    return (counts, index, order_t) if order else (counts, index)


# Each program of the lists kernel reads the whole mask once more to rank its line, so the
# ranking is only done while n_lines * (total flags) stays small: 2**25 byte reads, e.g. 1024
# lines of 32 blocks (a 4096-row attention batch) or 4096 lines of 2 blocks. Larger masks have
# many waves of tiles, where the tail the ordering shortens matters little.
_ORDER_MAX_FLAG_READS = 2**25
# The persistent sdd sums the row-block counts in one vector (constexpr LINES lanes).
_SDD_MAX_LINES = 4096


# =========================================================================== launchers
def dsd(a: Tensor, b: Tensor, keep: Tensor, scale: float, block: tuple[int, int], bias: Tensor | None = None,
        *, out: Tensor | None = None, config: KernelConfig | None = None, _supported: bool = False) -> Tensor:
    """out (B, M, N) = scale * (a ⊙ m) @ b (+ bias); a (B, M, K), b (Bb, K, N) with Bb in {1, B}.

    ``_supported=True``: the caller has found ``unsupported_reason((a, b), block)`` to be None
    (the registered ops do, to choose the kernel), so the launcher does not run it again.
    """
    _check_common("dsd", a, b, keep, block, a.shape[1], a.shape[2], _supported)
    B, M, K = a.shape
    Bb, Kb, N = b.shape
    if not (Kb == K and Bb in (1, B)):
        _fail("dsd", f"b must be (1 or {B}, {K}, N), got {tuple(b.shape)} for a {tuple(a.shape)}")
    if bias is not None and not (bias.shape == (N,) and bias.dtype == a.dtype and bias.device == a.device):
        _fail("dsd", f"bias must be a {a.dtype} vector of {N} on {a.device}, got {bias.dtype} {tuple(bias.shape)}")
    out = _output(out, (B, M, N), a, "dsd")
    if out.numel() == 0:
        return out
    if K == 0:
        return out.copy_((bias if bias is not None else out.new_zeros(())).expand(B, M, N))
    br, bc = block
    counts, index, order = kept_lists(keep, "row", order=True)
    n_rblk = cdiv(M, br)
    tma_ok = _tma_enabled(a.device) and _tma_view_ok(a) and _tma_view_ok(_b_tma_view(b)) and _tma_view_ok(out)
    b_k_contig = b.stride(1) == 1 and b.stride(2) != 1
    upcast = _interpreting() and a.dtype == torch.bfloat16
    precision = _precision(a.dtype)

    def launch(cfg: KernelConfig) -> None:
        if cfg.tma:
            a_arg = _desc3(a, [1, cfg.tile_m, cfg.tile_k])
            bv = _b_tma_view(b)
            b_arg = _desc3(bv, [1, cfg.tile_n, cfg.tile_k] if b_k_contig else [1, cfg.tile_k, cfg.tile_n])
            o_desc = _desc3(out, [1, cfg.tile_m, cfg.tile_n])
        else:
            a_arg, b_arg, o_desc = a, b, None
        balance = cfg.balance and order is not None
        if balance:  # every row block gets br // tile_m row tiles (see _dsd_kernel)
            grid = (B * n_rblk * (br // cfg.tile_m) * cdiv(N, cfg.tile_n),)
        else:
            grid = (B * cdiv(M, cfg.tile_m) * cdiv(N, cfg.tile_n),)
        with _device_guard(a):
            fast(_dsd_kernel)[grid](
                a_arg, b_arg, bias if bias is not None else out, out, o_desc, counts, index,
                order if balance else counts,
                M, N, K, Bb, n_rblk, cdiv(K, bc), B * n_rblk,
                *a.stride(), *b.stride(), bias.stride(0) if bias is not None else 0, *out.stride(),
                float(scale),
                BLOCK_ROWS=br, BLOCK_COLS=bc, TILE_M=cfg.tile_m, TILE_N=cfg.tile_n, TILE_K=cfg.tile_k, GROUP=cfg.group,
                HAS_BIAS=bias is not None, **_masks(M, N, K, cfg, block),
                USE_TMA=cfg.tma, B_K_CONTIG=b_k_contig, OUT_DESC=cfg.tma,
                PRECISION=precision, UPCAST=upcast, BALANCE=balance,
                num_warps=cfg.warps, num_stages=cfg.stages,
            )

    key = ("dsd", B, Bb, M, N, K, tuple(block), a.dtype, b_k_contig, tma_ok, precision, a.device.index)
    _run("dsd", key, M, N, K, block, a.dtype, tma_ok, launch, config)
    return out


def sdd(grad: Tensor, b: Tensor, keep: Tensor, scale: float, block: tuple[int, int],
        *, out: Tensor | None = None, config: KernelConfig | None = None, _supported: bool = False) -> Tensor:
    """out (B, M, K) = scale * (grad @ bᵀ) ⊙ m; grad (B, M, N), b (Bb, K, N). Dropped blocks are 0.

    ``_supported``: as for ``dsd``, on (grad, b).
    """
    B, M, N = grad.shape
    Bb, K, Nb = b.shape
    _check_common("sdd", grad, b, keep, block, M, K, _supported)
    if not (Nb == N and Bb in (1, B)):
        _fail("sdd", f"b must be (1 or {B}, K, {N}), got {tuple(b.shape)} for grad {tuple(grad.shape)}")
    out = _output(out, (B, M, K), grad, "sdd")
    if out.numel() == 0:
        return out
    if N == 0:
        return out.zero_()
    br, bc = block
    flags = keep.view(torch.uint8)
    n_rblk, n_cblk = cdiv(M, br), cdiv(K, bc)
    n_lines = B * n_rblk
    # The persistent schedule needs the kept blocks' row lists (one more small launch, made
    # only when a balanced config can run).
    lists: list = []
    b_k_contig = b.stride(1) == 1 and b.stride(2) != 1
    tma_ok = _tma_enabled(grad.device) and _tma_view_ok(grad) and _tma_view_ok(_b_tma_view(b)) and _tma_view_ok(out)
    upcast = _interpreting() and grad.dtype == torch.bfloat16
    precision = _precision(grad.dtype)

    def launch(cfg: KernelConfig) -> None:
        persistent = cfg.balance and n_lines <= _SDD_MAX_LINES
        # The tail split halves tile_k; keep the halves at least 16 wide (one mma column step).
        split = persistent and cfg.tile_k >= 32
        hk = cfg.tile_k // 2
        b_half, o_half = b, None
        if cfg.tma:
            g_arg = _desc3(grad, [1, cfg.tile_m, cfg.tile_n])
            b_arg = _desc3(_b_tma_view(b), [1, cfg.tile_n, cfg.tile_k] if b_k_contig else [1, cfg.tile_k, cfg.tile_n])
            o_desc = _desc3(out, [1, cfg.tile_m, cfg.tile_k])
            if split:
                b_half = _desc3(_b_tma_view(b), [1, cfg.tile_n, hk] if b_k_contig else [1, hk, cfg.tile_n])
                o_half = _desc3(out, [1, cfg.tile_m, hk])
        else:
            g_arg, b_arg, o_desc = grad, b, None
        tiles = B * cdiv(M, cfg.tile_m) * cdiv(K, cfg.tile_k)
        masks = _masks(M, N, K, cfg, block)
        if persistent:
            if not lists:
                lists.extend(kept_lists(keep, "row"))
            counts, index = lists
            occ_key = (grad.device.index, cfg, grad.dtype, b_k_contig, tuple(masks.values()))
            grid = (max(1, min(tiles, _persistent_programs(grad.device, occ_key, cfg, grad.element_size()))),)
        else:
            counts, index = flags, flags  # unused
            grid = (tiles,)
        with _device_guard(grad):
            compiled = fast(_sdd_kernel)[grid](
                g_arg, b_arg, out, o_desc, flags, b_half, o_half, counts, index,
                M, N, K, Bb, n_rblk, n_cblk, n_lines,
                *grad.stride(), *b.stride(), *out.stride(), *flags.stride(),
                float(scale),
                BLOCK_ROWS=br, BLOCK_COLS=bc, TILE_M=cfg.tile_m, TILE_N=cfg.tile_n, TILE_K=cfg.tile_k, GROUP=cfg.group,
                **masks,
                USE_TMA=cfg.tma, B_K_CONTIG=b_k_contig, OUT_DESC=cfg.tma,
                PRECISION=precision, UPCAST=upcast,
                PERSISTENT=persistent, SPLIT_TAIL=split, LINES=max(16, _next_pow2(n_lines)),
                num_warps=cfg.warps, num_stages=cfg.stages,
            )
        if persistent:
            _record_occupancy(grad.device, occ_key, compiled, cfg)

    key = ("sdd", B, Bb, M, N, K, tuple(block), grad.dtype, b_k_contig, tma_ok, precision, grad.device.index)
    _run("sdd", key, M, N, K, block, grad.dtype, tma_ok, launch, config)
    return out


def dsd_tn(a: Tensor, grad: Tensor, keep: Tensor, scale: float, block: tuple[int, int], batched_out: bool,
           *, out: Tensor | None = None, config: KernelConfig | None = None, _supported: bool = False) -> Tensor:
    """out = scale * (a ⊙ m)ᵀ @ grad: (B, K, N) if batched_out, else (1, K, N) summed over B.

    ``out`` may be any strided (B|1, K, N) view, e.g. ``w.new_empty(N, K).t().unsqueeze(0)`` so
    that linear's weight gradient lands in (N, K) row-major order without a transpose copy.
    ``_supported``: as for ``dsd``, on (a, grad).
    """
    B, M, K = a.shape
    _check_common("dsd_tn", a, grad, keep, block, M, K, _supported)
    if grad.shape[:2] != a.shape[:2]:
        _fail("dsd_tn", f"grad must be ({B}, {M}, N), got {tuple(grad.shape)}")
    N = grad.shape[2]
    Bo = B if batched_out else 1
    out = _output(out, (Bo, K, N), a, "dsd_tn")
    if out.numel() == 0:
        return out
    if M == 0 or B == 0:
        return out.zero_()
    br, bc = block
    n_rblk, n_cblk = cdiv(M, br), cdiv(K, bc)
    counts, index, order = kept_lists(keep, "col" if batched_out else "col_sum", order=True)
    tma_ok = _tma_enabled(a.device) and _tma_view_ok(a) and _tma_view_ok(grad)
    out_desc_ok = tma_ok and _tma_view_ok(out)
    upcast = _interpreting() and a.dtype == torch.bfloat16
    precision = _precision(a.dtype)

    def launch(cfg: KernelConfig) -> None:
        if cfg.tma:
            a_arg = _desc3(a, [1, cfg.tile_m, cfg.tile_k])
            g_arg = _desc3(grad, [1, cfg.tile_m, cfg.tile_n])
            o_desc = _desc3(out, [1, cfg.tile_k, cfg.tile_n]) if out_desc_ok else None
        else:
            a_arg, g_arg, o_desc = a, grad, None
        balance = cfg.balance and order is not None
        if balance:  # every column block gets bc // tile_k tiles along K (see _dsd_tn_kernel)
            grid = (Bo * n_cblk * (bc // cfg.tile_k) * cdiv(N, cfg.tile_n),)
        else:
            grid = (Bo * cdiv(K, cfg.tile_k) * cdiv(N, cfg.tile_n),)
        with _device_guard(a):
            fast(_dsd_tn_kernel)[grid](
                a_arg, g_arg, out, o_desc, counts, index, order if balance else counts,
                M, N, K, n_rblk, n_cblk, index.shape[1], Bo * n_cblk,
                *a.stride(), *grad.stride(), *out.stride(),
                float(scale),
                BLOCK_ROWS=br, BLOCK_COLS=bc, TILE_M=cfg.tile_m, TILE_N=cfg.tile_n, TILE_K=cfg.tile_k, GROUP=cfg.group,
                **_masks(M, N, K, cfg, block),
                USE_TMA=cfg.tma, OUT_DESC=cfg.tma and out_desc_ok,
                PRECISION=precision, UPCAST=upcast, BALANCE=balance,
                num_warps=cfg.warps, num_stages=cfg.stages,
            )

    key = ("dsd_tn", B, Bo, M, N, K, tuple(block), a.dtype, out.stride(-1) == 1, tma_ok, precision, a.device.index)
    _run("dsd_tn", key, M, N, K, block, a.dtype, tma_ok, launch, config)
    return out


def _b_tma_view(b: Tensor) -> Tensor:
    """b (Bb, K, N) as the row-major view a descriptor needs: (Bb, N, K) when K is contiguous."""
    return b.transpose(1, 2) if (b.stride(1) == 1 and b.stride(2) != 1) else b


def _output(out: Tensor | None, shape: tuple, like: Tensor, name: str) -> Tensor:
    if out is None:
        return like.new_empty(shape)
    if not (tuple(out.shape) == tuple(shape) and out.dtype == like.dtype and out.device == like.device):
        _fail(name, f"out must be a {like.dtype} tensor of shape {tuple(shape)} on {like.device}, "
                    f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out

"""The flash-attention kernels of SparseDrop's tile dropout (``@triton.jit`` code only; the host
side and launchers are in ``flash_attention_triton.py``, the configs in
``flash_attention_configs.py``, the semantics and the plain-PyTorch oracle in
``flash_attention.py``: read ``reference_attention``'s docstring first).

This file has the forward, the helpers both directions share (products, head dims, TMA loads,
mask tile classes, loop ranges) and the conventions below; the backward kernels are in
``flash_attention_backward_kernels.py``.

    _classify_mask   one int8 class per kernel tile of a bool mask (hidden / plain / mixed)
    _attn_fwd        O and the row logsumexp, one program per query block (online softmax)
    _attn_bwd_delta  (backward file) Δ = rowsum(dO ⊙ O), scaled (see "Scaling" below), for the
                     single-pass backward
    _attn_bwd_dkdv   (backward file) dK, dV of one key block, summed over its GQA group (with
                     ATOMIC_DQ also dQ through fp32 atomics, and dMask: the single-pass backward)
    _attn_bwd_dq     (backward file) dQ (and dMask) of one query block; in the two-pass backward it
                     runs first and works out its rows' Δ for the dK/dV pass (DELTA_HERE)

Each of the last three walks its tiles through an inner-loop helper (``_fwd_inner``,
``_dkdv_inner``, ``_dq_inner``: one loop over one tile range, which it works out itself), called
once per range; see "loop ranges" below.

The kernels follow the usual flash-attention structure: an online softmax in the forward that
saves only the row logsumexp, and a backward that recomputes P tile by tile.

What a dropped tile costs (see benchmarks/NOTES_attention.md for the FLOP model):
    post_softmax, forward   q kᵀ and exp (the normaliser runs over all keys); no P V.
    post_softmax, backward  q kᵀ, exp and both dS products (dS = -P·Δ there, not zero);
                            no dO Vᵀ and no dV product.
    dropkey                 nothing at all, forward or backward.

Kernel tiles are independent of the mask tile (block splitting): every kernel tile lies inside
one mask tile, so the keep flag of a kernel tile is a single scalar load.

Scaling: scores are kept in base-2 units (q kᵀ · scale · log2 e) so the softmax uses exp2;
the saved logsumexp is in natural units. In the backward Δ = rowsum(dO ⊙ O) is stored divided
by the dropout scale s = 1/(1-p), so a kept tile computes P ⊙ (dO Vᵀ - Δ/s) and a dropped one
-P ⊙ Δ/s, and s is applied once to the dQ, dK, dV accumulators at the end.
"""
import triton
import triton.language as tl

# Values of the MASK_KIND constexpr: no mask, a bool mask (False hides), an additive float mask.
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2

# How a kept/dropped decision is applied (a config field, so the sweep can compare them):
#   0: branch on the flag; V / dO are loaded before the branch, so the pipeliner can prefetch them.
#   1: branch on the flag; V / dO are loaded inside the branch (dropped tiles read less).
#   2: no branch: P (or dP) is multiplied by the flag and every product runs (dense cost).
SKIP_PREFETCH, SKIP_LAZY_LOAD, SKIP_NONE = 0, 1, 2
# The same values as constexpr globals, the only globals a @triton.jit function may read.
_LAZY, _DENSE = tl.constexpr(SKIP_LAZY_LOAD), tl.constexpr(SKIP_NONE)
_NO_MASK, _BOOL_MASK, _FLOAT_MASK = tl.constexpr(MASK_NONE), tl.constexpr(MASK_BOOL), tl.constexpr(MASK_FLOAT)


# --------------------------------------------------------------------------- jit helpers
# Triton's interpreter (TRITON_INTERPRET=1, how CI runs these kernels on CPU) returns garbage
# from tl.dot on bf16 operands and raises on bf16 scalar arithmetic. So INTERPRET (read from the
# environment at launch) makes every product upcast its operands to fp32 (numpy has no fast
# fp16 matmul either), and every scalar argument is an fp32 or int; on GPU the tensor cores
# take the bf16/fp16 tiles as they are.
@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


# --------------------------------------------------------------------------- head dims
# HEAD_DIM is the inputs' head dim D (any multiple of 8 up to 256), BLOCK_D the kernels' extent
# along it: the next power of two, at least 16 (tl.arange takes powers of two, tl.dot reduces
# over at least 16). Where they differ (8 -> 16, 80 -> 128), every load of q, k, v, O and dO
# reads the padded columns as zeros (d_ok False) and every store of O, dQ, dK, dV (and the
# atomic dQ adds) leaves them out: zero columns add nothing to q kᵀ, dO vᵀ or rowsum(dO ⊙ O),
# and the padded columns of the accumulators are never written. Row strides are the tensors'
# own (unit last stride); the atomic dQ buffer is (B, H, Sq, HEAD_DIM), so rows HEAD_DIM apart.
#
# EVEN_D (HEAD_DIM == BLOCK_D: the powers of two) is a constexpr, and every d mask is written
# inline as `mask=<row mask> if EVEN_D else <row mask> & d_ok`: with EVEN_D the kernels build
# exactly the ops they built before head dims were padded, in the same order (Triton builds a
# call's keyword arguments before its positional ones, so the mask still comes before the
# pointers), and 64 and 128 compile to the same SASS (checked offline for sm_90, see
# benchmarks/NOTES_attention.md). Not through a helper function in general: even inlined, a
# helper's call site adds line-info labels that change ptxas's register allocation (a dK/dV
# kernel at head dim 128 spilled 336 bytes instead of 248), and d_ok, unused with EVEN_D, is dead
# code. The one exception, ``_kv_tile`` (the K and V tiles of the forward and the dQ pass), was
# checked offline (Triton 3.6, sm_90, 13 variants of the three kernels): the same instructions
# and register counts as when the loads were written inline; in the dQ pass's pointer-load
# variants ptxas numbered the registers differently.


# --------------------------------------------------------------------------- TMA loads
# With TMA_LOADS (Hopper and newer, where the host has checked alignment and built the
# descriptors: flash_attention_triton._streamed) the K and V a query-block kernel (forward, dQ
# pass) streams arrive as TMA descriptors of the (B, H, S, D) tensors, built on the host, in
# place of their pointers. Each tile is one bulk copy into shared memory, issued by one thread
# and waited for on an mbarrier, where the pointer loads' async copies take every thread's
# address arithmetic and registers (compiled for sm_90 with Triton 3.6: 92 against 121
# registers a thread in the 64 x 64 forward, 128 against 158 in the dQ pass). The copy fills rows
# past Sk and columns past D (padded head dims) with zeros, the values the pointer loads' masks
# give. The query block, loaded once, stays a pointer load. The dK/dV kernel keeps pointer loads:
# TMA copies of Q and dO measured faster at some shapes and slower at others, and slowed the
# single pass (benchmarks/NOTES_attention.md, session 17).
@triton.jit
def _head(T, off_b, off_h, stride_b, stride_h, TMA: tl.constexpr):
    """Head (off_b, off_h) of a (B, H, S, D) operand as a tile loop reads it: with TMA the
    descriptor itself (``_tma_rows`` takes the head's coordinates), else a pointer to its rows."""
    if TMA:
        return T
    else:
        return T + off_b * stride_b + off_h * stride_h


@triton.jit
def _tma_rows(desc, off_b, off_h, row, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [row, row + BLOCK_R) of head (off_b, off_h), by one TMA copy."""
    return desc.load([off_b.to(tl.int32), off_h.to(tl.int32), row, 0]).reshape(BLOCK_R, BLOCK_D)


@triton.jit
def _kv_tile(base, tb, th, start_n, offs_n, offs_d, col_ok, d_ok, stride_n, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, TRANS: tl.constexpr,
             TMA: tl.constexpr):
    """Key tile [start_n, start_n + BLOCK_N) of K or V for a query-block loop (forward, dQ pass),
    as (BLOCK_N, BLOCK_D), or transposed with TRANS: one TMA copy with TMA, else a pointer load
    whose masks (keys past Sk with MASKED, columns past HEAD_DIM unless EVEN_D) read zeros."""
    if TMA:
        tile = _tma_rows(base, tb, th, start_n, BLOCK_N, BLOCK_D)
        if TRANS:
            tile = tl.trans(tile)
    elif TRANS:
        ptrs = base + offs_n[None, :] * stride_n + offs_d[:, None]
        if MASKED:
            tile = tl.load(ptrs, mask=col_ok[None, :] if EVEN_D else col_ok[None, :] & d_ok[:, None], other=0.0)
        elif EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=d_ok[:, None], other=0.0)
    else:
        ptrs = base + offs_n[:, None] * stride_n + offs_d[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=col_ok[:, None] if EVEN_D else col_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return tile


# --------------------------------------------------------------------------- mask tile classes
# Before the attention kernels run, ``_classify_mask`` reads the mask once and writes, for each
# kernel tile of a pass, one int8 class (see ``flash_attention_triton._tile_classes``):
#   0 (TILE_HIDDEN)   every element hidden (bool False / float -inf): P = 0 there, no work at all;
#   1 (TILE_PLAIN)    every element visible with nothing to add (bool True / float 0.0): the
#                     kernels need not read the mask;
#   2 (TILE_MIXED)    anything else: the mask is read element by element, as without classes.
# The kernels use the classes in two ways. (a) Each program scans its row (forward, dQ) or column
# (dK/dV) of classes and trims its loop to [first, last] non-hidden tile: that removes the causal
# upper triangle of a materialised causal mask and the padded key (or query) blocks while the
# loops keep the shape the software pipeliner prefetches through. Hidden tiles *between* visible
# ones (rare: sliding windows, block-sparse masks) stay in the loop and are computed with their
# mask, which gives exact zeros; skipping them would need a branch around the K/Q loads, which
# stops the pipeliner from prefetching them for every tile. (b) Inside the loop a plain tile's
# mask load is predicated off (no memory traffic; the values it stands for are filled in).
TILE_HIDDEN, TILE_PLAIN, TILE_MIXED = 0, 1, 2
# Entries of a class row scanned per step when a program looks for its live range.
_SCAN_CHUNK = tl.constexpr(64)


@triton.jit
def _store_classes(vis, mixed, Cls, stride_cb, stride_ch, stride_cm, stride_cn, off_b, off_h, pid_m, pid_n,
                   n_m, n_n, REGION_M: tl.constexpr, REGION_N: tl.constexpr, TILE_M: tl.constexpr,
                   TILE_N: tl.constexpr):
    """Reduce (REGION_M, REGION_N) element flags to the classes of its (TILE_M, TILE_N) tiles."""
    RM: tl.constexpr = REGION_M // TILE_M
    RN: tl.constexpr = REGION_N // TILE_N
    any_vis = tl.max(tl.max(tl.reshape(vis, [RM, TILE_M, RN, TILE_N]), 3), 1)
    any_mixed = tl.max(tl.max(tl.reshape(mixed, [RM, TILE_M, RN, TILE_N]), 3), 1)
    cls = tl.where(any_vis == 0, 0, tl.where(any_mixed != 0, 2, 1)).to(tl.int8)
    rows = pid_m * RM + tl.arange(0, RM)
    cols = pid_n * RN + tl.arange(0, RN)
    tl.store(Cls + off_b * stride_cb + off_h * stride_ch + rows[:, None] * stride_cm + cols[None, :] * stride_cn, cls,
             mask=(rows < n_m)[:, None] & (cols < n_n)[None, :])


@triton.jit
def _classify_mask(
    Mask, ClsA, ClsB,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah, stride_am, stride_an,
    stride_bb, stride_bh, stride_bm, stride_bn,
    Hm, Sqm, Skm, nqa, nka, nqb, nkb,
    MASK_KIND: tl.constexpr, REGION_M: tl.constexpr, REGION_N: tl.constexpr,
    A_M: tl.constexpr, A_N: tl.constexpr, B_M: tl.constexpr, B_N: tl.constexpr, HAS_B: tl.constexpr,
):
    """Classes of one (REGION_M, REGION_N) region of the mask for one or two tilings.

    The mask is read in its own (Bm, Hm, Sqm, Skm) extent (broadcast dims have size 1), once,
    however many passes need classes. Elements past Sqm / Skm belong to no tile's decision.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    off_b = (pid_bh // Hm).to(tl.int64)
    off_h = (pid_bh % Hm).to(tl.int64)
    offs_m = pid_m * REGION_M + tl.arange(0, REGION_M)
    offs_n = pid_n * REGION_N + tl.arange(0, REGION_N)
    valid = (offs_m < Sqm)[:, None] & (offs_n < Skm)[None, :]
    x = tl.load(Mask + off_b * stride_mb + off_h * stride_mh + offs_m.to(tl.int64)[:, None] * stride_mm
                + offs_n[None, :] * stride_mn, mask=valid, other=0)
    if MASK_KIND == _BOOL_MASK:
        vis = valid & (x != 0)
        mixed = valid & (x == 0)
    else:
        xf = x.to(tl.float32)
        vis = valid & (xf != float("-inf"))
        # -inf is != 0 too: a tile with hidden and visible elements is mixed. NaN counts as
        # visible and mixed, so it still reaches the output as it would without classes.
        mixed = valid & (xf != 0.0)
    vis = vis.to(tl.int8)
    mixed = mixed.to(tl.int8)
    _store_classes(vis, mixed, ClsA, stride_ab, stride_ah, stride_am, stride_an, off_b, off_h, pid_m, pid_n, nqa, nka,
                   REGION_M, REGION_N, A_M, A_N)
    if HAS_B:
        _store_classes(vis, mixed, ClsB, stride_bb, stride_bh, stride_bm, stride_bn, off_b, off_h, pid_m, pid_n,
                       nqb, nkb, REGION_M, REGION_N, B_M, B_N)


@triton.jit
def _live_range(cls_base, stride, n):
    """[first, last + 1) of the non-hidden entries among n classes (first >= last + 1 if none)."""
    lo = n + 0
    hi = n * 0
    for c in range(0, n, _SCAN_CHUNK):
        idx = c + tl.arange(0, _SCAN_CHUNK)
        live = tl.load(cls_base + idx * stride, mask=idx < n, other=0) != 0
        lo = tl.minimum(lo, tl.min(tl.where(live, idx, n), 0))
        hi = tl.maximum(hi, tl.max(tl.where(live, idx + 1, 0), 0))
    return lo, hi


@triton.jit
def _load_mask(ptrs, need, MASK_KIND: tl.constexpr, TILE_CLS: tl.constexpr):
    """The mask values at ptrs; with tile classes, a plain tile (need False) reads nothing and
    gets the values a plain tile holds (True / 0.0). The scalar predicate is splat by an add
    and a compare: the interpreter rejects a broadcast scalar (or a `full & scalar`, which it
    computes as int8) as a load mask; on the GPU this folds to one predicate."""
    if TILE_CLS:
        pred = (tl.zeros(ptrs.shape, tl.int32) + need.to(tl.int32)) != 0
        if MASK_KIND == _BOOL_MASK:
            return tl.load(ptrs, mask=pred, other=1)
        else:
            return tl.load(ptrs, mask=pred, other=0.0)
    else:
        return tl.load(ptrs)


# A classified bool mask read per element (not one shared row) is read under a branch on the
# tile's class, `MASK_KIND == _BOOL_MASK and TILE_CLS and not MASK_SHARED` below: a plain tile
# (every element True, almost all of them in HF's materialised padding and causal masks) then
# skips the tile of addresses, the load and the select; the predicated load of `_load_mask`
# still computed every address. A shared (one row for every query) mask is a single vector and
# keeps the predicated load, and float masks are never classified (see `_tile_classes`).


@triton.jit
def _need_mask(cls_base, tile, stride, TILE_CLS: tl.constexpr):
    """Whether a tile must read its mask: all but plain tiles (hidden ones inside a live range too)."""
    if TILE_CLS:
        return tl.load(cls_base + tile * stride) != 1
    else:
        return True


# --------------------------------------------------------------------------- one loop step
# What each step of the three tile loops (``_fwd_inner``, ``_dq_inner``, ``_dkdv_inner``) starts
# with, and the forward and dQ pass's masks: one home, so that the loops differ only in their math.
# These helpers return values, never offsets a store is addressed with: torch decides which
# arguments a kernel writes (and so which tensors compiled code must copy) by following each
# store's address back through the ops that made it, and through a call it counts every argument
# of the call, pointers the helper only reads included (tests/test_gpu_compile.py checks the
# kernels' write sets).


@triton.jit
def _step_flags(keep_line, cls_line, start, block_keep, stride_e, stride_c, BLOCK: tl.constexpr,
                TILE_CLS: tl.constexpr):
    """The keep flag of the loop's tile starting at ``start`` (its mask tile's, on the program's
    line of flags) and whether it must read the attention mask (``_need_mask``)."""
    kept = tl.load(keep_line + (start // block_keep) * stride_e) != 0
    return kept, _need_mask(cls_line, start // BLOCK, stride_c, TILE_CLS)


@triton.jit
def _row_mask(mask_rows, offs_n, Sk, stride_mn, need_mask, MASK_KIND: tl.constexpr, MASK_SHARED: tl.constexpr,
              TILE_CLS: tl.constexpr):
    """A query block's mask values over key tile ``offs_n`` (``_load_mask``): (1, BLOCK_N) from the
    one row every query shares (MASK_SHARED), else (BLOCK_M, BLOCK_N). Key indices are clamped so
    no load needs a predicate; the callers hide keys past Sk themselves."""
    cols = tl.minimum(offs_n, Sk - 1)
    if MASK_SHARED:
        return _load_mask(mask_rows + cols * stride_mn, need_mask, MASK_KIND, TILE_CLS)[None, :]
    else:
        return _load_mask(mask_rows[:, None] + cols[None, :] * stride_mn, need_mask, MASK_KIND, TILE_CLS)


@triton.jit
def _visible(offs_m, offs_n, col_ok, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N): keys inside Sk and, under the causal mask, not after the query."""
    ok = col_ok[None, :]
    if CAUSAL:
        ok = ok & (offs_m[:, None] >= offs_n[None, :])
    return ok


# --------------------------------------------------------------------------- loop ranges
# Every kernel walks its tiles in two loops: the tiles that need neither the causal nor a bounds
# mask (MASKED=False) and the others (MASKED=True: the diagonal band of a causal program, and in
# the forward and dQ the keys past the last whole tile). Each loop is one call of the kernel's
# inner-loop helper (``_fwd_inner``, ``_dkdv_inner``, ``_dq_inner``), which works out its own
# range from MASKED, as the ``_attn_fwd_inner`` of Triton's fused-attention tutorial does from its
# STAGE. A helper is one `for` loop whose bounds are computed just before it, so the software
# pipeliner sees the same loop bodies as when each kernel spelled its loops out. The kernels make
# the two calls through tl.static_range, which unrolls at compile time: MASKED stays a constant
# and each loop is compiled on its own.


@triton.jit
def _live_span(classes, stride, n, BLOCK: tl.constexpr, TILE_CLS: tl.constexpr):
    """[lo, hi), in elements, the span of the non-hidden tiles on a program's line of classes,
    whose tiles cover a loop over n elements in steps of BLOCK; without classes (0, n), nothing
    is trimmed (and ``classes`` is not read)."""
    if TILE_CLS:
        t_lo, t_hi = _live_range(classes, stride, tl.cdiv(n, BLOCK))
        lo = t_lo * BLOCK
        hi = t_hi * BLOCK
    else:
        lo = 0
        hi = n
    return lo, hi


@triton.jit
def _key_range(start_m, Sk, n_lo, n_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               TILE_CLS: tl.constexpr, MASKED: tl.constexpr):
    """[lo, hi) of the keys one loop of a query block (the forward's, dQ's) visits.

    Key tiles [0, full_hi) need no bounds or causal mask (MASKED=False); [full_hi, hi) do
    (MASKED=True). With tile classes both are trimmed to the block's live keys [n_lo, n_hi)."""
    if CAUSAL:
        hi = tl.minimum(Sk, start_m + BLOCK_M)
        full_hi = tl.minimum((start_m + 1) // BLOCK_N, Sk // BLOCK_N) * BLOCK_N
    else:
        hi = Sk
        full_hi = Sk // BLOCK_N * BLOCK_N
    if MASKED:
        lo = full_hi
    else:
        lo = 0
        hi = full_hi
    if TILE_CLS:
        lo = tl.maximum(lo, n_lo) if MASKED else n_lo  # n_lo >= 0
        hi = tl.minimum(hi, n_hi)
    return lo, hi


@triton.jit
def _query_range(start_n, Sq, m_lo, m_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 TILE_CLS: tl.constexpr, MASKED: tl.constexpr):
    """[lo, hi) of the queries one loop of a key block (dK/dV's) visits.

    With CAUSAL the query chunks from start_n's chunk to diag_hi straddle the diagonal and need
    its mask (MASKED=True, used only with CAUSAL); from diag_hi (0 without CAUSAL) to Sq every
    query sees every key of the block (MASKED=False; rows past Sq are clamped, see
    ``_dkdv_inner``). With tile classes both are trimmed to the block's live queries [m_lo, m_hi)."""
    if CAUSAL:
        diag_hi = (start_n + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        diag_hi = 0
    if MASKED:
        lo = start_n // BLOCK_M * BLOCK_M
        hi = tl.minimum(diag_hi, (Sq + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    else:
        lo = diag_hi
        hi = Sq
    if TILE_CLS:
        lo = tl.maximum(lo, m_lo)
        hi = tl.minimum(hi, m_hi)
    return lo, hi


# --------------------------------------------------------------------------- forward
# In dropkey mode a dropped tile is hidden before the softmax, so it is not visited at all: the
# inner loops run a tile under `if kept` and load V / dO only inside it (SKIP_LAZY_LOAD).
# Otherwise every tile runs, and SKIP says how a dropped one is handled. `visit` below is the
# constant True then, so no branch is emitted, exactly as when the kernels branched on DROPKEY.
@triton.jit
def _fwd_inner(
    m_i, l_i, acc, q, k_base, v_base, tb, th, mask_rows, keep_row, cls_row, start_m, n_lo, n_hi,
    Sk, stride_kn, stride_vn, stride_mn, stride_en, stride_cn, qk_scale, block_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_SHARED: tl.constexpr, TILE_CLS: tl.constexpr, CAUSAL: tl.constexpr,
    DROPKEY: tl.constexpr,
    MASKED: tl.constexpr, SKIP: tl.constexpr, TMA_LOADS: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The online softmax of a query block over one of its two key ranges (``_key_range``);
    MASKED tiles may hold keys past Sk or the diagonal. With TMA_LOADS k_base and v_base are
    descriptors and (tb, th) the head's coordinates in them (see "TMA loads" above)."""
    lo, hi = _key_range(start_m, Sk, n_lo, n_hi, BLOCK_M, BLOCK_N, CAUSAL, TILE_CLS, MASKED)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    TILE_SKIP: tl.constexpr = _LAZY if DROPKEY else SKIP  # see the note above
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    for start_n in range(lo, hi, BLOCK_N):
        kept, need_mask = _step_flags(keep_row, cls_row, start_n, block_k, stride_en, stride_cn, BLOCK_N, TILE_CLS)
        visit = kept if DROPKEY else True
        if visit:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            d_ok = offs_d < HEAD_DIM  # dead code with EVEN_D
            col_ok = offs_n < Sk
            kt = _kv_tile(k_base, tb, th, start_n, offs_n, offs_d, col_ok, d_ok, stride_kn, BLOCK_N, BLOCK_D, EVEN_D,
                          MASKED, True, TMA_LOADS)
            if TILE_SKIP != _LAZY:
                v = _kv_tile(v_base, tb, th, start_n, offs_n, offs_d, col_ok, d_ok, stride_vn, BLOCK_N, BLOCK_D, EVEN_D,
                             MASKED, False, TMA_LOADS)
            s = _dot(q, kt, INTERPRET)
            if MASK_KIND == _BOOL_MASK and TILE_CLS and not MASK_SHARED:
                # Only tiles whose class says so read the mask (see the note above _need_mask).
                if need_mask:
                    mv = tl.load(mask_rows[:, None] + tl.minimum(offs_n, Sk - 1)[None, :] * stride_mn)
                    s = tl.where(mv != 0, s, float("-inf"))
            elif MASK_KIND != _NO_MASK:
                # keys past Sk get -inf below
                mv = _row_mask(mask_rows, offs_n, Sk, stride_mn, need_mask, MASK_KIND, MASK_SHARED, TILE_CLS)
                if MASK_KIND == _BOOL_MASK:
                    s = tl.where(mv != 0, s, float("-inf"))
                else:
                    s = s * qk_scale + mv.to(tl.float32) * 1.4426950408889634
            if MASKED:
                s = tl.where(_visible(offs_m, offs_n, col_ok, CAUSAL), s, float("-inf"))
            if MASK_KIND == _FLOAT_MASK:
                m_new = tl.maximum(m_i, tl.max(s, 1))
            else:
                # Scores are still raw q·k here: scale the row max (scale > 0) and fold the scale
                # into the exponent's multiply-add, one FMA per element as in the Triton tutorial.
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            # A row with no visible key so far has m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            if MASK_KIND == _FLOAT_MASK:
                prob = tl.exp2(s - m_use[:, None])
            else:
                prob = tl.exp2(s * qk_scale - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            # The normaliser sums every tile, dropped or kept: dropout comes after the softmax.
            l_i = l_i * alpha + tl.sum(prob, 1)
            acc = acc * alpha[:, None]
            if TILE_SKIP == _DENSE:
                acc = _dot_acc((prob * kept.to(tl.float32)).to(v.dtype), v, acc, INTERPRET)
            else:
                if kept:
                    if TILE_SKIP == _LAZY:
                        v = _kv_tile(v_base, tb, th, start_n, offs_n, offs_d, col_ok, d_ok, stride_vn, BLOCK_N, BLOCK_D,
                                     EVEN_D, MASKED, False, TMA_LOADS)
                    acc = _dot_acc(prob.to(v.dtype), v, acc, INTERPRET)
            m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _query_tile(H, GROUP, CAUSAL: tl.constexpr):
    """A query-block program's (query tile, batch x head, batch, head, kv head), for the forward
    and the dQ pass: axis 0 of the grid walks the query tiles, backwards under the causal mask
    (the last tiles see the most keys: started first, they shorten the tail), axis 1 the
    (batch, head) pairs. Scalars only, so the Gluon forward (flash_attention_hopper_kernels.py)
    calls it too."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    return pid_m, pid_bh, off_b, off_h, off_h // GROUP


@triton.jit
def _attn_fwd(
    Q, K, V, Mask, Keep, Cls, Out, Lse,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_eb, stride_eh, stride_em, stride_en,
    stride_cb, stride_ch, stride_cm, stride_cn,
    stride_ob, stride_oh, stride_om,
    H, GROUP, Sq, Sk, qk_scale, out_scale, block_q, block_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_SHARED: tl.constexpr, TILE_CLS: tl.constexpr, CAUSAL: tl.constexpr,
    DROPKEY: tl.constexpr, SKIP: tl.constexpr, TMA_LOADS: tl.constexpr, INTERPRET: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D  # no d masks (see "head dims" above)
    # Float arguments arrive as fp64 from Inductor's launcher (fp32 from Triton's): fix them at fp32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    out_scale = tl.cast(out_scale, tl.float32)
    pid_m, pid_bh, off_b, off_h, off_hk = _query_tile(H, GROUP, CAUSAL)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # dead code with EVEN_D
    row_ok = offs_m < Sq

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] if EVEN_D else row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = _head(K, off_b, off_hk, stride_kb, stride_kh, TMA_LOADS)
    v_base = _head(V, off_b, off_hk, stride_vb, stride_vh, TMA_LOADS)
    if MASK_SHARED:
        # One mask row for every query (e.g. a (B, 1, 1, Sk) padding mask): load it as a vector.
        mask_rows = Mask + off_b * stride_mb + off_h * stride_mh
    else:
        mask_rows = Mask + off_b * stride_mb + off_h * stride_mh + tl.minimum(offs_m, Sq - 1) * stride_mm
    keep_row = Keep + off_b * stride_eb + off_h * stride_eh + (start_m // block_q) * stride_em

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # With tile classes both loops are trimmed to the row's non-hidden key tiles [n_lo, n_hi).
    cls_row = Cls + off_b * stride_cb + off_h * stride_ch + pid_m * stride_cm
    n_lo, n_hi = _live_span(cls_row, stride_cn, Sk, BLOCK_N, TILE_CLS)
    # Stage 0: the key tiles that need no mask; stage 1: the diagonal band and the ragged end.
    for stage in tl.static_range(2):
        m_i, l_i, acc = _fwd_inner(m_i, l_i, acc, q, k_base, v_base, off_b, off_hk, mask_rows, keep_row, cls_row, start_m, n_lo,
                                   n_hi, Sk, stride_kn, stride_vn, stride_mn, stride_en, stride_cn, qk_scale, block_k,
                                   BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_KIND, MASK_SHARED, TILE_CLS, CAUSAL,
                                   DROPKEY, stage == 1, SKIP, TMA_LOADS, INTERPRET)

    # Rows with no visible key (all masked, or every tile dropped in dropkey) give O = 0 and
    # lse = +inf, which makes the backward's P = exp(S - lse) exactly 0 there.
    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    out = acc * (out_scale / l_safe)[:, None]
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] if EVEN_D else row_ok[:, None] & d_ok[None, :])
    lse = tl.where(l_ok, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(Lse + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=row_ok)

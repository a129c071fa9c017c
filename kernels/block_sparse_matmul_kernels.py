"""The block-sparse matmul kernels of SparseDrop with a dense output, and the helpers every
matmul kernel shares (``@triton.jit`` code only; the sparse-output kernel is in
``block_sparse_matmul_sdd_kernels.py``, the host side, configs and launchers in
``block_sparse_matmul_triton.py``, the plain-PyTorch oracle in ``block_sparse_matmul.py``).

    _dsd_kernel     out = scale * (a ⊙ m) @ b (+ bias)        dense out, sparse lhs
                    [⊙ m_out: OUT_KEEP, dropped output tiles skipped]
    _dsd_tn_kernel  out = scale * (a ⊙ m)ᵀ @ (g [⊙ m_g])      dense out, sparse (transposed) lhs
                    [m_g: GRAD_KEEP, g's dropped blocks read as zeros; SPLIT: a small output's
                    reduction shared by SPLIT programs a tile, added up by _sum_splits_kernel]
    _sdd_kernel     (block_sparse_matmul_sdd_kernels.py)     sparse out
    _copy_rows_kernel  a matrix into rows of another stride (the Hopper launchers' aligned copy)

The bracketed second masks serve a matmul with block dropout on its output (and on both sides):
see ``block_sparse_matmul.py``. All masks of one call share the block size.
The lists of kept blocks these kernels walk are built by ``kept_blocks_kernels.py``.

With ``USE_TMA`` the kernels build rank-3 TMA descriptors over their operands on the device
(``tl.make_tensor_descriptor``); the host passes strides a descriptor accepts (see
``runtime.tma_strides``). Otherwise they load through pointers with masked edges.
"""
import triton
import triton.language as tl


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
def _dealt_tile(turn, pid, programs, SNAKE: tl.constexpr):
    """The tile a persistent program takes at its ``turn``: the tiles are dealt out in rounds of
    ``programs``, round t's tiles t * programs + 0, 1, ... to programs 0, 1, ... in turn; with
    SNAKE every odd round is dealt in reverse. Over tiles ranked by cost (the listed schedule's
    lines, most kept blocks first) a plain deal gives program 0 the dearest tile of every round
    and the last program the cheapest; the reversed rounds even that out. Each round's tiles
    still run side by side, so their shared operand bands stay in L2 as before."""
    if SNAKE:
        return turn * programs + pid + (turn % 2) * (programs - 1 - 2 * pid)
    return turn * programs + pid


@triton.jit
def _dealt_turns(n_tiles, pid, programs, SNAKE: tl.constexpr):
    """How many of ``n_tiles`` tiles program ``pid`` takes in _dealt_tile's deal: a tile each
    full round, and one of the last, partial round if its place in that round's order comes
    before the round's end. Its turns 0 .. count - 1 are all in range."""
    full = n_tiles // programs
    place = pid
    if SNAKE:
        place = pid + (full % 2) * (programs - 1 - 2 * pid)
    return full + (place < n_tiles - full * programs).to(tl.int32)


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
def _load_kept_tile(ptrs, offs_r, offs_c, R, C, kept, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """_load_tile of a tile inside one mask block, zeros without a read if the block is dropped
    (``kept``, a scalar, predicates the load). Replacing a loaded tile in registers instead
    (tl.where) gave garbage on an H200 (Triton 3.6) in one pipelined 8-warp configuration."""
    if MASK_R and MASK_C:
        t = tl.load(ptrs, mask=kept & (offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0)
    elif MASK_R:
        t = tl.load(ptrs, mask=kept & (offs_r[:, None] < R), other=0.0)
    elif MASK_C:
        t = tl.load(ptrs, mask=kept & (offs_c[None, :] < C), other=0.0)
    else:
        t = tl.load(ptrs, mask=kept, other=0.0)
    return t


@triton.jit
def _load_tile_of_block(ptrs, offs_r, offs_c, R, C, keep_ptr, bat, r0, c0, stride_b, stride_r, stride_c,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BY_FLAG: tl.constexpr,
                        MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """_load_tile, or with BY_FLAG _load_kept_tile by the flag of the mask block at row r0,
    column c0 of batch entry ``bat`` in ``keep``."""
    if BY_FLAG:
        kept = _block_kept(keep_ptr, bat, r0, c0, stride_b, stride_r, stride_c, BLOCK_ROWS, BLOCK_COLS)
        return _load_kept_tile(ptrs, offs_r, offs_c, R, C, kept, MASK_R, MASK_C)
    return _load_tile(ptrs, offs_r, offs_c, R, C, MASK_R, MASK_C)


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
def _aligned(x, ALIGN: tl.constexpr):
    """``x``, which the host found to be a multiple of ALIGN, written so that the compiler can
    prove it. Triton knows an integer argument's alignment only when it is a multiple of 16, so
    a pointer tile along a dim of 3000 elements, or over rows 3000 apart, was loaded an element
    at a time and not pipelined (NOTES_kernels §17); with K = K // 8 * 8 it takes 16-byte loads.
    Exact when ALIGN divides x, as the host checks (never for a unit stride)."""
    if ALIGN > 1:
        x = x // ALIGN * ALIGN
    return x


@triton.jit
def _block_kept(keep_ptr, bat, r0, c0, stride_b, stride_r, stride_c, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Whether the mask block holding row r0, column c0 of batch entry ``bat`` is kept, as a
    (1, 1) tensor that broadcasts over a tile (Triton's interpreter takes no scalar load mask)."""
    at = bat.to(tl.int64) * stride_b + (r0 // BLOCK_ROWS) * stride_r + (c0 // BLOCK_COLS) * stride_c
    return tl.load(keep_ptr + at + tl.zeros((1, 1), dtype=tl.int64)) != 0


@triton.jit
def _keep_block(t, keep_ptr, bat, r0, c0, stride_b, stride_r, stride_c, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Tile ``t`` (inside one mask block, at row r0 and column c0) or zeros if that block is
    dropped: for tiles loaded through a TMA descriptor, which takes no predicate. Pointer loads
    use _load_kept_tile instead, which does not read a dropped tile at all."""
    return tl.where(_block_kept(keep_ptr, bat, r0, c0, stride_b, stride_r, stride_c, BLOCK_ROWS, BLOCK_COLS), t, tl.zeros_like(t))


@triton.jit
def _dsd_kernel(
    a, b, bias_ptr, out_ptr, row_count_ptr, row_index_ptr, order_ptr, out_keep_ptr, keep_ptr,
    B, M, N, K, Bb, n_rblk, n_cblk, n_lines,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_bias,
    stride_ob, stride_om, stride_on,
    stride_okb, stride_okr, stride_okc,
    stride_kb, stride_kr, stride_kc,
    scale,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr, GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr, MASK_K: tl.constexpr,
    USE_TMA: tl.constexpr, B_K_CONTIG: tl.constexpr, OUT_DESC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BALANCE: tl.constexpr, OUT_KEEP: tl.constexpr,
    WALK: tl.constexpr, ALIGN: tl.constexpr,
):
    """out[bat] = scale * (a[bat] ⊙ m) @ b[bat % Bb] (+ bias); one program per (bat, M tile, N tile).

    With USE_TMA, ``a`` and ``b`` are read through rank-3 tensor descriptors built here (zero
    fill out of range, so no masks), and with OUT_DESC ``out`` is written through one;
    otherwise pointers with explicit strides (any layout, masked edges).

    BALANCE: a tile costs its row block's kept count, so the programs take the row blocks (of
    all batch entries) in ``order``, most kept blocks first. The hardware hands the next program
    to whichever SM slot frees up first, so this is longest-job-first list scheduling: the last
    wave holds the cheapest tiles and the tail shrinks from "one expensive tile" to "one cheap
    one". Groups of GROUP row tiles still run side by side for L2 reuse.

    OUT_KEEP: ``out_keep`` (B, cdiv(M, BLOCK_ROWS), cdiv(N, BLOCK_COLS)) masks the output too
    (TILE_N divides BLOCK_COLS, so a tile lies in one block): a dropped tile runs no iterations
    and stores zeros (no bias).

    WALK (launch-bound problems, pointer loads, no BALANCE): no kept-block lists; the loop walks
    every column block of the row block and reads a dropped one's ``a`` tile as zeros from the
    flags in ``keep``. Dense work on the GPU, one launch fewer on the host.

    ALIGN: N, K and the operands' strides other than their unit ones (a's over K, b's over K
    with B_K_CONTIG, else over N) are multiples of it (see _aligned).
    """
    tl.static_assert(not (WALK and (USE_TMA or BALANCE)), "WALK takes pointer loads in grid order")
    # Float arguments arrive as fp64 from Inductor's launcher (fp32 from Triton's): fix them at fp32.
    scale = tl.cast(scale, tl.float32)
    N = _aligned(N, ALIGN)
    K = _aligned(K, ALIGN)
    stride_ab = _aligned(stride_ab, ALIGN)
    stride_am = _aligned(stride_am, ALIGN)
    stride_bb = _aligned(stride_bb, ALIGN)
    if B_K_CONTIG:
        stride_bn = _aligned(stride_bn, ALIGN)
    else:
        stride_bk = _aligned(stride_bk, ALIGN)
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
        if WALK:
            count = n_cblk
        else:
            count = tl.load(row_count_ptr + line)
    bat_b = bat % Bb
    n0 = pid_n * TILE_N
    if OUT_KEEP:
        tile_kept = tl.load(out_keep_ptr + bat.to(tl.int64) * stride_okb + (m0 // BLOCK_ROWS) * stride_okr
                            + (n0 // BLOCK_COLS) * stride_okc, mask=(m0 < M) & (n0 < N), other=0) != 0
        count = tl.where(tile_kept, count, 0)
    kept_blocks = row_index_ptr + line.to(tl.int64) * n_cblk
    TILES_PER_BLOCK: tl.constexpr = BLOCK_COLS // TILE_K

    offs_m = m0 + tl.arange(0, TILE_M)
    offs_n = n0 + tl.arange(0, TILE_N)
    offs_k = tl.arange(0, TILE_K)
    acc = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a, shape=[B, M, K], strides=[stride_ab, stride_am, 1],
                                           block_shape=[1, TILE_M, TILE_K])
        if B_K_CONTIG:  # b is stored as (N, K) rows, e.g. linear's weight
            b_desc = tl.make_tensor_descriptor(b, shape=[Bb, N, K], strides=[stride_bb, stride_bn, 1],
                                               block_shape=[1, TILE_N, TILE_K])
        else:
            b_desc = tl.make_tensor_descriptor(b, shape=[Bb, K, N], strides=[stride_bb, stride_bk, 1],
                                               block_shape=[1, TILE_K, TILE_N])
        for it in range(0, count * TILES_PER_BLOCK):
            k0 = tl.load(kept_blocks + it // TILES_PER_BLOCK).to(tl.int32) * BLOCK_COLS + (it % TILES_PER_BLOCK) * TILE_K
            a_t = a_desc.load([bat, m0, k0]).reshape(TILE_M, TILE_K)
            if B_K_CONTIG:
                b_t = b_desc.load([bat_b, n0, k0]).reshape(TILE_N, TILE_K).T
            else:
                b_t = b_desc.load([bat_b, k0, n0]).reshape(TILE_K, TILE_N)
            acc = _mma(acc, a_t, b_t, PRECISION, False)
    else:
        a_rows = a + bat.to(tl.int64) * stride_ab + offs_m[:, None] * stride_am
        b_cols = b + bat_b.to(tl.int64) * stride_bb + offs_n[None, :] * stride_bn
        for it in range(0, count * TILES_PER_BLOCK):
            if WALK:
                k0 = (it // TILES_PER_BLOCK) * BLOCK_COLS + (it % TILES_PER_BLOCK) * TILE_K
            else:
                k0 = tl.load(kept_blocks + it // TILES_PER_BLOCK).to(tl.int32) * BLOCK_COLS + (it % TILES_PER_BLOCK) * TILE_K
            ks = k0 + offs_k
            a_t = _load_tile_of_block(a_rows + ks[None, :] * stride_ak, offs_m, ks, M, K, keep_ptr, bat, m0, k0,
                                      stride_kb, stride_kr, stride_kc, BLOCK_ROWS, BLOCK_COLS, WALK, MASK_M, MASK_K)
            b_t = _load_tile(b_cols + ks[:, None] * stride_bk, ks, offs_n, K, N, MASK_K, MASK_N)
            acc = _mma(acc, a_t, b_t, PRECISION, UPCAST)

    acc = acc * scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=offs_n < N, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    if OUT_KEEP:
        acc = tl.where(tile_kept, acc, 0.0)
    val = acc.to(out_ptr.dtype.element_ty)
    if OUT_DESC:
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[B, M, N], strides=[stride_ob, stride_om, 1],
                                             block_shape=[1, TILE_M, TILE_N])
        out_desc.store([bat, m0, n0], val.reshape(1, TILE_M, TILE_N))
    else:
        ptrs = out_ptr + bat.to(tl.int64) * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        _store_tile(ptrs, val, offs_m, offs_n, M, N, MASK_M, MASK_N)


@triton.jit
def _dsd_tn_kernel(
    a, g, out_ptr, col_count_ptr, col_index_ptr, order_ptr, g_keep_ptr, keep_ptr, part_ptr,
    B, Bo, M, N, K, n_rblk, n_cblk, list_len, n_lines,
    stride_ab, stride_am, stride_ak,
    stride_gb, stride_gm, stride_gn,
    stride_ob, stride_ok, stride_on,
    stride_gkb, stride_gkr, stride_gkc,
    stride_kb, stride_kr, stride_kc,
    scale,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr, GROUP: tl.constexpr,
    MASK_M: tl.constexpr, MASK_N: tl.constexpr, MASK_K: tl.constexpr,
    USE_TMA: tl.constexpr, OUT_DESC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BALANCE: tl.constexpr, GRAD_KEEP: tl.constexpr,
    WALK: tl.constexpr, SPLIT: tl.constexpr, ALIGN: tl.constexpr,
):
    """out[ob] = scale * Σ (a[bat] ⊙ m)ᵀ @ g[bat]; one program per (ob, K tile, N tile), or SPLIT.

    The list of the tile's column block holds entries e = (bat - ob) * n_rblk + row_block: for a
    batched output only this batch entry's row blocks, for a summed one every (bat, row block)
    pair, so summing over the batch is the same single flat loop.

    BALANCE: column blocks (lines) in ``order``, most kept row blocks first, as in _dsd_kernel.

    GRAD_KEEP: ``g_keep`` (B, cdiv(M, BLOCK_ROWS), cdiv(N, BLOCK_COLS)) masks g too (TILE_N
    divides BLOCK_COLS): a visited row block whose g block is dropped is read as zeros. Those
    steps still run (a per-step branch would stall the pipelined loop); only a's dropped row
    blocks are skipped.

    WALK (launch-bound problems, pointer loads, no BALANCE): no kept-block lists; the loop walks
    every entry of the line (list_len of them) and reads a dropped row block's ``a`` tile as
    zeros from the flags in ``keep``, as _dsd_kernel's WALK does.

    SPLIT > 1 (a small output over a long reduction): SPLIT neighbouring programs share an output
    tile, each taking one contiguous SPLIT-th of its reduction steps, and store their scaled fp32
    sums in ``part_ptr`` (SPLIT, Bo, K, N); _sum_splits_kernel adds them up in order into ``out``.

    ALIGN: N, K and the batch and row strides of ``a`` and ``g`` are multiples of it (see _aligned).
    """
    tl.static_assert(not (WALK and (USE_TMA or BALANCE)), "WALK takes pointer loads in grid order")
    # Float arguments arrive as fp64 from Inductor's launcher (fp32 from Triton's): fix them at fp32.
    scale = tl.cast(scale, tl.float32)
    N = _aligned(N, ALIGN)
    K = _aligned(K, ALIGN)
    stride_ab = _aligned(stride_ab, ALIGN)
    stride_am = _aligned(stride_am, ALIGN)
    stride_gb = _aligned(stride_gb, ALIGN)
    stride_gm = _aligned(stride_gm, ALIGN)
    grid_k = tl.cdiv(K, TILE_K)
    grid_n = tl.cdiv(N, TILE_N)
    pid = tl.program_id(0)
    part = pid % SPLIT
    pid = pid // SPLIT
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
        if WALK:
            count = list_len
        else:
            count = tl.load(col_count_ptr + line)
    n0 = pid_n * TILE_N
    entries = col_index_ptr + line.to(tl.int64) * list_len
    TILES_PER_BLOCK: tl.constexpr = BLOCK_ROWS // TILE_M

    offs_k = k0 + tl.arange(0, TILE_K)
    offs_n = n0 + tl.arange(0, TILE_N)
    offs_m = tl.arange(0, TILE_M)
    steps = count * TILES_PER_BLOCK
    share = tl.cdiv(steps, SPLIT)
    first = part * share
    last = tl.minimum(steps, first + share)
    acc = tl.zeros((TILE_K, TILE_N), dtype=tl.float32)
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a, shape=[B, M, K], strides=[stride_ab, stride_am, 1],
                                           block_shape=[1, TILE_M, TILE_K])
        g_desc = tl.make_tensor_descriptor(g, shape=[B, M, N], strides=[stride_gb, stride_gm, 1],
                                           block_shape=[1, TILE_M, TILE_N])
        for it in range(first, last):
            e = tl.load(entries + it // TILES_PER_BLOCK).to(tl.int32)
            bat = ob + e // n_rblk
            m_start = (e % n_rblk) * BLOCK_ROWS + (it % TILES_PER_BLOCK) * TILE_M
            a_t = a_desc.load([bat, m_start, k0]).reshape(TILE_M, TILE_K)
            g_t = g_desc.load([bat, m_start, n0]).reshape(TILE_M, TILE_N)
            if GRAD_KEEP:
                g_t = _keep_block(g_t, g_keep_ptr, bat, m_start, n0, stride_gkb, stride_gkr, stride_gkc, BLOCK_ROWS, BLOCK_COLS)
            acc = _mma(acc, a_t.T, g_t, PRECISION, False)
    else:
        a_cols = a + offs_k[None, :] * stride_ak
        g_cols = g + offs_n[None, :] * stride_gn
        for it in range(first, last):
            if WALK:
                e = it // TILES_PER_BLOCK
            else:
                e = tl.load(entries + it // TILES_PER_BLOCK).to(tl.int32)
            bat = (ob + e // n_rblk).to(tl.int64)
            ms = (e % n_rblk) * BLOCK_ROWS + (it % TILES_PER_BLOCK) * TILE_M + offs_m
            r0 = (e % n_rblk) * BLOCK_ROWS
            a_t = _load_tile_of_block(a_cols + bat * stride_ab + ms[:, None] * stride_am, ms, offs_k, M, K, keep_ptr, bat,
                                      r0, k0, stride_kb, stride_kr, stride_kc, BLOCK_ROWS, BLOCK_COLS, WALK, MASK_M, MASK_K)
            g_t = _load_tile_of_block(g_cols + bat * stride_gb + ms[:, None] * stride_gm, ms, offs_n, M, N, g_keep_ptr, bat,
                                      r0, n0, stride_gkb, stride_gkr, stride_gkc, BLOCK_ROWS, BLOCK_COLS, GRAD_KEEP, MASK_M,
                                      MASK_N)
            acc = _mma(acc, tl.trans(a_t), g_t, PRECISION, UPCAST)

    if SPLIT > 1:
        ptrs = part_ptr + ((part * Bo + ob).to(tl.int64) * K + offs_k[:, None]) * N + offs_n[None, :]
        _store_tile(ptrs, acc * scale, offs_k, offs_n, K, N, MASK_K, MASK_N)
        return
    val = (acc * scale).to(out_ptr.dtype.element_ty)
    if OUT_DESC:
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[Bo, K, N], strides=[stride_ob, stride_ok, 1],
                                             block_shape=[1, TILE_K, TILE_N])
        out_desc.store([ob, k0, n0], val.reshape(1, TILE_K, TILE_N))
    else:
        ptrs = out_ptr + ob.to(tl.int64) * stride_ob + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on
        _store_tile(ptrs, val, offs_k, offs_n, K, N, MASK_K, MASK_N)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, K, N, stride_ps, stride_ob, stride_ok, stride_on,
                       SPLIT: tl.constexpr, TILE_K: tl.constexpr, TILE_N: tl.constexpr):
    """out[ob] = Σ_s part[s, ob] for _dsd_tn_kernel's SPLIT partial sums, added in split order
    (the same order every call: the result does not depend on which program finished first).
    ``part_ptr`` is (SPLIT, Bo, K, N) contiguous, ``stride_ps`` = Bo * K * N."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    ob = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * TILE_K + tl.arange(0, TILE_K)
    offs_n = pid_n * TILE_N + tl.arange(0, TILE_N)
    inside = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    src = part_ptr + (ob * K + offs_k[:, None]) * N + offs_n[None, :]
    acc = tl.zeros((TILE_K, TILE_N), dtype=tl.float32)
    for _ in tl.static_range(SPLIT):
        acc += tl.load(src, mask=inside, other=0.0)
        src += stride_ps  # a step at a time: s * stride_ps could pass int32 where stride_ps does not
    dst = out_ptr + ob * stride_ob + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, cols, stride_src, stride_dst, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """dst[r, :cols] = src[r, :cols]: a matrix copied into rows of another stride (the Hopper
    launchers' copy of a right operand whose rows are not 32-byte aligned, into rows that are).
    One program a row and BLOCK columns. ALIGN (see _aligned) divides cols and the source's row
    stride: the column mask is then constant over ALIGN elements, and the loads and stores that
    wide (with a bare cols of 3000 they were one element each, and the copy 2-3x slower)."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < _aligned(cols, ALIGN)
    v = tl.load(src_ptr + r * _aligned(stride_src, ALIGN) + c, mask=ok)
    tl.store(dst_ptr + r * stride_dst + c, v, mask=ok)


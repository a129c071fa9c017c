"""The block-sparse matmul kernels of SparseDrop (``@triton.jit`` code only; the host side,
configs and launchers are in ``block_sparse_matmul_triton.py``, the plain-PyTorch oracle in
``block_sparse_matmul.py``).

    _dsd_kernel     out = scale * (a ⊙ m) @ b (+ bias)        dense out, sparse lhs
                    [⊙ m_out: OUT_KEEP, dropped output tiles skipped]
    _sdd_kernel     out = (scale * (g [⊙ m_red]) @ bᵀ [+ bias_scale * bias]) ⊙ m     sparse out
                    [m_red: RED_KEEP, the reduction visits only g's kept blocks]
    _dsd_tn_kernel  out = scale * (a ⊙ m)ᵀ @ (g [⊙ m_g])      dense out, sparse (transposed) lhs
                    [m_g: GRAD_KEEP, g's dropped blocks read as zeros]

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
    WALK: tl.constexpr,
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
    """
    tl.static_assert(not (WALK and (USE_TMA or BALANCE)), "WALK takes pointer loads in grid order")
    # Float arguments arrive as fp64 from Inductor's launcher (fp32 from Triton's): fix them at fp32.
    scale = tl.cast(scale, tl.float32)
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
def _sdd_tile(
    g, b, out_ptr, out_desc, bias_ptr, red_count_ptr, red_index_ptr, bat, bat_b, m0, k0, kept,
    M, N, K, n_rblk, n_red_blk,
    stride_gb, stride_gm, stride_gn,
    stride_bb, stride_bk, stride_bn,
    stride_ob, stride_om, stride_ok,
    stride_bias,
    scale, bias_scale,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr,
    MASK_M: tl.constexpr, MASK_N: tl.constexpr, MASK_K: tl.constexpr,
    USE_TMA: tl.constexpr, B_K_CONTIG: tl.constexpr, OUT_DESC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, RED_KEEP: tl.constexpr,
):
    """One TILE_M x TILE_K output tile of sdd at (bat, m0, k0). A dropped tile (``kept`` false)
    runs no reduction step and is stored as zeros. A kept one reduces over N: every TILE_N step,
    or with RED_KEEP only the steps inside g's kept column blocks of its row block (the per-row-
    block lists ``red_count`` / ``red_index``; TILE_N divides BLOCK_COLS), then adds
    ``bias_scale * bias``. With USE_TMA ``g`` and ``b`` are descriptors (built by _sdd_kernel),
    with OUT_DESC ``out_desc`` too; else pointers."""
    offs_m = m0 + tl.arange(0, TILE_M)
    offs_k = k0 + tl.arange(0, TILE_K)
    offs_n = tl.arange(0, TILE_N)
    acc = tl.zeros((TILE_M, TILE_K), dtype=tl.float32)
    RED_TPB: tl.constexpr = BLOCK_COLS // TILE_N
    if RED_KEEP:
        line = bat * n_rblk + m0 // BLOCK_ROWS
        n_iter = tl.where(kept, tl.load(red_count_ptr + line), 0) * RED_TPB
        red_blocks = red_index_ptr + line.to(tl.int64) * n_red_blk
    else:
        n_iter = tl.where(kept, tl.cdiv(N, TILE_N), 0)
        red_blocks = red_index_ptr
    if USE_TMA:
        for it in range(0, n_iter):
            if RED_KEEP:
                n_start = tl.load(red_blocks + it // RED_TPB).to(tl.int32) * BLOCK_COLS + (it % RED_TPB) * TILE_N
            else:
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
            if RED_KEEP:
                ns = tl.load(red_blocks + it // RED_TPB).to(tl.int32) * BLOCK_COLS + (it % RED_TPB) * TILE_N + offs_n
            else:
                ns = it * TILE_N + offs_n
            g_t = _load_tile(g_rows + ns[None, :] * stride_gn, offs_m, ns, M, N, MASK_M, MASK_N)
            bt_t = _load_tile(bt_cols + ns[:, None] * stride_bn, ns, offs_k, N, K, MASK_N, MASK_K)
            acc = _mma(acc, g_t, bt_t, PRECISION, UPCAST)

    acc = acc * scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_k * stride_bias, mask=offs_k < K, other=0.0)
        acc = acc + tl.where(kept, bias.to(tl.float32) * bias_scale, 0.0)[None, :]
    val = acc.to(out_ptr.dtype.element_ty)
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
def _sdd_b_desc(b_ptr, Bb, N, K, stride_bb, stride_bk, stride_bn, TILE_N: tl.constexpr, TILE_K: tl.constexpr,
                B_K_CONTIG: tl.constexpr):
    """Descriptor over sdd's b: rows of (N, K) when K is contiguous (b = weight.t()), else (K, N)."""
    if B_K_CONTIG:
        return tl.make_tensor_descriptor(b_ptr, shape=[Bb, N, K], strides=[stride_bb, stride_bn, 1],
                                         block_shape=[1, TILE_N, TILE_K])
    else:
        return tl.make_tensor_descriptor(b_ptr, shape=[Bb, K, N], strides=[stride_bb, stride_bk, 1],
                                         block_shape=[1, TILE_K, TILE_N])


@triton.jit
def _sdd_kernel(
    g_ptr, b_ptr, out_ptr, keep_ptr, count_ptr, index_ptr, bias_ptr, red_count_ptr, red_index_ptr,
    B, M, N, K, Bb, n_rblk, n_cblk, n_lines, n_red_blk,
    stride_gb, stride_gm, stride_gn,
    stride_bb, stride_bk, stride_bn,
    stride_ob, stride_om, stride_ok,
    stride_keep_b, stride_keep_r, stride_keep_c,
    stride_bias,
    scale, bias_scale,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr, GROUP: tl.constexpr,
    MASK_M: tl.constexpr, MASK_N: tl.constexpr, MASK_K: tl.constexpr,
    USE_TMA: tl.constexpr, B_K_CONTIG: tl.constexpr, OUT_DESC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    PERSISTENT: tl.constexpr, SPLIT_TAIL: tl.constexpr, HALF_K: tl.constexpr, LINES: tl.constexpr,
    HAS_BIAS: tl.constexpr, RED_KEEP: tl.constexpr,
):
    """out[bat] = (scale * (g[bat] [⊙ m_red]) @ b[bat % Bb]ᵀ [+ bias_scale * bias]) ⊙ m.

    HAS_BIAS adds the bias (over out's columns) in kept tiles only; RED_KEEP skips g's dropped
    blocks in the reduction (see _sdd_tile). Without either it is dY·W's sparse gradient.

    Not PERSISTENT: one program per (bat, M tile, K tile). A tile lies inside one mask block. A
    dropped block gets a zero trip count, so its programs skip every load and store zeros: the
    output needs no separate zero fill.

    PERSISTENT (grid = the number of CTAs that fit on the GPU at once, S): every kept tile costs
    the same full reduction over N (with RED_KEEP, its row block's kept share of it), so what matters is how many of them each slot runs. The S
    programs deal the kept tiles out round-robin (kept-first order, row-major over the kept
    blocks, so tiles running side by side share g rows and b columns in L2): F = kept // S full
    rounds, then R = kept % S tiles left. Those R would take a whole tile time on R slots while
    S - R idle; with SPLIT_TAIL and 2R <= S each is cut into two TILE_M x TILE_K/2 halves (own
    output columns, no reduction across programs, no atomics) run by 2R programs. Then each
    program stores zeros into its share of the dropped tiles (cheap, and overlapping the other
    programs' matmuls).
    """
    # Float arguments arrive as fp64 from Inductor's launcher (fp32 from Triton's): fix them at fp32.
    scale = tl.cast(scale, tl.float32)
    bias_scale = tl.cast(bias_scale, tl.float32)
    # Descriptors are built once per program (a persistent program reuses them for all its tiles).
    # The persistent schedule stores through pointers: its tiles include split halves.
    if USE_TMA:
        g = tl.make_tensor_descriptor(g_ptr, shape=[B, M, N], strides=[stride_gb, stride_gm, 1],
                                      block_shape=[1, TILE_M, TILE_N])
        b = _sdd_b_desc(b_ptr, Bb, N, K, stride_bb, stride_bk, stride_bn, TILE_N, TILE_K, B_K_CONTIG)
        if SPLIT_TAIL:
            b_half = _sdd_b_desc(b_ptr, Bb, N, K, stride_bb, stride_bk, stride_bn, TILE_N, HALF_K, B_K_CONTIG)
        else:
            b_half = b
    else:
        g, b, b_half = g_ptr, b_ptr, b_ptr
    if OUT_DESC and not PERSISTENT:
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[B, M, K], strides=[stride_ob, stride_om, 1],
                                             block_shape=[1, TILE_M, TILE_K])
    else:
        out_desc = out_ptr
    if PERSISTENT:
        pid = tl.program_id(0)
        S = tl.num_programs(0)
        TPB: tl.constexpr = (BLOCK_ROWS // TILE_M) * (BLOCK_COLS // TILE_K)
        lanes = tl.arange(0, LINES)
        kept = tl.sum(tl.load(count_ptr + lanes, mask=lanes < n_lines, other=0), 0) * TPB
        rounds = kept // S
        rest = kept - rounds * S
        for i in range(0, rounds):
            bat, m0, k0 = _sdd_kept_unit(pid + i * S, count_ptr, index_ptr, n_lines, n_rblk, n_cblk,
                                         BLOCK_ROWS, BLOCK_COLS, TILE_M, TILE_K, LINES)
            # Tiles of a ragged last block that lie wholly past M or K: nothing to compute.
            _sdd_tile(g, b, out_ptr, out_desc, bias_ptr, red_count_ptr, red_index_ptr, bat, bat % Bb, m0, k0, (m0 < M) & (k0 < K),
                      M, N, K, n_rblk, n_red_blk,
                      stride_gb, stride_gm, stride_gn, stride_bb, stride_bk, stride_bn, stride_ob, stride_om, stride_ok,
                      stride_bias, scale, bias_scale, BLOCK_ROWS, BLOCK_COLS, TILE_M, TILE_N, TILE_K, MASK_M, MASK_N, MASK_K,
                      USE_TMA, B_K_CONTIG, False, PRECISION, UPCAST, HAS_BIAS, RED_KEEP)
        split = False
        if SPLIT_TAIL:
            split = 2 * rest <= S
        # HALF_K: TILE_K // 2 with SPLIT_TAIL, else TILE_K. Triton compiles the split branch even
        # without SPLIT_TAIL (it never runs then): its tiles stay whole there, the shape b_half
        # (= b) was built for.
        if split:
            if pid < 2 * rest:
                bat, m0, k0 = _sdd_kept_unit(rounds * S + pid // 2, count_ptr, index_ptr, n_lines, n_rblk, n_cblk,
                                             BLOCK_ROWS, BLOCK_COLS, TILE_M, TILE_K, LINES)
                k0 = k0 + (pid % 2) * HALF_K
                _sdd_tile(g, b_half, out_ptr, out_ptr, bias_ptr, red_count_ptr, red_index_ptr, bat, bat % Bb, m0, k0, (m0 < M) & (k0 < K),
                          M, N, K, n_rblk, n_red_blk,
                          stride_gb, stride_gm, stride_gn, stride_bb, stride_bk, stride_bn, stride_ob, stride_om, stride_ok,
                          stride_bias, scale, bias_scale, BLOCK_ROWS, BLOCK_COLS, TILE_M, TILE_N, HALF_K, MASK_M, MASK_N, MASK_K,
                          USE_TMA, B_K_CONTIG, False, PRECISION, UPCAST, HAS_BIAS, RED_KEEP)
        else:
            if pid < rest:
                bat, m0, k0 = _sdd_kept_unit(rounds * S + pid, count_ptr, index_ptr, n_lines, n_rblk, n_cblk,
                                             BLOCK_ROWS, BLOCK_COLS, TILE_M, TILE_K, LINES)
                _sdd_tile(g, b, out_ptr, out_desc, bias_ptr, red_count_ptr, red_index_ptr, bat, bat % Bb, m0, k0, (m0 < M) & (k0 < K),
                          M, N, K, n_rblk, n_red_blk,
                          stride_gb, stride_gm, stride_gn, stride_bb, stride_bk, stride_bn, stride_ob, stride_om, stride_ok,
                          stride_bias, scale, bias_scale, BLOCK_ROWS, BLOCK_COLS, TILE_M, TILE_N, TILE_K, MASK_M, MASK_N, MASK_K,
                          USE_TMA, B_K_CONTIG, False, PRECISION, UPCAST, HAS_BIAS, RED_KEEP)
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
                _sdd_tile(g, b, out_ptr, out_desc, bias_ptr, red_count_ptr, red_index_ptr, bat, bat % Bb, m0, k0, False,
                          M, N, K, n_rblk, n_red_blk,
                          stride_gb, stride_gm, stride_gn, stride_bb, stride_bk, stride_bn, stride_ob, stride_om, stride_ok,
                          stride_bias, scale, bias_scale, BLOCK_ROWS, BLOCK_COLS, TILE_M, TILE_N, TILE_K, MASK_M, MASK_N, MASK_K,
                          USE_TMA, B_K_CONTIG, False, PRECISION, UPCAST, HAS_BIAS, RED_KEEP)
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
        _sdd_tile(g, b, out_ptr, out_desc, bias_ptr, red_count_ptr, red_index_ptr, bat, bat % Bb, m0, k0, flag != 0,
                  M, N, K, n_rblk, n_red_blk,
                  stride_gb, stride_gm, stride_gn, stride_bb, stride_bk, stride_bn, stride_ob, stride_om, stride_ok,
                  stride_bias, scale, bias_scale, BLOCK_ROWS, BLOCK_COLS, TILE_M, TILE_N, TILE_K, MASK_M, MASK_N, MASK_K,
                  USE_TMA, B_K_CONTIG, OUT_DESC, PRECISION, UPCAST, HAS_BIAS, RED_KEEP)


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
    WALK: tl.constexpr, SPLIT: tl.constexpr,
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
    """
    tl.static_assert(not (WALK and (USE_TMA or BALANCE)), "WALK takes pointer loads in grid order")
    # Float arguments arrive as fp64 from Inductor's launcher (fp32 from Triton's): fix them at fp32.
    scale = tl.cast(scale, tl.float32)
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
    for s in tl.static_range(SPLIT):
        acc += tl.load(src + s * stride_ps, mask=inside, other=0.0)
    dst = out_ptr + ob * stride_ob + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=inside)

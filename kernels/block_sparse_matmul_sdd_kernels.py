"""SparseDrop's sparse-output block matmul (``@triton.jit`` code only; the shared helpers and
the dense-output kernels are in ``block_sparse_matmul_kernels.py``, the launcher ``sdd`` in
``block_sparse_matmul_triton.py``).

    _sdd_kernel     out = (scale * (g [⊙ m_red]) @ bᵀ [+ bias_scale * bias]) ⊙ m     sparse out
                    [m_red: RED_KEEP, the reduction visits only g's kept blocks]

It computes the kept output tiles only and writes exact zeros into the dropped ones: the input
gradient of dropout -> matmul, and the forward of a matmul with block dropout on its output.
"""
import triton
import triton.language as tl

from .block_sparse_matmul_kernels import _aligned, _grouped_tile, _load_tile, _mma, _store_tile


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
    HAS_BIAS: tl.constexpr, RED_KEEP: tl.constexpr, ALIGN: tl.constexpr,
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

    ALIGN: N, K, g's batch and row strides and b's strides other than its unit one (over K with
    B_K_CONTIG, else over N) are multiples of it (see _aligned).
    """
    # Float arguments arrive as fp64 from Inductor's launcher (fp32 from Triton's): fix them at fp32.
    scale = tl.cast(scale, tl.float32)
    bias_scale = tl.cast(bias_scale, tl.float32)
    N = _aligned(N, ALIGN)
    K = _aligned(K, ALIGN)
    stride_gb = _aligned(stride_gb, ALIGN)
    stride_gm = _aligned(stride_gm, ALIGN)
    stride_bb = _aligned(stride_bb, ALIGN)
    if B_K_CONTIG:
        stride_bn = _aligned(stride_bn, ALIGN)
    else:
        stride_bk = _aligned(stride_bk, ALIGN)
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

"""The block-sparse matmuls of SparseDrop for Hopper (sm_90), written in Gluon (Triton's explicit
dialect): a producer warp's TMA loads into a ring of shared-memory stages completed on
mbarriers, and asynchronous warpgroup MMAs (wgmma) in the other warps that keep one MMA in flight
while the next stages' copies land (warp specialisation). Kernels only; the host side is in
``block_sparse_matmul_hopper.py`` and the oracle in ``block_sparse_matmul.py``. The portable ``@triton.jit`` kernels stay the path everywhere else
(CPU interpreter, sm80, batched or strided operands).

One kernel serves all three products, as a tiled matmul ``out (R x C) = scale * X @ Y`` whose
operands are read through 2-D descriptors and whose reduction runs over ``D``:

    dsd     X = a (M x K), Y = bᵀ or b;  the reduction visits the kept column blocks of the
            output tile's row block (a per-line kept-block list, ``kept_lists(by="row")``)
    dsd_tn  X = aᵀ (K x M), Y = g (M x N); the reduction visits the kept row blocks of the
            output tile's column block of ``a`` (``kept_lists(by="col" / "col_sum")``)
    sdd     X = g (M x N), Y = bᵀ (N x K); every step, only for the tiles of kept output blocks
            (a flat kept-block list, ``kept_lists(by="all")``); dropped ones get zeros (FLAT);
            with PAIRS a tile is two half tiles in two kept blocks of one column block
            (``kept_pairs``): a tall tile's efficiency where a tile may not cross a mask block

The flat sdd runs with PINGPONG: two consumer warpgroups, a 128 x 128 tile each, take turns at
their main loops, so one's epilogue runs under the other's MMAs (``_consume_turns``).

dsd and dsd_tn take their tiles whole, one per program turn (dealt in a snake order over ranked
lines: ``_dealt_tile``), or with STREAM_K (narrow outputs: fewer tiles than fill the SMs' waves)
as even shares of all tiles' reduction steps, a tile cut between programs summed through fp32
partial sums (the ``_sk_*`` helpers in ``block_sparse_matmul_hopper_stream_k.py``).

An operand whose rows are contiguous is read as it is; one whose columns are contiguous is read
through a descriptor over its transpose, and the shared-memory tile is handed to the MMA
permuted (X_T, Y_T): wgmma reads 16-bit operands of either major order from shared memory.

Gluon kernels cannot run under Triton's interpreter, and Inductor cannot emit them in its own
code: the host calls them only on a Hopper GPU, outside traced code (see the launchers).
"""
import triton  # noqa: F401  (Gluon kernels are compiled by Triton's JIT)
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait

# @triton.jit helpers of scalars (the tile order, the persistent deal): Gluon inlines them too
from .block_sparse_matmul_kernels import _dealt_tile, _dealt_turns, _grouped_tile
from .block_sparse_matmul_hopper_stream_k import _line_layout, _sk_gather, _sk_geometry, _sk_lines_upto, _sk_range, \
    _sk_raise_flag, _sk_segment, _sk_store_partial, _sk_tile
from .gluon_hopper import mma_layout, staged, tma_load, tma_store


@gluon.jit
def _block_tile(index_ptr, entry, sub, n_cblk, BLOCK_ROWS: gl.constexpr, BLOCK_COLS: gl.constexpr,
                STORE_R: gl.constexpr, TILE_C: gl.constexpr):
    """(r0, c0) of (STORE_R x TILE_C) tile ``sub`` of the block listed at index[entry], a block
    number (b*nR + r) * n_cblk + c (batch folded into the rows), its tiles row-major."""
    TILES_C: gl.constexpr = BLOCK_COLS // TILE_C
    blk = gl.load(index_ptr + entry).to(gl.int32)
    return (blk // n_cblk) * BLOCK_ROWS + (sub // TILES_C) * STORE_R, (blk % n_cblk) * BLOCK_COLS + (sub % TILES_C) * TILE_C


@gluon.jit
def _tile_info(tile, R, C, D, n_lines, line_len, count_ptr, index_ptr, order_ptr,
               BLOCK_ROWS: gl.constexpr, BLOCK_COLS: gl.constexpr, TILE_R: gl.constexpr, TILE_C: gl.constexpr,
               TILE_D: gl.constexpr, GROUP: gl.constexpr, FLAT: gl.constexpr, PAIRS: gl.constexpr,
               STORE_R: gl.constexpr, LINE_OF_COL: gl.constexpr, LINE_BLOCK: gl.constexpr, RED_BLOCK: gl.constexpr,
               BALANCE: gl.constexpr):
    """Output tile number -> (r0, c0, reduction steps, aux): aux is the offset of the tile's
    line's list (lists), or with PAIRS the first row of the tile's second half.

    FLAT: tiles of the kept blocks of a flat list (``kept_lists(by="all")``, line_len holds the
    blocks per row), each with the whole reduction; with PAIRS the list holds pairs of blocks of
    one column (``kept_pairs``) and a tile's two halves (STORE_R rows each) lie one in each.
    Otherwise the tile's line (along the rows, or with LINE_OF_COL along the columns: the caller
    swapped the operands to store a column-major output) lists the kept blocks its reduction
    visits; BALANCE takes lines in ``order_ptr``'s order, most kept blocks first (longest job
    first, as in the portable kernels)."""
    if FLAT:
        TILES_PER_BLOCK: gl.constexpr = (BLOCK_ROWS // STORE_R) * (BLOCK_COLS // TILE_C)
        unit = tile // TILES_PER_BLOCK
        sub = tile % TILES_PER_BLOCK
        if PAIRS:
            r0, c0 = _block_tile(index_ptr, 2 * unit, sub, line_len, BLOCK_ROWS, BLOCK_COLS, STORE_R, TILE_C)
            aux, _c = _block_tile(index_ptr, 2 * unit + 1, sub, line_len, BLOCK_ROWS, BLOCK_COLS, STORE_R, TILE_C)
        else:
            r0, c0 = _block_tile(index_ptr, unit, sub, line_len, BLOCK_ROWS, BLOCK_COLS, STORE_R, TILE_C)
            aux = r0 * 0
        steps = gl.cdiv(D, TILE_D) + r0 * 0
    else:
        r0, c0, steps, aux = _listed_tile(
            tile, R, C, n_lines, line_len, count_ptr, order_ptr, TILE_R, TILE_C, TILE_D, GROUP, LINE_OF_COL,
            LINE_BLOCK, RED_BLOCK, BALANCE)
    return r0, c0, steps, aux


@gluon.jit
def _listed_tile(tile, R, C, n_lines, line_len, count_ptr, order_ptr, TILE_R: gl.constexpr, TILE_C: gl.constexpr,
                 TILE_D: gl.constexpr, GROUP: gl.constexpr, LINE_OF_COL: gl.constexpr, LINE_BLOCK: gl.constexpr,
                 RED_BLOCK: gl.constexpr, BALANCE: gl.constexpr):
    if LINE_OF_COL:
        TILE_L: gl.constexpr = TILE_C
        L = C
        grid_o = gl.cdiv(R, TILE_R)
    else:
        TILE_L: gl.constexpr = TILE_R
        L = R
        grid_o = gl.cdiv(C, TILE_C)
    if BALANCE:
        TILES_PER_LINE: gl.constexpr = LINE_BLOCK // TILE_L
        pid_l, pid_o = _grouped_tile(tile, n_lines * TILES_PER_LINE, grid_o, GROUP)
        line = gl.load(order_ptr + pid_l // TILES_PER_LINE)
        l0 = line * LINE_BLOCK + (pid_l % TILES_PER_LINE) * TILE_L
    else:
        pid_l, pid_o = _grouped_tile(tile, gl.cdiv(L, TILE_L), grid_o, GROUP)
        l0 = pid_l * TILE_L
        line = l0 // LINE_BLOCK
    if LINE_OF_COL:
        r0 = pid_o * TILE_R
        c0 = l0
    else:
        r0 = l0
        c0 = pid_o * TILE_C
    steps = gl.where(l0 < L, gl.load(count_ptr + line) * (RED_BLOCK // TILE_D), 0)
    return r0, c0, steps, line * line_len


@gluon.jit
def _mma_steps(x_smem, y_smem, ready, empty, acc, used, n_steps, STAGES: gl.constexpr, X_T: gl.constexpr,
               Y_T: gl.constexpr, handoff=None):
    """n_steps MMAs on the next ready stages, one in flight; each stage is released (``empty``)
    once the MMA after it is issued and it is done, the last one once all are done. ``handoff``
    (an mbarrier; PINGPONG) is arrived on once the last MMA is issued: the other consumer may then
    wait for its own stages (see _consume_turns)."""
    for step in range(n_steps):
        stage = used % STAGES
        mbarrier.wait(ready.index(stage), (used // STAGES) & 1)
        xs = x_smem.index(stage)
        ys = y_smem.index(stage)
        if X_T:
            xs = xs.permute((1, 0))
        if Y_T:
            ys = ys.permute((1, 0))
        acc = warpgroup_mma(xs, ys, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        mbarrier.arrive(empty.index((used + STAGES - 1) % STAGES), pred=step > 0)  # the previous step's
        used += 1
    if handoff is not None:
        mbarrier.arrive(handoff)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index((used + STAGES - 1) % STAGES), pred=n_steps > 0)
    return acc, used


@gluon.jit
def _step_offset(index_ptr, aux, step, RED_BLOCK: gl.constexpr, TILE_D: gl.constexpr, FLAT: gl.constexpr):
    """Where reduction step ``step`` of a tile starts along D: every step (FLAT), or the step's
    place in the kept block its line's list (at index + aux) names."""
    if FLAT:
        d0 = step * TILE_D
    else:
        SUB: gl.constexpr = RED_BLOCK // TILE_D
        entry = gl.load(index_ptr + aux + step // SUB).to(gl.int32)
        d0 = entry * RED_BLOCK + (step % SUB) * TILE_D
    return d0


@gluon.jit
def _issue_load(x_desc, y_desc, x_smem, y_smem, ready, load, d0, r0, c0, aux, STAGES: gl.constexpr,
                PAIRS: gl.constexpr, STORE_R: gl.constexpr, X_T: gl.constexpr, Y_T: gl.constexpr):
    """Start the TMA copies of the reduction step at ``d0`` of a tile into stage ``load % STAGES``.
    With PAIRS the X tile is two copies, rows r0 and aux."""
    s = load % STAGES
    bar = ready.index(s)
    X_COPIES: gl.constexpr = 1 + PAIRS
    mbarrier.expect(bar, X_COPIES * x_desc.block_type.nbytes + y_desc.block_type.nbytes)
    if PAIRS:
        xs = x_smem.index(s)
        tma_load(x_desc, [r0, d0], bar, xs.slice(0, STORE_R))
        tma_load(x_desc, [aux, d0], bar, xs.slice(STORE_R, STORE_R))
    elif X_T:
        tma_load(x_desc, [d0, r0], bar, x_smem.index(s))
    else:
        tma_load(x_desc, [r0, d0], bar, x_smem.index(s))
    if Y_T:
        tma_load(y_desc, [c0, d0], bar, y_smem.index(s))
    else:
        tma_load(y_desc, [d0, c0], bar, y_smem.index(s))


@gluon.jit
def _epilogue(acc, out_desc, out_smem, bias_ptr, r0, c0, aux, C, scale, bias_scale, acc_layout: gl.constexpr,
              dtype: gl.constexpr, TILE_C: gl.constexpr, STORE_R: gl.constexpr, PAIRS: gl.constexpr,
              HAS_BIAS: gl.constexpr):
    """A finished tile: scale, bias, through shared memory to one TMA store (PAIRS: one a half,
    the second skipped when the pair is one block twice). The store completes under the next
    tile's main loop."""
    acc = acc * scale
    if HAS_BIAS:
        offs_c = c0 + gl.arange(0, TILE_C, layout=gl.SliceLayout(0, acc_layout))
        bias = gl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.0).to(gl.float32)
        acc = acc + bias_scale * bias[None, :]
    tma.store_wait(pendings=0)  # the previous tile's store has read out_smem
    out_smem.store(acc.to(dtype))
    fence_async_shared()
    if PAIRS:
        tma_store(out_desc, [r0, c0], out_smem.slice(0, STORE_R))
        if aux != r0:
            tma_store(out_desc, [aux, c0], out_smem.slice(STORE_R, STORE_R))
    else:
        tma_store(out_desc, [r0, c0], out_smem)


@gluon.jit
def _load_tiles(x_desc, y_desc, x_smem, y_smem, ready, empty, n_tiles, R, C, D, n_lines, line_len, count_ptr,
                index_ptr, order_ptr, sched_ptr, BLOCK_ROWS: gl.constexpr, BLOCK_COLS: gl.constexpr,
                TILE_R: gl.constexpr, TILE_C: gl.constexpr, TILE_D: gl.constexpr, STAGES: gl.constexpr,
                GROUP: gl.constexpr, FLAT: gl.constexpr, PAIRS: gl.constexpr, STORE_R: gl.constexpr,
                LINE_OF_COL: gl.constexpr, LINE_BLOCK: gl.constexpr, RED_BLOCK: gl.constexpr, BALANCE: gl.constexpr,
                SNAKE: gl.constexpr, STREAM_K: gl.constexpr, X_T: gl.constexpr, Y_T: gl.constexpr):
    """The producer partition (one warp): the program's tiles (or stream-K segments) in order,
    each step's copies into the next stage once the consumers have released it (``empty``); the
    list reads and TMA issues stay off the MMA warps' path."""
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    loads = pid * 0
    if STREAM_K:
        SUB: gl.constexpr = RED_BLOCK // TILE_D
        per_line, grid_o = _sk_geometry(R, C, n_lines, TILE_R, TILE_C, LINE_OF_COL, LINE_BLOCK)
        total, begin, end, t_b, t_e, partial, n_segments = _sk_range(sched_ptr, n_lines, per_line, SUB,
                                                                     _line_layout(1))
        for seg in range(n_segments):
            t, ts, s0, s1, publish, gather = _sk_segment(seg, n_segments, begin, end, t_b, t_e, partial, sched_ptr,
                                                         per_line, SUB)
            r0, c0, aux = _sk_tile(t, order_ptr, per_line, grid_o, line_len, TILE_R, TILE_C, LINE_OF_COL, LINE_BLOCK)
            loads = _load_steps(x_desc, y_desc, x_smem, y_smem, ready, empty, loads, s0, s1, r0, c0, aux, index_ptr,
                                RED_BLOCK, TILE_D, STAGES, FLAT, PAIRS, STORE_R, X_T, Y_T)
    else:
        for turn in range(_dealt_turns(n_tiles, pid, programs, SNAKE)):
            r0, c0, steps, aux = _tile_info(
                _dealt_tile(turn, pid, programs, SNAKE), R, C, D, n_lines, line_len, count_ptr, index_ptr, order_ptr,
                BLOCK_ROWS, BLOCK_COLS, TILE_R, TILE_C, TILE_D, GROUP, FLAT, PAIRS, STORE_R, LINE_OF_COL, LINE_BLOCK,
                RED_BLOCK, BALANCE)
            loads = _load_steps(x_desc, y_desc, x_smem, y_smem, ready, empty, loads, 0, steps, r0, c0, aux, index_ptr,
                                RED_BLOCK, TILE_D, STAGES, FLAT, PAIRS, STORE_R, X_T, Y_T)


@gluon.jit
def _load_steps(x_desc, y_desc, x_smem, y_smem, ready, empty, loads, s0, s1, r0, c0, aux, index_ptr,
                RED_BLOCK: gl.constexpr, TILE_D: gl.constexpr, STAGES: gl.constexpr, FLAT: gl.constexpr,
                PAIRS: gl.constexpr, STORE_R: gl.constexpr, X_T: gl.constexpr, Y_T: gl.constexpr):
    """Steps s0..s1 of a tile, each into the next stage once it is free; returns the loads so far.
    A step's list entry is read before the wait for its stage, so that the read's latency passes
    while the ring is full, not between the stage's release and its refill."""
    for step in range(s0, s1):
        d0 = _step_offset(index_ptr, aux, step, RED_BLOCK, TILE_D, FLAT)
        # a barrier starts as if its phase 1 had completed: the first round does not wait
        mbarrier.wait(empty.index(loads % STAGES), ((loads // STAGES) & 1) ^ 1)
        _issue_load(x_desc, y_desc, x_smem, y_smem, ready, loads, d0, r0, c0, aux, STAGES, PAIRS, STORE_R, X_T, Y_T)
        loads += 1
    return loads


@gluon.jit
def _consume_tiles(x_smem, y_smem, out_smem, ready, empty, out_desc, bias_ptr, n_tiles, R, C, D, n_lines, line_len,
                   count_ptr, index_ptr, order_ptr, sched_ptr, part_ptr, scale, bias_scale, dtype: gl.constexpr,
                   acc_layout: gl.constexpr, BLOCK_ROWS: gl.constexpr, BLOCK_COLS: gl.constexpr,
                   TILE_R: gl.constexpr, TILE_C: gl.constexpr, TILE_D: gl.constexpr, STAGES: gl.constexpr,
                   GROUP: gl.constexpr, FLAT: gl.constexpr, PAIRS: gl.constexpr, STORE_R: gl.constexpr,
                   LINE_OF_COL: gl.constexpr, LINE_BLOCK: gl.constexpr, RED_BLOCK: gl.constexpr,
                   BALANCE: gl.constexpr, SNAKE: gl.constexpr, STREAM_K: gl.constexpr, HAS_BIAS: gl.constexpr,
                   X_T: gl.constexpr, Y_T: gl.constexpr, WARPS: gl.constexpr):
    """The consumer partition (the kernel's warps): per tile (or stream-K segment), the MMAs over
    its ready stages, then the epilogue (or the partial sum's publication)."""
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    used = pid * 0
    if STREAM_K:
        SUB: gl.constexpr = RED_BLOCK // TILE_D
        TILE: gl.constexpr = TILE_R * TILE_C
        flags = sched_ptr + n_lines + 1
        per_line, grid_o = _sk_geometry(R, C, n_lines, TILE_R, TILE_C, LINE_OF_COL, LINE_BLOCK)
        total, begin, end, t_b, t_e, partial, n_segments = _sk_range(sched_ptr, n_lines, per_line, SUB,
                                                                     _line_layout(WARPS))
        stored = pid < 0  # a partial sum stored, its flag not yet raised
        for seg in range(n_segments):
            t, ts, s0, s1, publish, gather = _sk_segment(seg, n_segments, begin, end, t_b, t_e, partial, sched_ptr,
                                                         per_line, SUB)
            r0, c0, aux = _sk_tile(t, order_ptr, per_line, grid_o, line_len, TILE_R, TILE_C, LINE_OF_COL, LINE_BLOCK)
            acc = gl.zeros((TILE_R, TILE_C), gl.float32, layout=acc_layout)
            acc, used = _mma_steps(x_smem, y_smem, ready, empty, acc, used, s1 - s0, STAGES, X_T, Y_T)
            if stored:
                _sk_raise_flag(flags + pid)
            stored = publish
            if publish:
                _sk_store_partial(acc, part_ptr + pid * TILE, TILE_R, TILE_C, acc_layout)
            else:
                if gather:
                    acc = _sk_gather(acc, ts, total, part_ptr, flags, TILE_R, TILE_C, acc_layout)
                _epilogue(acc, out_desc, out_smem, bias_ptr, r0, c0, aux, C, scale, bias_scale, acc_layout, dtype,
                          TILE_C, STORE_R, PAIRS, HAS_BIAS)
        if stored:
            _sk_raise_flag(flags + pid)
        # the tiles of lines with nothing kept (ranked last): zeros, plus the bias
        kept_tiles = _sk_lines_upto(total - 1, sched_ptr, n_lines, SUB * per_line, 128, _line_layout(WARPS)) * per_line
        for t in range(kept_tiles + pid, n_tiles, programs):
            r0, c0, aux = _sk_tile(t, order_ptr, per_line, grid_o, line_len, TILE_R, TILE_C, LINE_OF_COL, LINE_BLOCK)
            _epilogue(gl.zeros((TILE_R, TILE_C), gl.float32, layout=acc_layout), out_desc, out_smem, bias_ptr, r0, c0,
                      aux, C, scale, bias_scale, acc_layout, dtype, TILE_C, STORE_R, PAIRS, HAS_BIAS)
    else:
        for turn in range(_dealt_turns(n_tiles, pid, programs, SNAKE)):
            r0, c0, steps, aux = _tile_info(
                _dealt_tile(turn, pid, programs, SNAKE), R, C, D, n_lines, line_len, count_ptr, index_ptr, order_ptr,
                BLOCK_ROWS, BLOCK_COLS, TILE_R, TILE_C, TILE_D, GROUP, FLAT, PAIRS, STORE_R, LINE_OF_COL, LINE_BLOCK,
                RED_BLOCK, BALANCE)
            acc = gl.zeros((TILE_R, TILE_C), gl.float32, layout=acc_layout)
            acc, used = _mma_steps(x_smem, y_smem, ready, empty, acc, used, steps, STAGES, X_T, Y_T)
            _epilogue(acc, out_desc, out_smem, bias_ptr, r0, c0, aux, C, scale, bias_scale, acc_layout, dtype,
                      TILE_C, STORE_R, PAIRS, HAS_BIAS)


@gluon.jit
def _consume_turns(out_smem, x_smem, y_smem, ready, empty, turn, out_desc, bias_ptr, n_tiles, R, C, D, n_lines,
                   line_len, count_ptr, index_ptr, order_ptr, scale, bias_scale, dtype: gl.constexpr,
                   acc_layout: gl.constexpr, BLOCK_ROWS: gl.constexpr, BLOCK_COLS: gl.constexpr,
                   TILE_R: gl.constexpr, TILE_C: gl.constexpr, TILE_D: gl.constexpr, STAGES: gl.constexpr,
                   GROUP: gl.constexpr, FLAT: gl.constexpr, LINE_OF_COL: gl.constexpr, LINE_BLOCK: gl.constexpr,
                   RED_BLOCK: gl.constexpr, BALANCE: gl.constexpr, HAS_BIAS: gl.constexpr, X_T: gl.constexpr,
                   Y_T: gl.constexpr, ROLE: gl.constexpr):
    """One of PINGPONG's two consumer warpgroups: of the program's tiles, those of parity ROLE,
    each in its own accumulator, so that one warpgroup's epilogue runs while the other's MMAs
    keep the tensor cores busy.

    The two take turns at their main loops (``turn``: ROLE waits on its own barrier, and arrives
    on the other's once its last MMA is issued). The turns are what make the shared ring safe:
    stage waits go by phase parity, so a consumer may only wait for a stage once every earlier
    load in the ring has been seen complete, and the other consumer's tile, loaded just before,
    is seen complete by it before it hands the turn over. A consumer steps its ring count over
    the other's tiles (their step counts, read as the producer reads them).

    Flat tiles only (the sdd's): with listed ones (dsd, dsd_tn, long reductions) two 128 x 128
    tiles ran 1-13 % slower than one 128 x 256 tile of two cooperating warpgroups (session 22,
    call 1), and stream-K's partial sums are not written here."""
    gl.static_assert(FLAT, "PINGPONG serves flat tile lists only")
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    used = pid * 0
    turns = pid * 0
    k = pid * 0  # the program's tiles alternate, its first warpgroup 0's
    for tile in range(pid, n_tiles, programs):
        r0, c0, steps, aux = _tile_info(
            tile, R, C, D, n_lines, line_len, count_ptr, index_ptr, order_ptr, BLOCK_ROWS, BLOCK_COLS, TILE_R,
            TILE_C, TILE_D, GROUP, FLAT, False, TILE_R, LINE_OF_COL, LINE_BLOCK, RED_BLOCK, BALANCE)
        if (k & 1) == ROLE:
            # warpgroup 0's first wait passes (a fresh barrier reads as if phase 1 had completed)
            mbarrier.wait(turn.index(ROLE), (turns & 1) ^ (1 - ROLE))
            acc = gl.zeros((TILE_R, TILE_C), gl.float32, layout=acc_layout)
            acc, used = _mma_steps(x_smem, y_smem, ready, empty, acc, used, steps, STAGES, X_T, Y_T,
                                   turn.index(1 - ROLE))
            turns += 1
            _epilogue(acc, out_desc, out_smem, bias_ptr, r0, c0, aux, C, scale, bias_scale, acc_layout, dtype,
                      TILE_C, TILE_R, False, HAS_BIAS)
        else:
            used += steps
        k += 1
    tma.store_wait(pendings=0)  # this warpgroup's stores have read its buffer


@gluon.jit
def _listed_wgmma_kernel(
    x_desc, y_desc, out_desc, bias_ptr, count_ptr, index_ptr, order_ptr, drop_count_ptr, drop_index_ptr,
    sched_ptr, part_ptr,
    R, C, D,
    n_lines, line_len, n_tiles,
    scale, bias_scale,
    BLOCK_ROWS: gl.constexpr, BLOCK_COLS: gl.constexpr,
    TILE_R: gl.constexpr, TILE_C: gl.constexpr, TILE_D: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr,
    FLAT: gl.constexpr, PAIRS: gl.constexpr, STORE_R: gl.constexpr,
    LINE_OF_COL: gl.constexpr, LINE_BLOCK: gl.constexpr, RED_BLOCK: gl.constexpr,
    BALANCE: gl.constexpr, SNAKE: gl.constexpr, STREAM_K: gl.constexpr, HAS_BIAS: gl.constexpr, X_T: gl.constexpr,
    Y_T: gl.constexpr, PINGPONG: gl.constexpr, PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    """out[r, c] = scale * sum over the visited steps d of X[r, d] Y[d, c] (+ bias_scale * bias[c]).

    X is read through a TMA descriptor over a matrix with unit column stride: X itself (R x D),
    or with X_T its transpose. Y likewise: (D x C), or with Y_T its transpose (C x D); the output
    (R x C). The descriptors are built on the host (``hopper_descriptor``: blocks and layouts as
    below); built here, they cost every program three serial round trips to global memory before
    its first load (about 2 us a launch on an H200, session 28). All three zero-fill reads and
    clip writes out of range, so ragged edges need no masks.

    Lists (dsd, dsd_tn): the output tile's row r0 lies in line ``r0 // LINE_BLOCK`` (with
    LINE_OF_COL its column c0, in line ``c0 // LINE_BLOCK``); the reduction visits the line's kept
    blocks (``count_ptr`` / ``index_ptr``: entries are block numbers along D of size RED_BLOCK),
    TILE_D at a time. ``n_tiles`` is the grid's tile count.

    FLAT (sdd): the output is block-dropped (BLOCK_ROWS x BLOCK_COLS blocks, which TILE_R and
    TILE_C divide). The tiles are those of the kept blocks, listed flat in ``count_ptr`` /
    ``index_ptr`` (``line_len`` = blocks per row), each with the whole reduction; then the
    dropped blocks' tiles (``drop_count_ptr`` / ``drop_index_ptr``) are stored as zeros. Dealing
    out only kept tiles keeps the programs' work even at any p (a grid over all tiles leaves
    each program a binomial share of kept ones).

    STREAM_K (lists, ranked): ``sched_ptr`` holds the ranked lines' exclusive prefix sums of
    kept blocks, their total, then one flag per program (zeroed by the lists launch,
    ``kept_lists(stream_k=P)``); ``part_ptr`` one TILE_R x TILE_C fp32 slot per program. The
    grid is one program per SM, each taking an even share of the steps (see _sk_segment).

    PAIRS (with FLAT; X not transposed): the list holds pairs of kept blocks of one column block
    (``kept_pairs``; ``count_ptr[1]`` / ``drop_index_ptr`` the dropped blocks). A tile's rows are
    two halves of STORE_R = TILE_R / 2 rows, one in each block of its pair, read by two TMA copies
    into the halves of one X tile and stored by two; both halves share the Y tile (the column
    block), so a 256 x 128 tile serves 128 x 128 mask blocks. A pair of one block twice (an odd
    column's last) is stored once. Without PAIRS, STORE_R = TILE_R.

    Persistent and warp-specialised: each program takes tiles pid, pid + programs, ... of the
    ``n_tiles``, with SNAKE (ranked lines) every other round in reverse (``_dealt_tile``). One extra warp (PRODUCER_REGS registers) walks them and issues the loads, up to
    STAGES steps ahead of the MMAs and across tile boundaries, so a short reduction does not
    drain the pipeline; the kernel's warps wait for ready stages, run the MMAs and the epilogues,
    and release each stage through a second ring of mbarriers (``empty``). When the same warps
    did both (session 13, before), every load issue cost the MMA warps CTA-wide barriers: the
    ncu profile put 35-47 % of the big tiles' stall cycles there, and this split took 1-8 % off
    the three kernels. The descriptors and barriers are set up once per program, not once per
    tile; a tile's TMA store completes under the next tile's main loop.

    PINGPONG (FLAT, not PAIRS): the kernel's warps are one consumer warpgroup, a second
    (CONSUMER_REGS registers) joins it, each with its own tile and output buffer; they take the
    program's tiles in turn (_consume_turns).
    """
    dtype: gl.constexpr = x_desc.dtype
    scale = scale.to(gl.float32)
    bias_scale = bias_scale.to(gl.float32)
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    if FLAT:  # the count of listed blocks (or pairs) is on the device
        TILES_PER_BLOCK: gl.constexpr = (BLOCK_ROWS // STORE_R) * (BLOCK_COLS // TILE_C)
        n_tiles = gl.load(count_ptr) * TILES_PER_BLOCK

    # --- the shared-memory tiles the descriptors fill (with PAIRS, X's in two copies of STORE_R rows)
    if X_T:
        x_block: gl.constexpr = [TILE_D, TILE_R]
    else:
        x_block: gl.constexpr = [TILE_R, TILE_D]
    if Y_T:
        y_block: gl.constexpr = [TILE_C, TILE_D]
    else:
        y_block: gl.constexpr = [TILE_D, TILE_C]
    x_layout: gl.constexpr = x_desc.layout
    y_layout: gl.constexpr = y_desc.layout
    out_layout: gl.constexpr = out_desc.layout

    # --- STAGES shared-memory buffers, one mbarrier each; an output tile buffer per consumer
    x_smem = gl.allocate_shared_memory(dtype, staged(STAGES, x_block), x_layout)
    y_smem = gl.allocate_shared_memory(dtype, staged(STAGES, y_block), y_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    acc_layout: gl.constexpr = mma_layout(TILE_R, TILE_C, num_warps)
    if PINGPONG:  # two consumer warpgroups of num_warps, a tile and an output buffer each
        outs = gl.allocate_shared_memory(dtype, [2, TILE_R, TILE_C], out_layout)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        gl.warp_specialize([
            (_consume_turns, (outs.index(0), x_smem, y_smem, ready, empty, turn, out_desc, bias_ptr, n_tiles, R, C,
                              D, n_lines, line_len, count_ptr, index_ptr, order_ptr, scale, bias_scale, dtype,
                              acc_layout, BLOCK_ROWS, BLOCK_COLS, TILE_R, TILE_C, TILE_D, STAGES, GROUP, FLAT,
                              LINE_OF_COL, LINE_BLOCK, RED_BLOCK, BALANCE, HAS_BIAS, X_T, Y_T, gl.constexpr(0))),
            (_consume_turns, (outs.index(1), x_smem, y_smem, ready, empty, turn, out_desc, bias_ptr, n_tiles, R, C,
                              D, n_lines, line_len, count_ptr, index_ptr, order_ptr, scale, bias_scale, dtype,
                              acc_layout, BLOCK_ROWS, BLOCK_COLS, TILE_R, TILE_C, TILE_D, STAGES, GROUP, FLAT,
                              LINE_OF_COL, LINE_BLOCK, RED_BLOCK, BALANCE, HAS_BIAS, X_T, Y_T, gl.constexpr(1))),
            (_load_tiles, (x_desc, y_desc, x_smem, y_smem, ready, empty, n_tiles, R, C, D, n_lines, line_len,
                           count_ptr, index_ptr, order_ptr, sched_ptr, BLOCK_ROWS, BLOCK_COLS, TILE_R, TILE_C,
                           TILE_D, STAGES, GROUP, FLAT, PAIRS, STORE_R, LINE_OF_COL, LINE_BLOCK, RED_BLOCK,
                           BALANCE, SNAKE, STREAM_K, X_T, Y_T)),
        ], [num_warps, 1], [CONSUMER_REGS, PRODUCER_REGS])
        out_smem = outs.index(0)
    else:
        out_smem = gl.allocate_shared_memory(dtype, [TILE_R, TILE_C], out_layout)
        gl.warp_specialize([
            (_consume_tiles, (x_smem, y_smem, out_smem, ready, empty, out_desc, bias_ptr, n_tiles, R, C, D, n_lines,
                              line_len, count_ptr, index_ptr, order_ptr, sched_ptr, part_ptr, scale, bias_scale,
                              dtype, acc_layout, BLOCK_ROWS, BLOCK_COLS, TILE_R, TILE_C, TILE_D, STAGES, GROUP, FLAT,
                              PAIRS, STORE_R, LINE_OF_COL, LINE_BLOCK, RED_BLOCK, BALANCE, SNAKE, STREAM_K,
                              HAS_BIAS, X_T, Y_T, num_warps)),
            (_load_tiles, (x_desc, y_desc, x_smem, y_smem, ready, empty, n_tiles, R, C, D, n_lines, line_len,
                           count_ptr, index_ptr, order_ptr, sched_ptr, BLOCK_ROWS, BLOCK_COLS, TILE_R, TILE_C,
                           TILE_D, STAGES, GROUP, FLAT, PAIRS, STORE_R, LINE_OF_COL, LINE_BLOCK, RED_BLOCK,
                           BALANCE, SNAKE, STREAM_K, X_T, Y_T)),
        ], [1], [PRODUCER_REGS])
    if FLAT:
        # the dropped blocks' tiles: one zero tile in shared memory, stored as often as needed
        tma.store_wait(pendings=0)
        out_smem.store(gl.zeros((TILE_R, TILE_C), dtype, layout=acc_layout))
        fence_async_shared()
        if PAIRS:
            n_zero = gl.load(count_ptr + 1) * TILES_PER_BLOCK
        else:
            n_zero = gl.load(drop_count_ptr) * TILES_PER_BLOCK
        for tile in range(pid, n_zero, programs):
            r0, c0 = _block_tile(drop_index_ptr, tile // TILES_PER_BLOCK, tile % TILES_PER_BLOCK, line_len,
                                 BLOCK_ROWS, BLOCK_COLS, STORE_R, TILE_C)
            if PAIRS:
                tma_store(out_desc, [r0, c0], out_smem.slice(0, STORE_R))
            else:
                tma_store(out_desc, [r0, c0], out_smem)
    tma.store_wait(pendings=0)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))
    if PINGPONG:
        for i in gl.static_range(2):
            mbarrier.invalidate(turn.index(i))

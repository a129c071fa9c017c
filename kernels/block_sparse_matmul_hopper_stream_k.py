"""Stream-K for the Hopper block-sparse matmul (``_listed_wgmma_kernel`` in
``block_sparse_matmul_hopper_kernels.py``, which calls these helpers; Gluon code only).

Where whole output tiles would fill few of the SMs' waves (a narrow output: the T5 weight
gradient has 72 tiles of 256 x 128 for 132 SMs), the listed schedule of dsd and dsd_tn deals out
the reduction steps of all tiles evenly instead: program p takes iterations [p T / P, (p+1) T /
P) of the T in all, the tiles of the ranked lines one line after another, each tile SUB steps
per kept block of its line. ``sched_ptr`` holds the ranked lines' exclusive prefix sums of kept
blocks, their total, then one flag per program (written and zeroed by the lists launch,
``kept_lists(stream_k=P)``). A tile cut between programs is summed through fp32 partial sums,
one TILE_R x TILE_C slot per program: the program that ends the tile adds the sums the programs
before it published (``_sk_segment`` says in which order a program takes its segments, and why).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .gluon_hopper import cta_barrier


@gluon.constexpr_function
def _line_layout(warps):
    return gl.BlockedLayout([1], [32], [warps], [0])


@gluon.jit
def _sk_lines_upto(i, sched_ptr, n_lines, per_block, LINES: gl.constexpr, layout: gl.constexpr):
    """How many lines (ranked) start at or before iteration i: line k starts at iteration
    sched[k] * per_block (the kept blocks ranked before it, each ``per_block`` iterations)."""
    n = 0
    for l0 in range(0, n_lines, LINES):
        k = l0 + gl.arange(0, LINES, layout=layout)
        pre = gl.load(sched_ptr + k, mask=k < n_lines, other=0)
        n += gl.sum(((pre * per_block <= i) & (k < n_lines)).to(gl.int32), 0)
    return n


@gluon.jit
def _sk_span(t, sched_ptr, tiles_per_line, SUB: gl.constexpr):
    """Stream-K tile t's first iteration and its iteration count: the tiles of the ranked lines
    one line after another, each tile SUB steps per kept block of its line."""
    k = t // tiles_per_line
    pre = gl.load(sched_ptr + k)
    steps = (gl.load(sched_ptr + k + 1) - pre) * SUB
    return pre * SUB * tiles_per_line + (t % tiles_per_line) * steps, steps


@gluon.jit
def _sk_tile_at(i, sched_ptr, n_lines, tiles_per_line, SUB: gl.constexpr, layout: gl.constexpr):
    """The stream-K tile holding iteration i (0 <= i < total)."""
    k = gl.maximum(_sk_lines_upto(i, sched_ptr, n_lines, SUB * tiles_per_line, 128, layout) - 1, 0)
    pre = gl.load(sched_ptr + k)
    steps = gl.maximum((gl.load(sched_ptr + k + 1) - pre) * SUB, 1)
    return k * tiles_per_line + (i - pre * SUB * tiles_per_line) // steps


@gluon.jit
def _sk_range(sched_ptr, n_lines, tiles_per_line, SUB: gl.constexpr, layout: gl.constexpr):
    """This program's share of the iterations, [begin, end) of ``total``, and its segments: one
    per tile it touches, the tiles t_b..t_e. With ``partial`` its share ends inside tile t_e
    (see _sk_segment for the order it takes them in)."""
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    total = gl.load(sched_ptr + n_lines) * SUB * tiles_per_line
    begin = pid * total // programs
    end = (pid + 1) * total // programs
    t_b = _sk_tile_at(begin, sched_ptr, n_lines, tiles_per_line, SUB, layout)
    t_e = _sk_tile_at(gl.maximum(end - 1, 0), sched_ptr, n_lines, tiles_per_line, SUB, layout)
    ts_e, steps_e = _sk_span(t_e, sched_ptr, tiles_per_line, SUB)
    partial = end < ts_e + steps_e
    n_segments = gl.where(end > begin, t_e - t_b + 1, 0)
    return total, begin, end, t_b, t_e, partial, n_segments


@gluon.jit
def _sk_segment(seg, n_segments, begin, end, t_b, t_e, partial, sched_ptr, tiles_per_line, SUB: gl.constexpr):
    """Segment ``seg`` of this program's share: (tile, its first iteration, first and end step,
    whether it publishes a partial sum, whether it adds the others' partial sums).

    The share is cut at tile boundaries. Only its last segment can stop short of its tile's end,
    and only its first can start inside its tile. The one that stops short is taken first, and
    its sum published for the program that ends the tile; then the whole tiles; the one that
    starts inside its tile comes last, and adds the sums of the programs before it, which
    published them first thing. A program thus only waits for programs of lower number (no wait
    on one that may not have started: CTAs start in order), and only once its own share is
    done but for the epilogue. Taken before the whole tiles, that wait held them up: this order
    took 27-28 us off the 6000 x 2000 x 3000 weight gradient (session 14, calls 3 and 4)."""
    if partial & (seg == 0):
        t = t_e
    else:
        walk = n_segments - partial.to(gl.int32)  # tiles t_b .. t_b + walk - 1; t_b last
        t = t_b + (seg - partial.to(gl.int32) + 1) % walk
    ts, steps = _sk_span(t, sched_ptr, tiles_per_line, SUB)
    s0 = gl.maximum(begin, ts) - ts
    s1 = gl.minimum(end, ts + steps) - ts
    publish = s1 < steps
    gather = (s0 > 0) & (s1 == steps)
    return t, ts, s0, s1, publish, gather


@gluon.jit
def _sk_tile(t, order_ptr, tiles_per_line, grid_o, line_len, TILE_R: gl.constexpr, TILE_C: gl.constexpr,
             LINE_OF_COL: gl.constexpr, LINE_BLOCK: gl.constexpr):
    """Stream-K tile t -> (r0, c0, offset of its line's list): tile t % tiles_per_line of the
    line ranked t // tiles_per_line, its tiles along the other side first."""
    line = gl.load(order_ptr + t // tiles_per_line)
    j = t % tiles_per_line
    if LINE_OF_COL:
        r0 = (j % grid_o) * TILE_R
        c0 = line * LINE_BLOCK + (j // grid_o) * TILE_C
    else:
        r0 = line * LINE_BLOCK + (j // grid_o) * TILE_R
        c0 = (j % grid_o) * TILE_C
    return r0, c0, line * line_len


@gluon.jit
def _sk_geometry(R, C, n_lines, TILE_R: gl.constexpr, TILE_C: gl.constexpr, LINE_OF_COL: gl.constexpr,
                 LINE_BLOCK: gl.constexpr):
    """(tiles per line, tiles along the other side) of the stream-K order."""
    if LINE_OF_COL:
        grid_o = gl.cdiv(R, TILE_R)
        per_line = (LINE_BLOCK // TILE_C) * grid_o
    else:
        grid_o = gl.cdiv(C, TILE_C)
        per_line = (LINE_BLOCK // TILE_R) * grid_o
    return per_line, grid_o


@gluon.jit
def _sk_offsets(TILE_R: gl.constexpr, TILE_C: gl.constexpr, acc_layout: gl.constexpr):
    rows = gl.arange(0, TILE_R, layout=gl.SliceLayout(1, acc_layout))
    cols = gl.arange(0, TILE_C, layout=gl.SliceLayout(0, acc_layout))
    return rows[:, None] * TILE_C + cols[None, :]


@gluon.jit
def _sk_store_partial(acc, part_ptr, TILE_R: gl.constexpr, TILE_C: gl.constexpr, acc_layout: gl.constexpr):
    """Write this program's partial sum (fp32) to its slot, kept in L2 for the program that adds it."""
    gl.store(part_ptr + _sk_offsets(TILE_R, TILE_C, acc_layout), acc, eviction_policy="evict_last")


@gluon.jit
def _sk_raise_flag(flag_ptr):
    """Say the partial sum is there: every consumer thread's stores happen before the flag,
    which is made visible with them. Raised one segment after the stores (their latency under
    that segment's MMAs) and before any wait of this program's own."""
    cta_barrier()
    gl.atomic_xchg(flag_ptr, 1, sem="release", scope="gpu")


@gluon.jit
def _sk_gather(acc, ts, total, part_ptr, flag_ptr, TILE_R: gl.constexpr, TILE_C: gl.constexpr,
               acc_layout: gl.constexpr):
    """Add the partial sums of the earlier programs whose shares hold part of the tile that
    starts at iteration ts: every non-empty program q < pid whose share ends after ts."""
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    first = gl.maximum(gl.cdiv((ts + 1) * programs, total) - 1, 0)  # least q with end(q) > ts
    offs = _sk_offsets(TILE_R, TILE_C, acc_layout)
    for q in range(first, pid):
        if (q + 1) * total // programs > q * total // programs:
            while gl.atomic_add(flag_ptr + q, 0, sem="acquire", scope="gpu") == 0:
                pass
            cta_barrier()  # the flag was seen before any thread reads the sum
            acc += gl.load(part_ptr + q * (TILE_R * TILE_C) + offs, cache_modifier=".cg")
    return acc

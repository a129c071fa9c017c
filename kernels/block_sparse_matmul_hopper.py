"""Block-sparse matmuls on Hopper, host side: when the Gluon wgmma kernel
(``block_sparse_matmul_hopper_kernels.py``) may serve a dsd, sdd or dsd_tn call, and its launch.

The launchers in ``block_sparse_matmul_triton.py`` ask ``plan_*`` first; a plan is returned only
when every condition below holds, else they run the portable Triton kernels. Same semantics and
oracle (``block_sparse_matmul.py``).

Conditions (each one is a fact the kernel relies on, not a tuning choice):
- a Hopper GPU (capability 9.x), Triton with Gluon's Hopper module, not the interpreter,
  ``SPARSEDROP_HOPPER`` not 0;
- fp16 or bf16 (wgmma's 16-bit operands, either major order from shared memory);
- the problem is one 2-D matmul: batch 1, or a batch that folds into the rows (every matrix's
  rows a whole number of mask blocks, the right operand shared, the folded strides uniform);
- every operand 2-D with one unit stride, the other a multiple of 16 bytes, 16-byte aligned
  (what a TMA descriptor takes);
- no second mask (the output side's both-sides case stays on the portable kernels);
- the tiles divide the mask blocks they must lie in.

dsd and dsd_tn run stream-K (``_STREAM_K``) where whole tiles would fill their waves badly,
with 128 x 128 tiles where the big ones would be fewer than the SMs; where 128 x 128 tiles fill
their waves and the operands' rows are 32-byte aligned, those whole instead (``_plan``).

The sdd's tiles are whole tiles of one kept block each, listed group by group of row blocks
(``kept_grouped``), run by the PINGPONG kernel (two consumer warpgroups taking turns, so one's
epilogue hides under the other's MMAs: the sdd's reduction is the short side, N) where 128 x 128
tiles fit; pairs of kept blocks of a column in one 256 x 128 tile (``_SDD_PAIRS``) are an option.

A right operand (the weight) of dsd and sdd whose rows do not start on 32-byte boundaries is
copied into rows that do before a large launch (``_ROW_ALIGN``, ``Plan.copy_y``).

Under torch.compile (``serve``): Inductor emits the kernels a traced op body launches as
``@triton.jit`` source, which a Gluon kernel is not. So a traced call that the wgmma kernel would
serve enters the graph as one opaque op (``sparsedrop::wgmma_dsd``, ``wgmma_sdd``,
``wgmma_dsd_tn``, defined in ``block_sparse_matmul_hopper_ops.py``), which Inductor calls as an
extern kernel and which runs the launcher on the real tensors (its launches planned:
``launch_plans``). A traced tensor has no address, so its alignment is read off its storage
offset, as Inductor assumes of its buffers; should an operand turn out misaligned at run time,
the launcher runs the portable kernels. Symbolic sizes keep the portable kernels (deciding on
them would add guards).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor
from torch._library.triton import is_wrap_triton_enabled

from . import launch_plans, runtime
from .block_mask import cdiv
from .block_sparse_matmul_hopper_ops import _launchers
# the launchers hand these to serve (hopper.wgmma_dsd, ...)
from .block_sparse_matmul_hopper_ops import wgmma_dsd, wgmma_dsd_tn, wgmma_sdd  # noqa: F401
from .block_sparse_matmul_kernels import _copy_rows_kernel
from .kept_blocks import grouped_fit, kept_grouped, kept_lists, kept_pairs, pairs_fit

try:  # Gluon's Hopper module moved between releases; without it there is no Hopper path
    from .block_sparse_matmul_hopper_kernels import _listed_wgmma_kernel
    from .gluon_hopper import hopper_descriptor
except Exception:  # noqa: BLE001  (ImportError, or an API this Triton lacks)
    _listed_wgmma_kernel = hopper_descriptor = None


@dataclasses.dataclass(frozen=True)
class WgmmaConfig:
    tile_r: int
    tile_c: int
    tile_d: int
    stages: int
    warps: int
    group: int = 8
    pingpong: bool = False     # two consumer warpgroups of ``warps``, a tile each, taking turns (flat sdd only)


# Output tile 128 x 256 (or 256 x 128 where the columns must lie in one 128-wide mask block) with
# two warpgroups, as cuBLAS picks on Hopper for large bf16 problems; 128 x 128 where both sides
# must lie in one mask block (sdd) or the output is narrow.
#
# ``group``: ranked lines interleaved in the tile order (``_grouped_tile``, for L2). The square
# tiles take 4: session 26, call 4 (raw/session26), three fresh masks per p, x cuBLAS at p = 0.1
# / 0.5 with 4 against 8: forward 8192 x 768 x 3072 1.031 / 0.708 against 1.109 / 0.743, 16384 x
# 768 x 3072 0.956 / 0.589 against 0.989 / 0.647; weight gradient 8192 x 1536 x 4096 (whole 128 x
# 128 tiles) 0.925 / 0.584 against 0.993 / 0.622; call 6, weight gradients on whole 128 x 128
# tiles, 6144 x 2048 x 3072 0.928 / 0.581 against 0.969 / 0.624, 4096 x 2048 x 3072 0.935 /
# 0.601 against 1.002 / 0.652 (2 ran as 4, within 2 %). The big tiles ran within 2 % at 2, 4 or 8.
#
# The square tiles keep 5 stages in flight, not 4: session 27, call 5 (raw/session27), five
# problems that take them, three fresh masks per p, 5 / 4 stages timed with the L2 flushed
# between replays (bench_kernels.py's method): 0.93-1.00 (T5's forward 0.930 / 0.929 / 0.955
# and weight gradient 0.934 / 0.961 / 0.963 at p = 0 / 0.1 / 0.5); back to back, where the
# previous replay leaves the operands in L2, 0.94-1.04 (T5's forward 0.985 / 0.972 / 1.037).
# The ping-pong tiles (two output buffers) lost with 5 (1.00-1.07 on four problems).
_CONFIGS = {
    "wide": WgmmaConfig(128, 256, 64, 3, 8),
    "tall": WgmmaConfig(256, 128, 64, 3, 8),
    "square": WgmmaConfig(128, 128, 64, 5, 8, group=4),
    "small": WgmmaConfig(64, 128, 64, 4, 4),
    "tiny": WgmmaConfig(64, 64, 64, 4, 4),
    "pingpong": WgmmaConfig(128, 128, 64, 4, 4, pingpong=True),
}
# The sdd's tiles. Flat: whole tiles of one kept block each, listed in groups of _SDD_GROUP row
# blocks, column by column within a group (kept_grouped: a wave's operands stay in L2), or
# row-major where the mask is too large for that list kernel (or _SDD_GROUP is None); where the
# tile fits, the PINGPONG kernel runs them (_SDD_PINGPONG). Paired (_SDD_PAIRS, the tall tile,
# 128 x 128 per block, halves in two kept blocks of one column: kept_pairs), the default of
# sessions 13-21, is kept as an option. Session 22, call 2, dX alone against cuBLAS at p = 0.1,
# paired / flat row-major / flat grouped 8 + PINGPONG: 4096^3 0.98 / 0.89 / 0.88, 8192 x 1024
# x 4096 0.99 / 0.90 / 0.85, 8192 x 4096 x 14336 0.96 / 1.14 / 0.93, 8192 x 768 x 3072 1.06 /
# 1.04 / 0.92; but 6000 x 2000 x 3000 1.03 / 1.09 / 1.15 (the one shape where paired wins).
_SDD_PAIRS: WgmmaConfig | None = None
_SDD_GROUP: int | None = 8
_SDD_PINGPONG = True
# Operands whose rows do not start on 32-byte boundaries (a row stride or base address that is
# not a multiple of 32 bytes: 16 bf16 elements) cost these kernels 20-30 %: each 128-byte piece
# of a row that TMA reads (the swizzle's width) then touches five 32-byte sectors of L2, not
# four (our reading of the figures below; no profile taken). Session 25 (raw/session25), 6000 x
# 2000 x 3000 at p = 0.1 (x's and the weight's rows 6000 bytes apart) against the same problem
# with its rows padded to a multiple of 64 elements (call 2): forward 133.4 against 105.9 us, dX
# 130.3 / 112.0, dW 133.1 / 109.2 (cuBLAS 117 / 126 / 120). The right operand of dsd and sdd (the
# weight, read again by every row of tiles) is most of it: its rows padded alone gave forward
# 106.8 and dX 115.4 us. So where those rows are unaligned and at least _COPY_Y_MIN_ROWS output
# rows read them, the launch copies the operand into rows _COPY_ROW_BYTES apart first
# (``Plan.copy_y``; call 5, forward + dX + dW against cuBLAS's three products at p = 0 / 0.1 /
# 0.3 / 0.5: 6000 x 2000 x 3000 1.053 / 1.027 / 0.850 / 0.697 against 1.200 / 1.148 / 0.921 /
# 0.735; 8192 x 1000 x 3000 1.312 / 1.240 / 1.063 / 0.790 against 1.529 / 1.428 / 1.181 /
# 0.868; 8192 x 3000 x 1000 1.321 / 1.271 / 1.041 / 0.819 against 1.475 / 1.418 / 1.128 /
# 0.891). Rows of 8000 bytes (64 bytes off a 128-byte line, a whole number of sectors) cost
# nothing to read: 8192 x 4000 x 4000 with the copy 1.042 / 0.963 / 0.770 / 0.589, without
# 1.033 / 0.944 / 0.764 / 0.578, hence 32 bytes. Bigger tiles, which read fewer bytes a
# multiply-add, lose less on unaligned rows, so _plan takes 128 x 128 tiles in place of stream-K
# only on aligned ones.
_ROW_ALIGN = 32
_COPY_ROW_BYTES = 128
_COPY_Y_MIN_ROWS = 4096
# Stream-K for the listed schedule (dsd, dsd_tn): the reduction steps of all tiles are dealt out
# evenly to the programs, a tile split between programs summed through fp32 partial sums, where
# whole tiles would fill less than _STREAM_K_BELOW of their waves (a narrow output: the T5
# weight gradient has 72 tiles for 132 SMs). None: that rule; True / False force it where the
# lists allow (the tests cover both schedules on every shape).
_STREAM_K: bool | None = None
_STREAM_K_BELOW = 0.9
# Whole tiles of ranked lines (dsd, dsd_tn without stream-K) are dealt out to the persistent
# programs round by round, every other round in reverse (``_dealt_tile``), so that the program
# holding a round's dearest tile holds the next round's cheapest; dealt every round in order,
# program 0 held the dearest tile of each. Session 26, call 1 (raw/session26), each kernel
# alone, three fresh masks per p, snake / in order: forward at 8192 x 1024 x 4096 0.961 / 0.918
# / 0.921 at p = 0.1 / 0.3 / 0.5, at 8192 x 3072 x 768 0.937 at p = 0.5, dW at 4096^3 0.962 at
# p = 0.5; 0.97-1.0 elsewhere (p = 0, where every tile costs the same, within the noise).
# False: every round in order.
_SNAKE = True
# The kernel's producer warp gets _PRODUCER_REGS registers a thread; the kernel's register cap is
# what fits its warps and the producer's warpgroup in an SM's 64 K registers (the compiler moves
# the producer's spare registers to the MMA warps).
_PRODUCER_REGS = 40
# PINGPONG's second consumer warpgroup gets _CONSUMER_REGS registers a thread; Triton gives the
# first (the kernel's own warps) 256, and 256 + 208 + 40 is what the cap of three warpgroups allows
# (_max_registers(8), 168 a thread): setmaxnreg cannot hand out more than the launch reserved.
_CONSUMER_REGS = 208
# Under torch.compile the wgmma kernel runs through an opaque op (``serve``), which costs the host
# about 70 us a call on an H200 host (session 22; 190 before the ops were schema ops and replays
# took fewer views: the launch-plan replay, its buffers and two launches through Triton's Python
# launcher), against a few tens for the portable kernels, which Inductor launches itself. Outside
# CUDA graphs it serves from this many multiply-adds up; below, compiled code keeps the portable
# kernels. Under CUDA graphs (Inductor's reduce-overhead mode) the host cost is paid once, at
# capture: any size not launch-bound. Where the bound sits is a question of whether the step is
# GPU-bound, which one site cannot see. Session 22, BERT-base at p = 0.3, default mode, step time
# against Inductor (raw/session22, calls 6-9): at 64 x 512 (FFN sites 2^36.6, the others 2^34.6)
# 1.00x with this bound, 1.02x with 2^36, 1.07x with 0; at 16 x 512 (2^34.6 / 2^32.6, a host-bound
# step) 0.76x with this bound and 0.60x with 0. A lone compiled site, forward + backward with the
# host: 8192 x 4096 x 4096 (2^37) 1.20 ms against 1.09 with the portable kernels, 8192 x 4096 x
# 14336 (2^38.8, session 21) 3.31 against 4.09.
OPAQUE_MIN_WORK = 2**38


def _stream_k(n_tiles: int, programs: int, iterations: int) -> bool:
    """Whether the listed schedule of ``n_tiles`` tiles (at most ``iterations`` reduction steps
    in all) runs stream-K on ``programs`` programs; the kernel's iteration arithmetic is int32."""
    if _STREAM_K is False or n_tiles == 0 or programs * (iterations + 1) >= 2**31:
        return False
    return _STREAM_K or n_tiles / (cdiv(n_tiles, programs) * programs) < _STREAM_K_BELOW


def _max_registers(warps: int) -> int:
    return min(256, 65536 // ((warps + 4) * 32)) // 8 * 8


def available(device: torch.device) -> bool:
    return _listed_wgmma_kernel is not None and runtime.hopper_enabled(device)


def _rows_view(t: Tensor) -> tuple[Tensor, bool] | None:
    """A 2-D operand as (base with unit column stride, transposed?), or None if TMA cannot read it."""
    if t.dim() != 2:
        return None
    if t.stride(1) == 1 or t.shape[1] == 1:
        base, trans = t, False
    elif t.stride(0) == 1 or t.shape[0] == 1:
        base, trans = t.t(), True
    else:
        return None
    if not _rows_start_on(base, 16) or base.shape[1] * base.element_size() < 16:
        return None
    return base, trans


def _address(base: Tensor) -> int:
    """A tensor's address as far as alignment goes: traced, its storage offset in bytes (see the
    module doc)."""
    es = base.element_size()
    return base.storage_offset() * es if runtime.is_traced(base) else base.data_ptr()


def _rows_start_on(base: Tensor, boundary: int) -> bool:
    """Whether every row of ``base`` (unit column stride) starts on a ``boundary``-byte boundary:
    its row stride and its address are multiples of it."""
    return (base.stride(0) * base.element_size()) % boundary == 0 and _address(base) % boundary == 0


def _rows_aligned(*operands: Tensor) -> bool:
    """Whether each operand's rows as TMA reads them (its ``_rows_view`` base) start on
    _ROW_ALIGN-byte boundaries."""
    for t in operands:
        v = _rows_view(t)
        if v is None:
            return False
        if not _rows_start_on(v[0], _ROW_ALIGN):
            return False
    return True


def _fold(t: Tensor, rows_per_block: int | None) -> Tensor | None:
    """(B, M, X) -> (B*M, X) as a view, when the batch folds into the rows."""
    B, M, _ = t.shape
    if B == 1:
        return t[0]
    if rows_per_block is not None and M % rows_per_block:
        return None
    if t.stride(0) != M * t.stride(1):
        return None
    return t.reshape(B * M, t.shape[2])


def _keep_folds(keep: Tensor, blocks: tuple) -> bool:
    """Whether (B, nR, nC) flags (maybe a padded view) read as (B*nR, nC) through their strides."""
    B, nR, _ = blocks
    return B == 1 or keep.stride(0) == nR * keep.stride(1)


def _fits(cfg: WgmmaConfig, r_divides: int | None, c_divides: int | None, d_divides: int | None) -> bool:
    """Whether cfg's tiles divide what they must (None: no constraint): the mask block their rows
    or columns lie in, and the kept blocks the reduction steps through."""
    return all(n is None or n % tile == 0
               for n, tile in ((r_divides, cfg.tile_r), (c_divides, cfg.tile_c), (d_divides, cfg.tile_d)))


def _config(C: int, r_divides: int | None, c_divides: int | None, d_divides: int | None) -> WgmmaConfig | None:
    """The first config, in order of preference, that fits (_fits). Big tiles first unless the
    output is narrow (C < 1024). A wave-quantisation score was tried instead (session 12, call 4)
    and chose smaller tiles that ran slower on the narrow T5 shape (weight gradient 0.114 vs
    0.095 ms): this order is the measured one. (Under stream-K, see _plan.)"""
    order = ("wide", "tall", "square", "small", "tiny") if C >= 1024 else ("square", "wide", "tall", "small", "tiny")
    for name in order:
        if _fits(_CONFIGS[name], r_divides, c_divides, d_divides):
            return _CONFIGS[name]
    return None


@dataclasses.dataclass
class Plan:
    """One launch of the wgmma kernel: out2d (R x C) = scale * X @ Y (+ bias) over listed steps."""
    x: Tensor
    x_t: bool
    y: Tensor
    y_t: bool
    out: Tensor
    R: int
    C: int
    D: int
    cfg: WgmmaConfig
    list_by: str | None        # kept_lists(by=...) of the reduction's lists; None: sdd's flat tile
                               # list, "pairs": sdd's paired one (kept_pairs)
    keep: Tensor
    blocks: tuple
    line_block: int
    red_block: int
    line_of_col: bool
    block: tuple
    stream_k: bool = False     # the listed schedule dealt out as stream-K (see _STREAM_K, _plan)
    copy_y: bool = False       # Y read from a copy with aligned rows (see _ROW_ALIGN, _copy_y)

    def _lines(self) -> tuple[int, int, int]:
        """The listed schedule's (lines, entries a line, tiles when the lines are ranked): a line's
        tiles are LINE_BLOCK / TILE_L across it, times those along the other side."""
        B, nR, nC = self.blocks
        cfg = self.cfg
        n_lines, line_len = (B * nR, nC) if self.list_by == "row" else (nC, B * nR)
        tile_l = cfg.tile_c if self.line_of_col else cfg.tile_r
        other, tile_o = (self.R, cfg.tile_r) if self.line_of_col else (self.C, cfg.tile_c)
        return n_lines, line_len, n_lines * (self.line_block // tile_l) * cdiv(other, tile_o)

    def takes_stream_k(self, programs: int) -> bool:
        """Whether a launch on ``programs`` programs takes the stream-K schedule (see _STREAM_K;
        the listed schedule only, and only where the lists can be ranked)."""
        if self.list_by in (None, "pairs"):
            return False
        _, line_len, tiles = self._lines()
        return _stream_k(tiles, programs, tiles * line_len * (self.red_block // self.cfg.tile_d))

    def run(self, scale: float, bias: Tensor | None = None, bias_scale: float = 1.0) -> None:
        cfg = self.cfg
        B, nR, nC = self.blocks
        pairs = self.list_by == "pairs"
        flat = self.list_by is None or pairs
        store_r = cfg.tile_r // 2 if pairs else cfg.tile_r
        programs = runtime.sm_resources(self.out.device)[0]  # persistent: one program an SM
        schedule = None  # stream-K's
        if pairs:  # tiles of pairs of kept blocks, then the dropped blocks; both counts on the device
            counts, index, drop_index = kept_pairs(self.keep, blocks=self.blocks)
            drop_counts, order, n_lines, line_len = counts, counts, 0, nC
            n_tiles = cdiv(B * nR * nC + nC, 2) * (self.block[0] // store_r) * (self.block[1] // cfg.tile_c)  # a bound
        elif flat:  # tiles of kept blocks, then zeros for the dropped ones; their count is on the device
            if _SDD_GROUP and grouped_fit(self.blocks, _SDD_GROUP):
                counts, index, drop_index = kept_grouped(self.keep, _SDD_GROUP, blocks=self.blocks)
                drop_counts = counts[1:]
            else:
                counts, index = kept_lists(self.keep, "all", blocks=self.blocks)
                drop_counts, drop_index = kept_lists(self.keep, "all", blocks=self.blocks, dropped=True)
            order, n_lines, line_len = counts, 0, nC
            n_tiles = B * nR * nC * (self.block[0] // cfg.tile_r) * (self.block[1] // cfg.tile_c)  # a bound
        else:
            n_lines, line_len, ranked_tiles = self._lines()
            counts, index, order, *schedule = kept_lists(self.keep, self.list_by, order=True, blocks=self.blocks,
                                                         stream_k=programs if self.stream_k else 0)
            schedule = schedule[0] if schedule else None  # None also when the mask is too large to rank
            drop_counts = drop_index = counts  # unused
            n_tiles = ranked_tiles if order is not None else cdiv(self.R, cfg.tile_r) * cdiv(self.C, cfg.tile_c)
        balance = not flat and order is not None
        if n_tiles == 0:
            return
        # stream-K: every program takes a share; one fp32 partial-sum slot per program
        partials = None if schedule is None else launch_plans.empty(programs * cfg.tile_r * cfg.tile_c, torch.float32,
                                                                    self.out.device)
        y = _aligned_copy(self.y) if self.copy_y else self.y
        tr, tc, td = cfg.tile_r, cfg.tile_c, cfg.tile_d
        x_desc = hopper_descriptor(self.x, [td, tr]) if self.x_t else hopper_descriptor(self.x, [store_r, td], [tr, td])
        y_desc = hopper_descriptor(y, [tc, td] if self.y_t else [td, tc])
        out_desc = hopper_descriptor(self.out, [store_r, tc], [tr, tc])
        with runtime.device_guard(self.out):
            runtime.launch(_listed_wgmma_kernel)[(programs if partials is not None else min(n_tiles, programs),)](
                x_desc, y_desc, out_desc, bias if bias is not None else self.out,
                counts, index, order if balance else counts, drop_counts, drop_index,
                counts if schedule is None else schedule, counts if partials is None else partials,
                self.R, self.C, self.D,
                n_lines, line_len, n_tiles,
                float(scale), float(bias_scale),
                BLOCK_ROWS=self.block[0], BLOCK_COLS=self.block[1],
                TILE_R=cfg.tile_r, TILE_C=cfg.tile_c, TILE_D=cfg.tile_d, STAGES=cfg.stages, GROUP=cfg.group,
                FLAT=flat, PAIRS=pairs, STORE_R=store_r, LINE_OF_COL=self.line_of_col, LINE_BLOCK=self.line_block,
                RED_BLOCK=self.red_block, BALANCE=balance, SNAKE=balance and _SNAKE, STREAM_K=partials is not None,
                HAS_BIAS=bias is not None, X_T=self.x_t, Y_T=self.y_t, PINGPONG=cfg.pingpong,
                PRODUCER_REGS=_PRODUCER_REGS, CONSUMER_REGS=_CONSUMER_REGS, num_warps=cfg.warps,
                maxnreg=_max_registers(cfg.warps * (2 if cfg.pingpong else 1)),
            )


def _aligned_copy(t: Tensor) -> Tensor:
    """``t`` (2-D, unit column stride) copied by one launch into a buffer whose rows start on
    _COPY_ROW_BYTES-byte boundaries: a view of the same sizes, another row stride."""
    rows, cols = t.shape
    es = t.element_size()
    stride = cdiv(cols, _COPY_ROW_BYTES // es) * (_COPY_ROW_BYTES // es)
    buf = launch_plans.empty(rows * stride, t.dtype, t.device)
    block = 1024
    with runtime.device_guard(t):
        runtime.launch(_copy_rows_kernel)[(rows, cdiv(cols, block))](
            t, buf, cols, t.stride(0), stride, ALIGN=_launchers()._alignment(es, (cols, t.stride(0)), (t.stride(1),)),
            BLOCK=block, num_warps=4)
    return buf.view(rows, stride)[:, :cols]


def _copy_y(plan: Plan | None) -> Plan | None:
    """dsd and sdd: read the right operand from an aligned copy where its rows are unaligned and
    at least _COPY_Y_MIN_ROWS output rows read it (see _ROW_ALIGN); not for a transposed problem
    (a column-major output), whose right operand is the activation."""
    if plan is not None and not plan.line_of_col and plan.R >= _COPY_Y_MIN_ROWS and not _rows_aligned(plan.y):
        plan.copy_y = True
    return plan


def _usable(sizes: tuple, *tensors: Tensor) -> bool:
    """The device, dtype and call allow the wgmma kernel, and the problem (the product of
    ``sizes`` in multiply-adds) is not launch-bound (there the portable kernels' cheaper launch
    wins; runtime.launch_bound). Traced with symbolic sizes: no (see the module doc).

    Launch-bound is judged as outside CUDA graphs even under them: below 2^34 the wgmma kernel
    beat the portable ones on some products from 2^32 and lost below, and compiled sites there
    run dense at the default p anyway; were it to serve there, the opaque op's choice on real
    tensors (made where Inductor's CUDA-graph setting no longer holds, and in CUDA-graph trees'
    warm-up as well as in their recording) would have to agree with the traced one
    (benchmarks/NOTES_kernels.md §22)."""
    t0 = tensors[0]
    if not available(t0.device) or t0.dtype not in (torch.float16, torch.bfloat16):
        return False
    if runtime.has_symbolic_sizes(tensors) or any(isinstance(n, torch.SymInt) for n in sizes):
        return False
    if runtime.launch_bound_work(math.prod(sizes), False):
        return False
    return all(t.dtype == t0.dtype for t in tensors)


def _plan(x2: Tensor, y2: Tensor, out2: Tensor, D: int, keep, blocks, block, list_by, line_block, red_block,
          lines_are_rows: bool, has_bias: bool = False) -> Plan | None:
    """Plan out2 = X @ Y with lines along out2's rows (lines_are_rows) or its columns. A
    column-major out2 is computed as the transposed problem outᵀ = Yᵀ Xᵀ (not with a bias,
    which the kernel adds along the stored columns)."""
    o = _rows_view(out2)
    if o is None:
        return None
    out_base, out_t = o
    if out_t and has_bias:
        return None
    if out_t:
        x2, y2 = y2.t(), x2.t()
        lines_are_rows = not lines_are_rows
    xv, yv = _rows_view(x2), _rows_view(y2)
    if xv is None or yv is None:
        return None
    R, C = out_base.shape
    line_of_col = not lines_are_rows
    if list_by == "pairs":  # sdd: a tile's halves lie in two mask blocks of one column
        cfg = _SDD_PAIRS
    elif list_by is None:  # sdd: a tile lies inside one mask block of the (row-major) output
        pingpong = _CONFIGS["pingpong"]
        cfg = pingpong if _SDD_PINGPONG and _fits(pingpong, block[0], block[1], None) else \
            _config(C, block[0], block[1], None)
    else:  # the tile's columns (or rows) lie in one line
        fit = (None, line_block, red_block) if line_of_col else (line_block, None, red_block)
        cfg = _config(C, *fit)
    if cfg is None:
        return None
    plan = Plan(xv[0], xv[1], yv[0], yv[1], out_base, R, C, D, cfg, list_by, keep, blocks, line_block, red_block,
                line_of_col, block)
    if list_by not in (None, "pairs"):
        programs = runtime.sm_resources(out_base.device)[0]
        plan.stream_k = plan.takes_stream_k(programs)
        square = _CONFIGS["square"]
        if plan.stream_k and cfg.tile_r * cfg.tile_c > square.tile_r * square.tile_c and _fits(square, *fit):
            smaller = dataclasses.replace(plan, cfg=square)
            smaller.stream_k = smaller.takes_stream_k(programs)
            # Fewer big tiles than programs: every tile would be cut, and adding a 256-row tile's
            # partial sum costs the program that ends it 6-10 us (its loads into registers beside
            # the accumulator go out in four round trips; a 128 x 128 tile's in one). 128 x 128
            # tiles took the T5 weight gradient from 80 to 70 us (p = 0) and 56 to 44 us (p = 0.5);
            # where the big tiles are at least one wave (6000 x 2000 x 3000's), they lost (137 vs
            # 168 us). Session 14, call 10.
            if plan._lines()[2] < programs:
                plan = smaller
            # 128 x 128 tiles that fill their waves (whole tiles, no partial sums) beat the big
            # ones' stream-K where the rows are aligned: dW at 6144 x 2048 x 3072 (192 tiles of
            # 256 x 128, 384 of 128 x 128) 0.965 / 0.913 / 0.591 x cuBLAS at p = 0 / 0.1 / 0.5
            # against 1.078 / 1.023 / 0.673 (session 25, call 1; 4096 x 2048 x 3072 in call 2:
            # 0.992 / 0.936 / 0.606 against 1.146 / 1.086 / 0.728). With unaligned rows (see
            # _ROW_ALIGN) the big tiles, which read fewer bytes a multiply-add, win: 6000 x 2000
            # x 3000, 1.144 / 1.119 / 0.686 against 1.291 / 1.237 / 0.714.
            elif not smaller.stream_k and _rows_aligned(x2, y2):
                plan = smaller
    return plan


def plan_dsd(a: Tensor, b: Tensor, keep: Tensor, block, bias, out_keep, out: Tensor) -> Plan | None:
    """dsd: out (B, M, N) = (a ⊙ m) @ b; lines = row blocks of a, steps = their kept column blocks."""
    B, M, K = a.shape
    if out_keep is not None or not _usable((B, M, K, b.shape[2]), a, b, out, *([bias] if bias is not None else [])):
        return None
    br, bc = block
    if b.shape[0] != 1 and B != 1:
        return None
    blocks = (B, cdiv(M, br), cdiv(K, bc))
    a2, out2 = _fold(a, br), _fold(out, br)
    if a2 is None or out2 is None or not _keep_folds(keep, blocks) or (bias is not None and bias.stride(0) != 1):
        return None
    return _copy_y(_plan(a2, b[0], out2, K, keep, blocks, block, "row", br, bc, lines_are_rows=True,
                         has_bias=bias is not None))


def plan_sdd(grad: Tensor, b: Tensor, keep: Tensor, block, bias, reduce_keep, out: Tensor) -> Plan | None:
    """sdd: out (B, M, K) = (grad @ bᵀ) ⊙ m; every output tile inside one mask block."""
    B, M, N = grad.shape
    if reduce_keep is not None or \
            not _usable((B, M, N, b.shape[1]), grad, b, out, *([bias] if bias is not None else [])):
        return None
    br, bc = block
    if b.shape[0] != 1 and B != 1:
        return None
    K = b.shape[1]
    blocks = (B, cdiv(M, br), cdiv(K, bc))
    g2, out2 = _fold(grad, br), _fold(out, br)
    if g2 is None or out2 is None or not _keep_folds(keep, blocks) or (bias is not None and bias.stride(0) != 1):
        return None
    if out2.stride(1) != 1:  # the output mask is indexed by (row, column) of out as stored
        return None
    return _copy_y(_plan(g2, b[0].t(), out2, N, keep, blocks, block, "pairs" if _pairs_fit(g2, block, blocks) else None,
                         br, 0, lines_are_rows=True, has_bias=bias is not None))


def _pairs_fit(g2: Tensor, block, blocks) -> bool:
    """Whether the paired sdd serves: its halves divide the mask blocks, g's rows are contiguous
    (the two half copies split the X tile along its rows), and kept_pairs takes the mask."""
    cfg = _SDD_PAIRS
    return cfg is not None and block[0] % (cfg.tile_r // 2) == 0 and block[1] % cfg.tile_c == 0 and \
        g2.stride(1) == 1 and pairs_fit(blocks)


def plan_dsd_tn(a: Tensor, grad: Tensor, keep: Tensor, block, batched_out: bool, grad_keep, out: Tensor) -> Plan | None:
    """dsd_tn: out (K, N) = (a ⊙ m)ᵀ @ grad summed over the batch; lines = column blocks of a,
    steps = their kept row blocks (of every batch entry)."""
    B, M, K = a.shape
    if grad_keep is not None or not _usable((B, M, K, grad.shape[2]), a, grad, out):
        return None
    br, bc = block
    if batched_out and B != 1:
        return None
    blocks = (B, cdiv(M, br), cdiv(K, bc))
    a2, g2 = _fold(a, br), _fold(grad, br)
    if a2 is None or g2 is None:
        return None
    return _plan(a2.t(), g2, out[0], B * M, keep, blocks, block, "col" if B == 1 else "col_sum", bc, br,
                 lines_are_rows=True)


# --------------------------------------------------------------------------- under torch.compile
def serve(plan: Plan | None, op, op_args: tuple, scale, bias: Tensor | None = None, bias_scale: float = 1.0) -> bool:
    """Serve a launcher's call on the wgmma kernel: run ``plan`` now, or, when the call is traced
    (its tensors fake: torch.compile tracing an op body), record ``op`` (one of the opaque ops
    below) with ``op_args``, the launcher's own arguments. Not a dispatch mode alone: a launch
    plan's recording runs under one, with real tensors, and must record the launches themselves.
    False: no plan; while traced, a symbolic scale or a problem below OPAQUE_MIN_WORK outside
    CUDA graphs; real tensors under another dispatch mode. The portable kernels serve the call."""
    if plan is None:
        return False
    if any(runtime.is_traced(t) for t in op_args if isinstance(t, Tensor)):
        if not all(isinstance(v, (int, float)) for v in (scale, bias_scale)):
            return False
        if plan.R * plan.C * plan.D < OPAQUE_MIN_WORK and not runtime.cuda_graphs():
            return False
        op(*op_args)
        return True
    if runtime.tracing() and is_wrap_triton_enabled():
        # Real tensors under a dispatch mode of someone else's (selective activation
        # checkpointing, a flop counter): launches go through torch's wrapper there, which the
        # portable kernels have always taken. (A launch plan records under a mode of its own, with
        # the wrapper off: that recording must and does take the wgmma kernel.)
        return False
    plan.run(scale, bias, bias_scale)
    return True

"""Flash attention with tile dropout, host side: the kernel configs (candidate tables per pass and
head-dim class, best guess first, and the rules that put another config first for a class of
problems or for TMA loads), the backward strategy, the default mask tile and the choice among them
(``_pick_config``). Every figure below was measured on an H200 (benchmarks/NOTES_attention.md has
the runs). The launchers that take these configs are in ``flash_attention_triton.py``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .flash_attention import HEAD_DIM_RULE, supported_head_dim
from .flash_attention_kernels import SKIP_PREFETCH
from .runtime import KernelConfig


# A config is a ``runtime.KernelConfig``: tile_m is the kernels' BLOCK_M (queries), tile_n their
# BLOCK_N (keys); warps, stages and skip (the SKIP_* mode) are read too, the other fields not.
# The table below writes them as (BLOCK_M, BLOCK_N, num_warps, num_stages, skip mode) tuples, the
# form ``config`` overrides take too (``as_config``), best guess first. For "fwd" and "bwd_q"
# the program owns BLOCK_M queries and loops over BLOCK_N keys; for "bwd_kv" and "bwd_fused" it
# owns BLOCK_N keys and loops over BLOCK_M queries. The first candidate whose tile fits the mask
# tile is used. Orders start from the Triton fused-attention tutorial's H100 tiles, minus those
# that spill registers on sm_90 (compiled offline, see benchmarks/NOTES_attention.md); only
# `benchmarks/bench_attention.py --sweep` on the GPU can rank them, and prints the winners.
#
# The tables are keyed by head-dim class (``head_dim_class``): a head dim runs over its padded
# extent (next power of two, at least 16), so 80 and 96 compute like 128 and use its tiles, and
# 8 to 64 use the 64 tiles (smaller dims only lighten them).
#
# The 256 class was first listed from resources alone; session 16's sweep on an H200
# (4x16x2048x256 causal, p = 0.1, each pass by CUDA-graph replay) put the tiles that spill a
# little first: forward 64x64 (0.694 ms against 0.971 for 64x32), dK/dV 64 q x 16 k with 2
# stages (2.53 against 2.99 with 1), dQ 64x32 (0.920 against 2.51 for 32x16). Session 18 timed
# 4-warp tiles and 64 x 64 dK/dV tiles beside them (call 6, 4x16x2048x256 causal, 8x8x1024x256
# and 4x16x2048x192 causal; the firsts below by geometric mean): forward 64x64 on 4 warps, 1 stage
# (0.425 ms against 0.673 at 2048x256), dK/dV 64 q x 64 k on 8 warps, 1 stage (1.43 against 2.52),
# dQ 64x16 on 4 warps without skipping (0.717 against 0.858); forward + backward 4.12 -> 2.62 ms
# (8x8x1024x256: 2.04 -> 1.11, head dim 192: 4.05 -> 2.54). Shared memory:
# a (rows, 256) bf16/fp16 tile is rows x 512 B per operand and pipeline stage, and an H100/H200
# block gets at most 227 KB: the forward stages K and V (2 x BLOCK_N x 512 B a stage), so 64 keys
# x 3 stages would be 192 KB before Q and scratch; stages stay at 1-2.
# Registers bind first: an fp32 accumulator is rows x 1 KB (dK/dV: two of them), 64 a thread
# for 64 rows with 8 warps. Compiled offline for sm_90 (Triton 3.9, causal, no mask and a
# classified bool mask), every candidate of session 16 fits shared memory (at most 120 KB), and the
# 64x32 forward does not spill (72 B with a bool mask); 64x64 forward, 32x32 dK/dV and 64x32 dQ
# tiles spill 400-900 B, the single pass with 32x32 tiles 1.8 KB, and the spilling ones were
# faster all the same.
_CANDIDATE_TABLE: dict[str, dict[int, list[tuple[int, int, int, int, int]]]] = {
    "fwd": {
        64: [(64, 64, 4, 3, 0), (128, 64, 4, 3, 0), (128, 128, 8, 3, 0), (128, 64, 8, 3, 0), (128, 64, 4, 4, 0),
             (128, 32, 4, 3, 0), (64, 128, 4, 3, 0), (64, 32, 4, 3, 0), (32, 32, 4, 3, 0), (16, 16, 4, 2, 0)],
        128: [(64, 32, 4, 3, 2), (128, 64, 8, 3, 0), (128, 64, 8, 2, 0), (128, 128, 8, 2, 0), (128, 32, 8, 3, 0),
              (64, 64, 4, 3, 0), (64, 32, 4, 3, 0), (64, 128, 8, 2, 0), (32, 32, 4, 3, 0), (16, 16, 4, 2, 0)],
        256: [(64, 64, 4, 1, 0), (64, 32, 4, 2, 0), (64, 64, 8, 2, 0), (64, 32, 8, 2, 0), (64, 16, 8, 2, 0),
              (32, 32, 8, 2, 0), (32, 16, 4, 2, 0), (16, 16, 4, 1, 0)],
    },
    "bwd_kv": {
        64: [(32, 64, 4, 3, 0), (64, 128, 8, 2, 0), (32, 128, 8, 2, 0), (64, 128, 8, 3, 0), (32, 128, 8, 3, 0),
             (16, 128, 8, 3, 0), (64, 64, 4, 2, 0), (32, 32, 4, 3, 0), (16, 16, 4, 2, 0)],
        128: [(64, 64, 4, 2, 0), (32, 128, 8, 2, 0), (16, 128, 8, 2, 0), (32, 64, 8, 2, 0), (16, 64, 8, 2, 0),
              (16, 128, 8, 3, 0), (32, 32, 4, 2, 0), (16, 16, 4, 2, 0)],
        256: [(64, 64, 8, 1, 0), (64, 32, 4, 2, 0), (64, 16, 8, 2, 0), (64, 16, 8, 1, 0), (32, 16, 8, 2, 0),
              (16, 32, 8, 2, 0), (32, 32, 8, 2, 0), (16, 16, 4, 1, 0)],
    },
    "bwd_q": {
        64: [(64, 64, 4, 3, 0), (128, 32, 4, 3, 0), (128, 64, 8, 3, 0), (128, 32, 8, 3, 0), (128, 16, 4, 3, 0),
             (128, 64, 8, 2, 0), (64, 32, 4, 3, 0), (32, 32, 4, 3, 0), (16, 16, 4, 2, 0)],
        128: [(64, 64, 4, 2, 2), (64, 32, 4, 3, 2), (128, 32, 8, 2, 0), (128, 64, 8, 2, 0), (128, 32, 8, 3, 0),
              (128, 16, 8, 3, 0), (64, 64, 8, 2, 0), (64, 32, 4, 3, 0), (32, 32, 4, 3, 0), (16, 16, 4, 2, 0)],
        256: [(64, 16, 4, 2, 2), (64, 32, 4, 2, 0), (64, 32, 8, 2, 0), (64, 16, 8, 2, 0), (32, 32, 8, 2, 0),
              (32, 16, 8, 2, 0), (16, 16, 4, 1, 0)],
    },
    # The single-pass backward: the bwd_kv kernel that also adds dQ atomically.
    "bwd_fused": {
        64: [(64, 128, 8, 2, 0), (32, 128, 8, 2, 0), (64, 128, 8, 3, 0), (16, 128, 8, 2, 0), (32, 64, 4, 2, 0),
             (16, 64, 4, 2, 0), (64, 64, 4, 3, 0), (64, 128, 4, 2, 0), (32, 128, 4, 3, 0), (32, 32, 4, 2, 0),
             (16, 16, 4, 2, 0)],
        128: [(64, 128, 8, 2, 0), (32, 128, 8, 3, 0), (32, 128, 8, 2, 0), (16, 128, 8, 3, 0), (16, 128, 8, 2, 0),
              (16, 64, 8, 3, 0), (64, 64, 4, 2, 0), (32, 64, 4, 2, 0), (32, 32, 4, 2, 0), (16, 16, 4, 2, 0)],
        256: [(32, 16, 8, 2, 0), (16, 32, 8, 2, 0), (16, 16, 4, 1, 0)],
    },
}


def as_config(config: KernelConfig | Sequence[int]) -> KernelConfig:
    """A config from a (BLOCK_M, BLOCK_N, num_warps, num_stages[, skip mode]) tuple (skip mode
    SKIP_PREFETCH when left out), or the KernelConfig itself."""
    if isinstance(config, KernelConfig):
        return config
    if len(config) not in (4, 5):
        raise ValueError(f"sparsedrop attention config {tuple(config)}: expected (BLOCK_M, BLOCK_N, num_warps, "
                         "num_stages[, skip mode])")
    block_m, block_n, warps, stages, *skip = config
    return KernelConfig(tile_m=block_m, tile_n=block_n, warps=warps, stages=stages,
                        skip=skip[0] if skip else SKIP_PREFETCH)


CANDIDATES: dict[str, dict[int, list[KernelConfig]]] = {
    kind: {d: [as_config(c) for c in table] for d, table in by_dim.items()} for kind, by_dim in _CANDIDATE_TABLE.items()
}
# Where the kernel with TMA loads (``_tma_loads``) has another winner than the table's first (which
# compiled code, on pointer loads, takes), that config first when it fits. H200 sweep, session 17,
# 4x16x2048x128 causal, p = 0.1: the forward with TMA loads at 64 x 64 with the dense product
# (skip mode 2) 0.190 ms, at the table's first 64 x 32 0.227 (on pointer loads 64 x 32 is the best,
# 0.220).
TMA_FIRST: dict[tuple[str, int], KernelConfig] = {("fwd", 128): as_config((64, 64, 4, 3, 2))}
# Where a class of problems has another winner than the rules below it: (problem class, kind,
# head-dim class, TMA loads) -> that config first when it fits, before TMA_FIRST. The problem classes
# (``_Problem.problem_class``) are the problems each entry was timed on, dropout after the softmax:
# "plain", no attention mask (causal or not); "bool_mask", a bool attention mask shared by every
# query row (a key-padding (B, 1, 1, S) view); "bool_mask_rows", a bool mask whose rows differ
# (HF's materialised (B, 1, S, S) padding or causal-plus-padding mask).
# - plain, session 19 (call 1, sweep with --neighbours, 8x16x1024x64 / 16x32x2048x64 causal, p =
#   0.1): the forward with TMA loads at 64 x 128 on 2 stages 0.1005 / 0.759 ms against the table's
#   first 0.1015 / 0.783 (on pointer loads 64 x 128 is 13-21 % slower, session 17); dK/dV at 32 x 128
#   on 4 warps 0.196 / 1.562 against 32 x 64's 0.203 / 1.577; dQ with TMA loads on 2 stages 0.108 /
#   0.800 against 3 stages' 0.115 / 0.858. With a key-padding mask the first two lost (call 3,
#   64x12x512x64: whole op 0.758 ms against 0.692; 128-key tiles skip fewer fully padded keys).
# - bool masks, session 20 (calls 3-5, p = 0.1, the last quarter of every other sequence's keys
#   padded): at head dims up to 64 the forward on pointer loads (what compiled code runs) at 64 x 128
#   took 0.227 / 0.248 ms against the table's first (64 x 64) 0.287 / 0.338 with a key-padding view
#   (64x12x512x64 / 16x16x1024x64), 0.410 against 0.558 with HF's materialised padding mask
#   (64x12x512x64), 0.198 against 0.245 with its causal-plus-padding one (8x16x1024x64); with TMA
#   loads 64 x 64 stays the faster. At head dims 72-128 with a materialised mask (call 7; padding at
#   8x16x1024x128 / 4x16x2048x128, causal-plus-padding at 4x16x2048x128 / 16x16x512x128) the forward
#   with TMA loads skipping dropped tiles' V loads (skip mode 1) took 0.260 / 0.478 / 0.350 / 0.147
#   ms against TMA_FIRST's dense product (mode 2) 0.383 / 0.712 / 0.478 / 0.202, and dK/dV with the
#   dense product 0.299 / 0.542 / 0.351 / 0.138 against the table's first (mode 0) 0.326 / 0.592 /
#   0.403 / 0.155; with a key-padding view both defaults held (forward 0.187 against 0.216, dK/dV
#   0.282 against 0.288 at 8x16x1024x128).
PROBLEM_FIRST: dict[tuple[str, str, int, bool], KernelConfig] = {
    ("plain", "fwd", 64, True): as_config((64, 128, 4, 2, 0)),
    ("plain", "bwd_kv", 64, False): as_config((32, 128, 4, 3, 0)),
    ("plain", "bwd_q", 64, True): as_config((64, 64, 4, 2, 0)),
    ("bool_mask", "fwd", 64, False): as_config((64, 128, 4, 3, 0)),
    ("bool_mask_rows", "fwd", 64, False): as_config((64, 128, 4, 3, 0)),
    ("bool_mask_rows", "fwd", 128, True): as_config((64, 64, 4, 3, 1)),
    ("bool_mask_rows", "bwd_kv", 128, False): as_config((64, 64, 4, 2, 2)),
}

# Which backward runs by default, per head-dim class. The single pass does 7 tile products per kept
# tile against the two-pass 9 (see the notes) but adds dQ into an fp32 buffer; on Hopper those adds
# go out as TMA bulk reductions (elsewhere as element atomics). H200 sweeps (torch 2.11, triton 3.6,
# bf16, p=0.1, each pass timed alone by CUDA-graph replay; benchmarks/NOTES_attention.md): at head
# dim 64 the best single pass lost or tied (session 16; 8x16x1024x64: 0.320 against 0.311 ms;
# 16x32x2048x64 causal: 2.63 against 2.42), so 64 keeps two passes. At head dim 128 session 16 found
# the single pass with 64 x 128 tiles faster (0.675 ms against 0.749 at 4x16x2048x128 causal), but
# its table had no two-pass tile of 64 keys on 4 warps: session 18 timed those, and dK/dV at 64
# queries x 64 keys on 4 warps with 2 stages took 0.339 ms (against 0.493 for the table's first, 32
# x 128 on 8 warps) and dQ at 64 x 64 on 4 warps 0.231 (against 0.260), so two passes take 0.570 ms
# against the single pass's 0.681 in the same run, and forward + backward went 0.901 -> 0.785 ms
# (8x16x1024x128 0.809 -> 0.696, 4x16x2048x80 causal 0.838 -> 0.777). The first candidates for head
# dim 64 are the sweeps' winners for a 64x64 mask tile (plain and bool-masked problems: see
# PROBLEM_FIRST); for head dim 128 those of session 18 (the dQ pass's winner does not skip dropped
# tiles, skip mode 2: also fastest with pointer loads, 0.247 ms). The 256 class keeps two passes:
# there the best single pass took 5.5 ms against 3.4 ms for the two (4x16x2048x256 causal, session 16).
BACKWARD_STRATEGY = {64: "two_pass", 128: "two_pass", 256: "two_pass"}

# The mask tile the user layer uses by default (64 queries x 128 keys). On the H200 sweeps head
# dim 64 ran as fast with 64x64, 64x128 and 128x128 mask tiles (0.442-0.444 ms), while head dim
# 128 needs 128 keys per dK/dV tile (64x64: 1.48 ms, 64x128: 1.01 ms). It matches
# SparseDropConfig.attention_block.
DEFAULT_BLOCK = (64, 128)


def head_dim_class(head_dim: int) -> int:
    """The key of ``CANDIDATES`` and ``BACKWARD_STRATEGY`` for a head dim the kernels take: 64 for
    8-64, 128 for 72-128, 256 for 136-256 (the padded extent the kernels compute over, or a
    power of two above it)."""
    if not supported_head_dim(head_dim):
        raise ValueError(f"sparsedrop attention: head dim {head_dim!r}; the Triton kernels take {HEAD_DIM_RULE}")
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def padded_head_dim(head_dim: int) -> int:
    """The kernels' extent along the head dim (their BLOCK_D): the next power of two, at least 16."""
    return max(16, 1 << (int(head_dim) - 1).bit_length())


def backward_strategy(head_dim: int, override: str | None = None) -> str:
    """"two_pass" (a dK/dV pass and a dQ pass, deterministic) or "atomic" (one pass, dQ summed
    with fp32 atomics: fewer FLOPs, not bitwise reproducible; never used under
    torch.use_deterministic_algorithms)."""
    strategy = override or BACKWARD_STRATEGY[head_dim_class(head_dim)]
    if strategy not in ("two_pass", "atomic"):
        raise ValueError(f"sparsedrop attention backward strategy {strategy!r}: expected 'two_pass' or 'atomic'")
    if strategy == "atomic" and torch.are_deterministic_algorithms_enabled():
        return "two_pass"
    return strategy


def fits(config: KernelConfig, block: tuple[int, int]) -> bool:
    """Whether a config's kernel tile lies inside every (block_q, block_k) mask tile."""
    return block[0] % config.tile_m == 0 and block[1] % config.tile_n == 0


def _pick_config(kind: str, head_dim: int, block: tuple[int, int], override=None, tma_loads: bool = False,
                 problem: str | None = None) -> KernelConfig:
    """``override`` (it must fit the mask tile), else the first that fits of: PROBLEM_FIRST's
    config for the problem class (``problem``: see ``_Problem.problem_class``), TMA_FIRST's
    (``tma_loads``), the table's."""
    if override is not None:
        cfg = as_config(override)
        if not fits(cfg, block):
            raise ValueError(
                f"sparsedrop attention {kind} config {override}: its tile ({cfg.tile_m}, {cfg.tile_n}) must divide "
                f"the mask tile {block}; pick a config whose BLOCK_M divides {block[0]} and BLOCK_N divides {block[1]}"
            )
        return cfg
    cls = head_dim_class(head_dim)
    firsts = (PROBLEM_FIRST.get((problem, kind, cls, tma_loads)),
              TMA_FIRST.get((kind, cls)) if tma_loads else None)
    for first in firsts:
        if first is not None and fits(first, block):
            return first
    for cfg in CANDIDATES[kind][cls]:
        if fits(cfg, block):
            return cfg
    raise ValueError(f"sparsedrop attention: no {kind} kernel tile fits the mask tile {block}; "
                     "its sides must be multiples of 16")

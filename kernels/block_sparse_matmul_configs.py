"""Block-sparse matmuls' kernel configs: the candidate lists (best guess first) and the choice
among them, per problem key.

By default the first candidate that runs (an eager call) or, while a graph is traced, the first
whose buffers fit the GPU's shared memory, without compiling it (the compiled graph compiles
what it launches). With autotuning on (``mode="max-autotune"``, the backend's ``autotune``
option, ``SPARSEDROP_AUTOTUNE=1``) the fastest, timed once per key; while traced, on stand-in
tensors of the same (static) shapes (``runtime.Tuner``). Launchers in
``block_sparse_matmul_triton.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NoReturn

import torch
from torch import Tensor

from . import runtime, traced_descriptors
from .block_mask import cdiv
from .runtime import KernelConfig, hint, interpreting, next_pow2


def _fail(name: str, msg: str) -> NoReturn:
    """Raise a launcher's input error. Callers test the condition first and format ``msg`` only
    when it fails: formatting every message on every call cost more than the checks."""
    raise ValueError(f"sparsedrop {name}: {msg}")


# =========================================================================== configs
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

# dsd_tn's output (a weight gradient, K x N) is often small beside its reduction over every
# token: a 768 x 768 weight is 36 output tiles of 128 x 128 for an H200's 132 SMs, each a loop over
# all 8192 tokens of a 16 x 512 batch (75 us against cuBLAS's 22 for the dense product, measured).
# Such a problem splits each tile's reduction over up to _SPLIT_MAX programs (fp32 partial sums,
# added in order by a second launch), as many as fill the SMs once, each keeping at least
# _SPLIT_MIN_STEPS reduction steps.
_SPLIT_MAX = 4
_SPLIT_MIN_STEPS = 16


def reduction_split(cfg: KernelConfig, rows: int, K: int, N: int, out_batches: int, sms: int) -> int:
    """How many programs share each of dsd_tn's output tiles under ``cfg``: 1 unless the tiles
    fill at most half of the ``sms`` SMs and the reduction over ``rows`` is long enough to share."""
    tiles = out_batches * cdiv(K, cfg.tile_k) * cdiv(N, cfg.tile_n)
    if 2 * tiles > sms:
        return 1
    return max(1, min(_SPLIT_MAX, sms // tiles, rows // (cfg.tile_m * _SPLIT_MIN_STEPS)))


def prefer_tma(kind: str, N, K, operands: tuple) -> bool:
    """Whether a kernel whose operands can take TMA descriptors should try them first.

    Measured per kernel on an H200 (session 24: bf16, p = 0 to 0.5, the eight shapes of
    NOTES_kernels §17 that are not launch-bound): with pointer loads sdd took 15-29 % less time than
    with TMA loads (but at 6000 x 2000 x 3000, below), dsd_tn from 6 % less to 4 % more, and dsd
    0-19 % more at p <= 0.1 on the long reductions (less at higher p, and 13-20 % less with N =
    3072, K = 768). So TMA goes first for dsd only, and not in code that torch compiles for launches
    outside CUDA graphs: there Inductor's static launcher takes a pointer kernel, while a TMA one
    (its descriptors need global scratch) goes through Triton's Python launcher (NOTES_kernels
    §16-17: about 60 us a launch in a profile, though a host-bound BERT step was no faster without
    them).

    Except where a size or stride is not a multiple of 16 elements: Triton sees no alignment
    there, which the kernels restore only in part (``_aligned``: 16-byte loads, but at 6000 x
    2000 x 3000 the pointer tiles still took 5-14 % longer than TMA's, which need no alignment
    from the compiler). Then TMA goes first."""
    sizes = [N, K] + [s for t in operands if isinstance(t, Tensor) and t.dtype != torch.bool
                      for s in t.stride() if hint(s) != 1]
    if any(hint(s) % 16 for s in sizes):
        return True
    if kind != "dsd":
        return False
    compiled = any(runtime.is_traced(t) for t in operands if isinstance(t, Tensor))
    return not (compiled and traced_descriptors.static_launch() and not runtime.cuda_graphs())


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides n and is <= cap (n is a multiple of 16 here)."""
    d = 16
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def _fit_dim(extent: int, tile: int, floor: int = 16) -> int:
    """Shrink a tile toward a small extent: no point in a 256-wide tile over 45 columns."""
    return max(floor, min(tile, next_pow2(max(extent, 1))))


def candidate_configs(kind: str, M: int, N: int, K: int, block: tuple[int, int], dtype: torch.dtype, tma: bool = False,
                      second_keep: bool = False, tma_first: bool = True) -> list[KernelConfig]:
    """The short, shape-pruned config list for one kernel and problem, best guess first.

    Tiles are clamped so tile_m divides the block rows and tile_k the block columns, and shrunk
    toward small problem extents; duplicates are dropped. ``second_keep``: the call has a second
    mask over the N dim (sdd's ``reduce_keep``, dsd's ``out_keep``, dsd_tn's ``grad_keep``), so
    tile_n must divide the block columns too. ``tma``: the operands can take TMA descriptors;
    then ``tma_first`` says whether the TMA variants come first (see ``prefer_tma``) or the
    pointer ones, with TMA variants of the two best tilings after them for the tuner to time.
    """
    if kind not in _BASE_CONFIGS_16:
        raise ValueError(f"candidate_configs: kind={kind!r}, expected one of {sorted(_BASE_CONFIGS_16)}")
    br, bc = block
    if interpreting():
        # The interpreter runs numpy per program: one small config keeps the tests fast.
        tn = min(_fit_dim(N, 32), _pow2_divisor(bc, 32)) if second_keep else _fit_dim(N, 32)
        return [KernelConfig(_pow2_divisor(br, 32), tn, _pow2_divisor(bc, 32), 1, 4, 4, False)]
    base = (_BASE_CONFIGS_32 if dtype == torch.float32 else _BASE_CONFIGS_16)[kind]
    out_rows, out_cols = {"dsd": (M, N), "sdd": (M, K), "dsd_tn": (K, N)}[kind]
    # With at least ~2 waves of 128 x 128 output tiles, smaller tiles only lose reuse.
    big = cdiv(out_rows, 128) * cdiv(out_cols, 128) >= 256
    out: list[tuple[KernelConfig, int]] = []
    for tm, tn, tk, stages, warps in base:
        tm = min(_pow2_divisor(br, tm), _fit_dim(M, tm))
        tk = min(_pow2_divisor(bc, tk), _fit_dim(K, tk))
        tn = min(_fit_dim(N, tn), _pow2_divisor(bc, tn)) if second_keep else _fit_dim(N, tn)
        # Two warpgroups only pay on a 128 x 128 output tile or larger (each wgmma takes 64 rows).
        out_tile = {"dsd": tm * tn, "sdd": tm * tk, "dsd_tn": tk * tn}[kind]
        if out_tile < 128 * 128 and warps > 4:
            warps = 4
        cfg = KernelConfig(tm, tn, tk, stages, warps, 8, False)
        if all(cfg != c for c, _ in out):
            out.append((cfg, out_tile))
    large = [c for c, area in out if area >= 128 * 128]
    out = large if big and large else [c for c, _ in out]
    if tma and tma_first:
        out = [dataclasses.replace(c, tma=True) for c in out[: _MAX_CANDIDATES - 4]] + out[:2]
    elif tma:
        out = out[: _MAX_CANDIDATES - 4] + [dataclasses.replace(c, tma=True) for c in out[:2]]
    # The work-balanced schedule of the two best tilings goes first: at p = 0 it should cost
    # about what grid order does, with dropped blocks it is what makes time scale with (1 - p)
    # (the tuner also prefers it on near ties; see _Tuner.pick).
    out = [dataclasses.replace(c, balance=True) for c in out[:2]] + out
    return out[:_MAX_CANDIDATES]




# =========================================================================== tuning
# Tuning runs once per key, on a stand-in mask (p = 0.1) or whatever mask the first eager call
# brings (often p = 0, where every tile costs the same and grid order loses nothing); the choice
# is kept for all later masks, where the balanced schedule is the one that scales. So a balanced
# config within _BALANCE_TIE of the fastest is taken instead of it.
_BALANCE_TIE = 0.03
_TUNER = runtime.Tuner(tie=_BALANCE_TIE, prefer=lambda c: c.balance)
_STANDIN_P = 0.1


def tuned_configs() -> dict[tuple, KernelConfig]:
    """The configs chosen so far in this process, by problem key (for logs and benchmarks); a
    timed choice wins over an untimed one for the same key."""
    chosen = sorted(_TUNER.best.items(), key=lambda item: item[0][1])  # untimed first, timed overwrite
    return {key: cfg for (key, _timed), cfg in chosen}


def _choose(kind: str, key: tuple, M, N, K, block, dtype, tma_ok: bool, config: KernelConfig | None,
            run: Callable[..., None], operands: tuple, second_keep: bool = False,
            split_over: tuple | None = None) -> KernelConfig:
    """The config to launch: ``config`` if given (checked), else the tuned one for ``key``
    (which must tell calls with a ``second_keep`` apart: see candidate_configs).
    ``split_over`` (dsd_tn): (reduction rows, output batches), for ``reduction_split``.

    ``run(cfg, *operands)`` launches one config; while the operands are traced the candidates
    are timed on real stand-ins of them instead (``runtime.standin``).
    """
    if config is not None:
        if not (config.tile_m > 0 and block[0] % config.tile_m == 0 and block[1] % config.tile_k == 0):
            _fail(kind, f"config {config} must have tile_m dividing block rows {block[0]} and tile_k dividing block cols {block[1]}")
        if second_keep and block[1] % config.tile_n:
            _fail(kind, f"config {config} must have tile_n dividing block cols {block[1]} (a second mask lies over N)")
        if config.tma and not tma_ok:
            _fail(kind, f"config {config} asks for TMA but these operands/device cannot use it")
        if config.walk and (kind == "sdd" or config.tma or config.balance):
            _fail(kind, f"config {config}: walk is a dsd / dsd_tn schedule, with pointer loads and without balance")
        if config.split != 1 and (kind != "dsd_tn" or not 1 <= config.split <= 64):
            _fail(kind, f"config {config}: split={config.split} is a dsd_tn schedule of 1 to 64 programs a tile")
        return config
    # A launch-bound kernel (runtime.launch_bound) takes a config that launches once and cheaply:
    # no TMA; sdd without its persistent schedule, dsd and dsd_tn walking every block instead of
    # a kept-block list, whose build is one more launch (explicit configs above may still ask for
    # any of these on any size).
    light = runtime.launch_bound(M, N, K)
    tma = tma_ok and not light
    tma_first = tma and prefer_tma(kind, N, K, operands)
    key = (*key, light, tma_first)
    cfg = _TUNER.cached(key)
    if cfg is not None:
        return cfg
    cands = candidate_configs(kind, hint(M), hint(N), hint(K), block, dtype, tma=tma, second_keep=second_keep,
                              tma_first=tma_first)
    if light:
        cands = [c for c in cands if not c.balance]
        if kind != "sdd":
            cands = [dataclasses.replace(c, walk=True) for c in cands]
    device = next(t.device for t in operands if isinstance(t, Tensor))
    if split_over is not None and device.type == "cuda" and not interpreting():
        sms = runtime.sm_resources(device)[0]
        rows, out_batches = (hint(n) for n in split_over)
        split = [dataclasses.replace(c, split=n) for c in cands[:2]
                 if (n := reduction_split(c, rows, hint(K), hint(N), out_batches, sms)) > 1]
        cands = (split + cands)[:_MAX_CANDIDATES]
    if not any(runtime.is_traced(t) for t in operands):
        return _TUNER.pick(key, cands, lambda c: run(c, *operands))
    if not _TUNER.timed(len(cands)) or runtime.has_symbolic_sizes(operands):
        # While tracing and not timing (or with sizes that stand-ins cannot reproduce, since
        # ``run`` closes over the symbolic ones): the first candidate whose buffers fit the
        # device's shared memory, without compiling it here. The compiled graph compiles what
        # it launches; a trial compile now would only double the compile time.
        elem = dtype.itemsize
        return _TUNER.first_that_fits(key, cands, lambda c: _fits_shared_memory(kind, c, elem, device))
    with runtime.real_tensors():
        standins = tuple(_standin(t) for t in operands)
        return _TUNER.pick(key, cands, lambda c: run(c, *standins))


def _standin(t):
    if isinstance(t, Tensor) and t.dtype == torch.bool:  # a keep mask: blocks kept with prob. 1 - p
        return torch.rand([hint(s) for s in t.shape], device=t.device) >= _STANDIN_P
    return runtime.standin(t) if isinstance(t, Tensor) else t


def _shared_estimate(kind: str, cfg: KernelConfig, elem_size: int) -> int:
    """Bytes of shared memory a config's program needs, estimated from its tiles: the two
    operand tiles per pipeline stage, plus the output tile a TMA epilogue stores from."""
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    operands, out = {"dsd": (tm * tk + tk * tn, tm * tn),  # a (m, k), b (k, n); out (m, n)
                     "sdd": (tm * tn + tn * tk, tm * tk),  # g (m, n), b (n, k); out (m, k)
                     "dsd_tn": (tm * tk + tm * tn, tk * tn)}[kind]  # a (m, k), g (m, n); out (k, n)
    return (cfg.stages * operands + (out if cfg.tma else 0)) * elem_size


def _fits_shared_memory(kind: str, cfg: KernelConfig, elem_size: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    _, smem, _ = runtime.sm_resources(device)
    return _shared_estimate(kind, cfg, elem_size) + 1024 <= smem  # 1 KiB per block is the driver's

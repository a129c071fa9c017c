"""The Triton block-sparse matmuls against the plain-PyTorch reference (the oracle).

Without a GPU these run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so the CPU shapes stay small. Tests marked ``gpu`` run the full-size problems and every
candidate config (TMA and pointer variants) on a CUDA device.

Tolerances: each result is compared with a float64 reference computed from the same
(low-precision) inputs. The kernels accumulate in fp32 and round once to the output dtype, so
the error is about half an ulp of the output dtype (rtol) plus fp32 summation noise (atol).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sparsedrop_compile import ops  # (importing it registers torch.ops.sparsedrop)
from sparsedrop_compile.kernels import block_sparse_matmul as ref
from sparsedrop_compile.kernels import block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels import runtime
from sparsedrop_compile.kernels.block_mask import cdiv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, params=["launch-bound", "large"])
def problem_size_class(request, monkeypatch):
    """The default config depends on whether a problem is launch-bound (runtime.launch_bound):
    then dsd and dsd_tn walk every block and read dropped ones as zeros, sdd runs in grid order;
    else kept-block lists, work balance and the persistent sdd. Every test size here is small,
    so each test runs once as it is and once with every size counted as large. GPU tests pass
    their configs explicitly (walk variants included): they run once."""
    if request.param == "large":
        if "gpu" in request.node.keywords:
            pytest.skip("GPU tests choose their configs explicitly; one run covers both classes")
        monkeypatch.setattr(runtime, "LAUNCH_BOUND_WORK", 0)
    return request.param

# (dtype, atol, rtol): rtol covers one rounding to the output dtype, atol the fp32 summation
# noise near zero (scaled by the output magnitude in _assert_close). fp16 rounds to nearest:
# half an ulp is <= 2^-11 relative. bf16 gets a full ulp (2^-7 relative at worst) because the
# interpreter's fp32 -> bf16 conversion truncates; on the GPU it rounds to nearest.
TOLERANCES = [
    (torch.float32, 1e-4, 1e-5),
    (torch.float16, 1e-3, 1e-3),
    (torch.bfloat16, 1e-3, 8e-3),
]
TOL = {dt: (atol, rtol) for dt, atol, rtol in TOLERANCES}

# (B, Bb, M, K, N, block): ragged everywhere; blocks with 1, 2 and 3 tiles per block.
SHAPES = [
    (1, 1, 77, 100, 45, (32, 32)),
    (2, 1, 45, 96, 33, (16, 48)),
    (2, 2, 50, 40, 29, (32, 16)),
    (2, 2, 64, 64, 32, (64, 32)),
]


def _keep(B, M, K, block, p, gen):
    shape = (B, cdiv(M, block[0]), cdiv(K, block[1]))
    return torch.rand(shape, generator=gen) >= p


def _inputs(B, Bb, M, K, N, block, dtype, p, seed=0, b_transposed=False):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, M, K, generator=gen).to(dtype)
    if b_transposed:  # linear's layout: b = weight.t(), K contiguous
        b = torch.randn(Bb, N, K, generator=gen).to(dtype).transpose(1, 2)
    else:
        b = torch.randn(Bb, K, N, generator=gen).to(dtype)
    g = torch.randn(B, M, N, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    keep = _keep(B, M, K, block, p, gen)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(a), to(b), to(g), to(bias), to(keep)


def _poison_dropped(a, keep, block):
    """NaN in every dropped block of a: the kernels must never read them."""
    mask = ref.expand_block_keep(keep, a.shape[1], a.shape[2], *block)
    return torch.where(mask, a, torch.full((), float("nan"), dtype=a.dtype, device=a.device))


def _nan_like(shape, like):
    return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)


def _assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert not torch.isnan(actual).any(), "an output element was left unwritten (NaN poison survived)"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * max(1.0, expected.abs().max().item() / 10), rtol=rtol)


def _d(*ts):
    return [t.double() if t is not None else None for t in ts]


# --------------------------------------------------------------------------- launchers vs reference
@pytest.mark.parametrize("dtype", [t[0] for t in TOLERANCES], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}Bb{s[1]}_{s[2]}x{s[3]}x{s[4]}_blk{s[5][0]}x{s[5][1]}")
def test_dsd(shape, dtype):
    B, Bb, M, K, N, block = shape
    p = 0.5
    a, b, _, bias, keep = _inputs(B, Bb, M, K, N, block, dtype, p, seed=1)
    scale = 1 / (1 - p)
    a_poisoned = _poison_dropped(a, keep, block)
    out = tri.dsd(a_poisoned, b, keep, scale, block, bias, out=_nan_like((B, M, N), a))
    _assert_close(out, ref.reference_dsd(*_d(a, b), keep, scale, block, bias.double()), dtype)


@pytest.mark.parametrize("dtype", [t[0] for t in TOLERANCES], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}Bb{s[1]}_{s[2]}x{s[3]}x{s[4]}_blk{s[5][0]}x{s[5][1]}")
def test_sdd(shape, dtype):
    B, Bb, M, K, N, block = shape
    p = 0.5
    _, b, g, _, keep = _inputs(B, Bb, M, K, N, block, dtype, p, seed=2)
    out = tri.sdd(g, b, keep, 2.0, block, out=_nan_like((B, M, K), g))
    expected = ref.reference_sdd(*_d(g, b), keep, 2.0, block)
    _assert_close(out, expected, dtype)
    dropped = ~ref.expand_block_keep(keep, M, K, *block)
    assert (out[dropped] == 0).all(), "sdd must write exact zeros into dropped blocks"


@pytest.mark.parametrize("dtype", [t[0] for t in TOLERANCES], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}Bb{s[1]}_{s[2]}x{s[3]}x{s[4]}_blk{s[5][0]}x{s[5][1]}")
def test_dsd_tn(shape, dtype):
    B, Bb, M, K, N, block = shape
    p = 0.5
    a, _, g, _, keep = _inputs(B, Bb, M, K, N, block, dtype, p, seed=3)
    batched = Bb == B and B > 1
    Bo = B if batched else 1
    out = tri.dsd_tn(_poison_dropped(a, keep, block), g, keep, 2.0, block, batched, out=_nan_like((Bo, K, N), a))
    _assert_close(out, ref.reference_dsd_tn(*_d(a, g), keep, 2.0, block, batched), dtype)


# Sizes and strides that are multiples of 8 but not of 16 elements: the kernels rewrite them as
# x // ALIGN * ALIGN so that the compiler sees the alignment (tri._alignment, _aligned). The
# expected ALIGN per case; a row stride of 75 (a padded view of a) or 76 lowers it.
ALIGN_CASES = [  # (M, K, N, a's padded row length or None, expected ALIGN for 16-bit / fp32 of
    (56, 72, 40, None, (8, 4), (8, 4)),  # dsd and dsd_tn, then of sdd, which reads g and b, not a)
    (56, 76, 40, None, (4, 4), (4, 4)),
    (56, 72, 40, 75, (1, 1), (8, 4)),
]


@pytest.mark.parametrize("dtype", [t[0] for t in TOLERANCES], ids=str)
@pytest.mark.parametrize("case", ALIGN_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}_row{c[3]}")
@pytest.mark.parametrize("b_transposed", [False, True], ids=["b_kn", "b_nk"])
def test_alignment_hint_is_exact(case, dtype, b_transposed, monkeypatch):
    """The three launchers pass the ALIGN their operands allow, and with it compute what the
    reference does on ragged shapes (the mask blocks end inside K and M)."""
    M, K, N, row, aligns, sdd_aligns = case
    B, Bb, block, p = 2, 1, (32, 32), 0.5
    a, b, g, _, keep = _inputs(B, Bb, M, K, N, block, dtype, p, seed=5, b_transposed=b_transposed)

    def rows_apart(t):  # a view of t whose rows lie `row` elements apart
        if row is None:
            return t
        return torch.cat([t, torch.zeros(B, M, row - K, dtype=dtype, device=t.device)], dim=2)[..., :K]
    seen = {}
    real_launch = tri.launch

    def recording_launch(kernel):
        launcher = real_launch(kernel)

        class Grid:
            def __getitem__(self, grid):
                def call(*args, **kwargs):
                    seen[getattr(kernel, "__name__", None) or kernel.fn.__name__] = kwargs["ALIGN"]
                    return launcher[grid](*args, **kwargs)
                return call
        return Grid()

    monkeypatch.setattr(tri, "launch", recording_launch)
    expected_align = aligns[1] if dtype == torch.float32 else aligns[0]
    scale = 1 / (1 - p)
    out = tri.dsd(rows_apart(_poison_dropped(a, keep, block)), b, keep, scale, block, out=_nan_like((B, M, N), a))
    _assert_close(out, ref.reference_dsd(*_d(a, b), keep, scale, block), dtype)
    out = tri.sdd(g, b, keep, scale, block, out=_nan_like((B, M, K), g))
    _assert_close(out, ref.reference_sdd(*_d(g, b), keep, scale, block), dtype)
    out = tri.dsd_tn(rows_apart(_poison_dropped(a, keep, block)), g, keep, scale, block, False, out=_nan_like((1, K, N), a))
    _assert_close(out, ref.reference_dsd_tn(*_d(a, g), keep, scale, block, False), dtype)
    sdd_align = sdd_aligns[1] if dtype == torch.float32 else sdd_aligns[0]
    assert seen == {"_dsd_kernel": expected_align, "_dsd_tn_kernel": expected_align, "_sdd_kernel": sdd_align}, seen


def test_alignment_needs_unit_strides_and_known_multiples():
    """_alignment: 16 bytes' worth of elements at most, halved until every value divides, 1
    when a stride meant to be the unit one is not, or a symbolic value is not known to divide."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    assert tri._alignment(2, (40, 72, 56 * 72, 72), (1,)) == 8
    assert tri._alignment(4, (40, 72), (1,)) == 4
    assert tri._alignment(2, (40, 76), (1,)) == 4
    assert tri._alignment(2, (40, 75), (1,)) == 1
    assert tri._alignment(2, (40, 72), (1, 40)) == 1
    env = ShapeEnv()
    rows = env.create_unbacked_symint()  # any row count
    assert tri._alignment(2, (40, 72, rows * 72), (1,)) == 8  # a multiple of 72 is one of 8
    assert tri._alignment(2, (40, 72, rows), (1,)) == 1  # not known to divide: no hint


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_all_three_at_p(p):
    """One shape through all kernels at several drop rates, linear's transposed b included."""
    dtype = torch.float16
    B, Bb, M, K, N, block = 1, 1, 70, 96, 40, (32, 32)
    a, b, g, bias, keep = _inputs(B, Bb, M, K, N, block, dtype, p, seed=4, b_transposed=True)
    scale = 1 / (1 - p)
    _assert_close(tri.dsd(a, b, keep, scale, block, bias), ref.reference_dsd(*_d(a, b), keep, scale, block, bias.double()), dtype)
    _assert_close(tri.sdd(g, b, keep, scale, block), ref.reference_sdd(*_d(g, b), keep, scale, block), dtype)
    _assert_close(tri.dsd_tn(a, g, keep, scale, block, False), ref.reference_dsd_tn(*_d(a, g), keep, scale, block, False), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transposed_and_strided_operands(dtype):
    """Non-contiguous views go in as strides (no copies): transposed b, a column slice of a,
    a transposed grad, a transposed (N, K)-major dsd_tn output."""
    gen = torch.Generator().manual_seed(5)
    B, M, K, N, block = 2, 40, 48, 36, (16, 16)
    a = torch.randn(B, M, K + 7, generator=gen).to(dtype).to(DEVICE)[:, :, 3 : 3 + K]  # row stride K + 7
    b = torch.randn(1, N, K, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)  # (1, K, N), K contiguous
    g = torch.randn(B, N, M, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)  # (B, M, N), M contiguous
    keep = _keep(B, M, K, block, 0.4, gen).to(DEVICE)
    assert not a.is_contiguous() and not b.is_contiguous() and not g.is_contiguous()
    _assert_close(tri.dsd(a, b, keep, 1.5, block), ref.reference_dsd(*_d(a, b), keep, 1.5, block), dtype)
    _assert_close(tri.sdd(g, b, keep, 1.5, block), ref.reference_sdd(*_d(g, b), keep, 1.5, block), dtype)
    out_nk = _nan_like((1, N, K), a).transpose(1, 2)  # what linear's weight gradient wants
    got = tri.dsd_tn(a, g, keep, 1.5, block, False, out=out_nk)
    assert got.data_ptr() == out_nk.data_ptr()
    _assert_close(got, ref.reference_dsd_tn(*_d(a, g), keep, 1.5, block, False), dtype)


@pytest.mark.parametrize("fill", [True, False], ids=["keep_all", "drop_all"])
def test_keep_all_and_drop_all(fill):
    dtype = torch.float16
    B, Bb, M, K, N, block = 2, 1, 40, 50, 30, (16, 16)
    a, b, g, bias, keep = _inputs(B, Bb, M, K, N, block, dtype, 0.5, seed=6)
    keep = torch.full_like(keep, fill)
    out = tri.dsd(a, b, keep, 2.0, block, bias)
    sdd_out = tri.sdd(g, b, keep, 2.0, block)
    tn_out = tri.dsd_tn(a, g, keep, 2.0, block, False)
    if fill:
        _assert_close(out, torch.matmul(a.double(), b.double()) * 2 + bias.double(), dtype)
        _assert_close(sdd_out, torch.matmul(g.double(), b.double().transpose(1, 2)) * 2, dtype)
        _assert_close(tn_out, (a.double().reshape(-1, K).t() @ g.double().reshape(-1, N)).unsqueeze(0) * 2, dtype)
    else:
        assert torch.equal(out, bias.expand(B, M, N)), "nothing kept: dsd is the bias alone"
        assert torch.equal(sdd_out, torch.zeros_like(sdd_out))
        assert torch.equal(tn_out, torch.zeros_like(tn_out))


def test_explicit_tile_split_config():
    """A config with tiles smaller than the block in both masked dims (2 x 2 tiles per block)."""
    dtype = torch.float16
    B, Bb, M, K, N, block = 1, 1, 70, 90, 40, (32, 32)
    a, b, g, bias, keep = _inputs(B, Bb, M, K, N, block, dtype, 0.3, seed=7)
    cfg = tri.KernelConfig(tile_m=16, tile_n=16, tile_k=16, stages=2, warps=4, group=2)
    _assert_close(tri.dsd(a, b, keep, 1.2, block, bias, config=cfg), ref.reference_dsd(*_d(a, b), keep, 1.2, block, bias.double()), dtype)
    _assert_close(tri.sdd(g, b, keep, 1.2, block, config=cfg), ref.reference_sdd(*_d(g, b), keep, 1.2, block), dtype)
    _assert_close(tri.dsd_tn(a, g, keep, 1.2, block, False, config=cfg), ref.reference_dsd_tn(*_d(a, g), keep, 1.2, block, False), dtype)


# --------------------------------------------------------------------------- dsd_tn's split reduction
@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("schedule", ["lists", "walk", "balanced"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}Bb{s[1]}_{s[2]}x{s[3]}x{s[4]}_blk{s[5][0]}x{s[5][1]}")
def test_dsd_tn_split_reduction(shape, schedule, split):
    """dsd_tn with each output tile's reduction shared by ``split`` programs (fp32 partial sums
    added by _sum_splits_kernel), over kept-block lists, the walk over every block and the
    balanced order: summed and batched outputs, a strided output (linear's weight.T layout), ragged
    reductions whose last share is short or empty."""
    B, Bb, M, K, N, block = shape
    dtype = torch.float16
    a, _, g, _, keep = _inputs(B, Bb, M, K, N, block, dtype, 0.4, seed=31)
    batched = Bb == B and B > 1
    Bo = B if batched else 1
    cfg = tri.KernelConfig(tile_m=16, tile_n=16, tile_k=16, stages=1, warps=4, group=2, split=split,
                           walk=schedule == "walk", balance=schedule == "balanced")
    out = _nan_like((Bo, N, K), a).transpose(1, 2)  # (Bo, K, N) with N-major strides
    tri.dsd_tn(_poison_dropped(a, keep, block), g, keep, 1.5, block, batched, out=out, config=cfg)
    _assert_close(out, ref.reference_dsd_tn(*_d(a, g), keep, 1.5, block, batched), dtype)


def test_dsd_tn_split_with_second_mask_and_empty_mask():
    """The output side's dW (grad_keep masks the second operand) with a split reduction, and a
    mask that keeps nothing (every share empty: exact zeros)."""
    B, Bb, M, K, N, block = SHAPES[2]
    dtype = torch.bfloat16
    x, _, g, _, keep_out, keep_in = _out_side_inputs(B, Bb, M, K, N, block, dtype, 32)
    cfg = tri.KernelConfig(tile_m=16, tile_n=16, tile_k=16, stages=1, warps=4, group=2, split=3)
    dw = tri.dsd_tn(_poison_dropped(g, keep_out, block), _poison_dropped(x, keep_in, block), keep_out, 1.25, block,
                    True, grad_keep=keep_in, out=_nan_like((B, N, K), g), config=cfg)
    _assert_close(dw, ref.reference_dsd_tn(*_d(g, x), keep_out, 1.25, block, True, grad_keep=keep_in), dtype)
    none = torch.zeros_like(keep_out)
    out = tri.dsd_tn(g, x, none, 1.25, block, True, grad_keep=keep_in, out=_nan_like((B, N, K), g), config=cfg)
    assert torch.equal(out, torch.zeros_like(out))


def test_reduction_split_rule():
    """Split only where the output tiles fill at most half the SMs, as far as fills them once,
    at most _SPLIT_MAX ways, and never below _SPLIT_MIN_STEPS reduction steps a program."""
    from sparsedrop_compile.kernels import block_sparse_matmul_configs as configs

    cfg = tri.KernelConfig(tile_m=64, tile_n=128, tile_k=128)
    assert configs.reduction_split(cfg, 8192, 768, 768, 1, 132) == 3  # 36 tiles: 108 programs
    assert configs.reduction_split(cfg, 2048, 768, 768, 1, 132) == 2  # 32 steps: two shares of 16
    assert configs.reduction_split(cfg, 1024, 768, 768, 1, 132) == 1  # 16 steps: not shared
    assert configs.reduction_split(cfg, 8192, 3072, 768, 1, 132) == 1  # 144 tiles fill the SMs
    assert configs.reduction_split(cfg, 8192, 256, 256, 1, 132) == configs._SPLIT_MAX  # 4 tiles
    assert configs.reduction_split(cfg, 8192, 768, 768, 4, 132) == 1  # batched: 144 tiles
    with pytest.raises(ValueError, match="split=2 is a dsd_tn schedule"):
        a, b, _, _, keep = _inputs(1, 1, 32, 32, 16, (16, 16), torch.float32, 0.0)
        tri.dsd(a, b, keep, 1.0, (16, 16), config=dataclasses.replace(cfg, tile_m=16, tile_n=16, tile_k=16, split=2))


def _lists(keep, by, line_len, **kw):
    """kept_lists' flat buffers (one spare entry) as (n_lines,) counts and (n_lines, line_len) index."""
    counts, index, *order = tri.kept_lists(keep, by, **kw)
    assert counts.dim() == index.dim() == 1 and (index.numel() - 1) == (counts.numel() - 1) * line_len
    return (counts[:-1], index[:-1].view(-1, line_len), *(o[:-1] for o in order))


def test_kept_lists():
    gen = torch.Generator().manual_seed(8)
    keep = (torch.rand(3, 5, 7, generator=gen) > 0.5).to(DEVICE)
    counts, index = _lists(keep, "row", 7)
    for line, flags in enumerate(keep.reshape(-1, 7)):
        kept = flags.nonzero().flatten().tolist()
        assert counts[line].item() == len(kept)
        assert index[line, : len(kept)].tolist() == kept
    counts, index = _lists(keep, "col_sum", 15)
    for c in range(7):
        kept = keep[:, :, c].reshape(-1).nonzero().flatten().tolist()  # entries b * nR + r
        assert counts[c].item() == len(kept) and index[c, : len(kept)].tolist() == kept
    counts, index = _lists(keep, "col", 5)
    for line in range(3 * 7):
        bat, c = divmod(line, 7)
        kept = keep[bat, :, c].nonzero().flatten().tolist()
        assert counts[line].item() == len(kept) and index[line, : len(kept)].tolist() == kept


@pytest.mark.parametrize("dropped", [False, True], ids=["kept", "dropped"])
def test_kept_lists_flat(dropped):
    """by="all": one list of every kept (or dropped) block, numbered (b*nR + r)*nC + c, also
    read through a padded view of the flags (the extra row and column never listed)."""
    gen = torch.Generator().manual_seed(9)
    padded = (torch.rand(3, 6, 8, generator=gen) > 0.4).to(DEVICE)
    for keep, blocks in ((padded[:, :5, :7].contiguous(), None), (padded.reshape(18, 8)[:15, :7].reshape(3, 5, 7), (3, 5, 7))):
        counts, index = _lists(keep, "all", 3 * 5 * 7, blocks=blocks, dropped=dropped)
        flags = keep.reshape(-1) if not dropped else ~keep.reshape(-1)
        listed = flags.nonzero().flatten().tolist()
        assert counts[0].item() == len(listed) and index[0, : len(listed)].tolist() == listed


def test_kept_pairs():
    """The paired sdd's lists: each column's kept blocks in order, its last repeated when their
    count is odd (so a pair never spans two columns), then every dropped block column by column;
    also through a padded view of the flags."""
    gen = torch.Generator().manual_seed(10)
    padded = (torch.rand(3, 6, 8, generator=gen) > 0.4).to(DEVICE)
    B, nR, nC = 3, 5, 7
    for keep, blocks in ((padded[:, :5, :7].contiguous(), None), (padded.reshape(18, 8)[:15, :7].reshape(3, 5, 7), (3, 5, 7))):
        counts, index, drop_index = tri.kept_pairs(keep, blocks=blocks)
        flags = keep.reshape(-1).tolist()
        paired, dropped = [], []
        for c in range(nC):
            column = [e * nC + c for e in range(B * nR) if flags[e * nC + c]]
            paired += column + column[-1:] * (len(column) % 2)
            dropped += [e * nC + c for e in range(B * nR) if not flags[e * nC + c]]
        assert counts[0].item() * 2 == len(paired) and index[: len(paired)].tolist() == paired
        assert counts[1].item() == len(dropped) and drop_index[: len(dropped)].tolist() == dropped
    assert not tri.pairs_fit((1, 0, 4))
    with pytest.raises(ValueError, match="too large"):
        tri.kept_pairs(keep, blocks=(1, 2**20, 64))


@pytest.mark.parametrize("group", [1, 2, 4, 16])
def test_kept_grouped(group):
    """The flat sdd's lists in tile order: kept blocks group by group of rows (batch entries' rows
    in sequence), column by column within a group, in increasing row order within a column; the
    dropped blocks likewise; also through a padded view of the flags."""
    gen = torch.Generator().manual_seed(11)
    padded = (torch.rand(3, 6, 8, generator=gen) > 0.4).to(DEVICE)
    B, nR, nC = 3, 5, 7
    for keep, blocks in ((padded[:, :5, :7].contiguous(), None), (padded.reshape(18, 8)[:15, :7].reshape(3, 5, 7), (3, 5, 7))):
        counts, index, drop_index = tri.kept_grouped(keep, group, blocks=blocks)
        flags = keep.reshape(-1).tolist()
        listed, dropped = [], []
        for g0 in range(0, B * nR, group):
            for c in range(nC):
                for e in range(g0, min(g0 + group, B * nR)):
                    (listed if flags[e * nC + c] else dropped).append(e * nC + c)
        assert counts[0].item() == len(listed) and index[: len(listed)].tolist() == listed
        assert counts[1].item() == len(dropped) and drop_index[: len(dropped)].tolist() == dropped
    assert not tri.grouped_fit((1, 0, 4), 8)
    with pytest.raises(ValueError, match="too large"):
        tri.kept_grouped(keep, 8, blocks=(1, 2**20, 64))
    with pytest.raises(ValueError, match="power of two"):
        tri.kept_grouped(keep, 3)


def test_unsupported_reason():
    x = torch.zeros(2, 4, device=DEVICE)
    assert tri.unsupported_reason((x, x), (32, 32)) is None
    assert "multiples of 16" in tri.unsupported_reason((x, x), (24, 32))
    assert "dtype" in tri.unsupported_reason((x.double(), x.double()), (32, 32))
    assert "different dtypes" in tri.unsupported_reason((x, x.half()), (32, 32))


def test_bad_arguments_name_the_problem():
    a = torch.zeros(1, 32, 32, device=DEVICE)
    b = torch.zeros(1, 32, 16, device=DEVICE)
    with pytest.raises(ValueError, match="keep must be a bool tensor of shape"):
        tri.dsd(a, b, torch.ones(1, 3, 2, dtype=torch.bool, device=DEVICE), 1.0, (32, 32))
    with pytest.raises(ValueError, match="b must be"):
        tri.dsd(a, torch.zeros(1, 31, 16, device=DEVICE), torch.ones(1, 1, 1, dtype=torch.bool, device=DEVICE), 1.0, (32, 32))
    with pytest.raises(ValueError, match="tile_m dividing"):
        tri.dsd(a, b, torch.ones(1, 1, 1, dtype=torch.bool, device=DEVICE), 1.0, (32, 32), config=tri.KernelConfig(64, 16, 16, 1, 4))


# --------------------------------------------------------------------------- work-balanced schedule
# (B, Bb, M, K, N, block, tile_m, tile_k): ragged shapes, 1-4 tiles per mask block, batched
# with shared and per-batch b. tile_k = 32 lets the persistent sdd split its last round.
BALANCED_SHAPES = [
    (1, 1, 77, 100, 45, (32, 32), 16, 32),
    (2, 1, 45, 96, 33, (16, 48), 16, 16),
    (2, 2, 50, 72, 29, (32, 64), 32, 32),
]


def _balanced_cfg(tile_m, tile_k):
    return tri.KernelConfig(tile_m=tile_m, tile_n=16, tile_k=tile_k, stages=1, warps=4, group=2, balance=True)


def _padded(keep, spare):
    """``keep`` with one spare block in each of its last two dims (block_mask.padded), set to ``spare``."""
    B, nr, nc = keep.shape
    out = torch.full((B, nr + 1, nc + 1), spare, dtype=torch.bool, device=keep.device)
    out[:, :nr, :nc] = keep
    return out


def test_padded_keep_reads_only_the_operands_blocks():
    """A compiled graph's keep has one spare block per matrix dim (block_mask.padded); the
    launchers read it through its strides, so whatever the spare flags hold is never seen. The
    same for the output side's second masks (dsd's out_keep, sdd's reduce_keep, dsd_tn's
    grad_keep), each read with its operand's block counts."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2, 40, 48, generator=g).to(DEVICE)
    b = torch.randn(2, 48, 24, generator=g).to(DEVICE)
    grad = torch.randn(2, 40, 24, generator=g).to(DEVICE)
    bias = torch.randn(48, generator=g).to(DEVICE)
    block = (16, 16)
    keep = torch.rand(2, 3, 3, generator=g).to(DEVICE) > 0.4  # over a (and sdd's output)
    keep_mn = torch.rand(2, 3, 2, generator=g).to(DEVICE) > 0.4  # over grad / dsd's output: the second masks
    for spare, cfg in ((False, None), (True, None), (True, _balanced_cfg(16, 16))):  # grid order and work-balanced
        padded, padded_mn = _padded(keep, spare), _padded(keep_mn, spare)
        kw = {"config": cfg}
        pairs = [
            (tri.dsd(a, b, padded, 1.5, block, **kw), tri.dsd(a, b, keep, 1.5, block, **kw)),
            (tri.sdd(grad, b, padded, 1.5, block, **kw), tri.sdd(grad, b, keep, 1.5, block, **kw)),
            (tri.dsd_tn(a, grad, padded, 1.5, block, True, **kw), tri.dsd_tn(a, grad, keep, 1.5, block, True, **kw)),
            (tri.dsd_tn(a, grad, padded, 1.5, block, False, **kw), tri.dsd_tn(a, grad, keep, 1.5, block, False, **kw)),
            # the second masks (and sdd's bias, added in kept tiles only)
            (tri.dsd(a, b, padded, 1.5, block, out_keep=padded_mn, **kw), tri.dsd(a, b, keep, 1.5, block, out_keep=keep_mn, **kw)),
            (tri.sdd(grad, b, padded, 1.5, block, bias, bias_scale=0.5, reduce_keep=padded_mn, **kw),
             tri.sdd(grad, b, keep, 1.5, block, bias, bias_scale=0.5, reduce_keep=keep_mn, **kw)),
            (tri.dsd_tn(a, grad, padded, 1.5, block, True, grad_keep=padded_mn, **kw),
             tri.dsd_tn(a, grad, keep, 1.5, block, True, grad_keep=keep_mn, **kw)),
            (tri.dsd_tn(a, grad, padded, 1.5, block, False, grad_keep=padded_mn, **kw),
             tri.dsd_tn(a, grad, keep, 1.5, block, False, grad_keep=keep_mn, **kw)),
        ]
        for got, expected in pairs:
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # the references (opaque ops) cut them: the same results from padded masks
    dsd_ref, sdd_ref, tn_ref = (ops.MATMUL.reference[k] for k in ("dsd", "sdd", "dsd_tn"))
    for spare in (False, True):
        padded, padded_mn = _padded(keep, spare), _padded(keep_mn, spare)
        torch.testing.assert_close(dsd_ref(a, b, padded, 1.5, block, out_keep=padded_mn),
                                   ref.reference_dsd(a, b, keep, 1.5, block, out_keep=keep_mn), rtol=0, atol=0)
        torch.testing.assert_close(sdd_ref(grad, b, padded, 1.5, block, bias, bias_scale=0.5, reduce_keep=padded_mn),
                                   ref.reference_sdd(grad, b, keep, 1.5, block, bias, bias_scale=0.5, reduce_keep=keep_mn),
                                   rtol=0, atol=0)
        torch.testing.assert_close(tn_ref(a, grad, padded, 1.5, block, False, grad_keep=padded_mn),
                                   ref.reference_dsd_tn(a, grad, keep, 1.5, block, False, grad_keep=keep_mn), rtol=0, atol=0)


def _check_all_three(B, Bb, M, K, N, block, cfg, keep, seed):
    dtype = torch.float16
    a, b, g, bias, _ = _inputs(B, Bb, M, K, N, block, dtype, 0.5, seed=seed)
    keep = keep.to(DEVICE)
    a_p = _poison_dropped(a, keep, block)
    out = tri.dsd(a_p, b, keep, 1.5, block, bias, out=_nan_like((B, M, N), a), config=cfg)
    _assert_close(out, ref.reference_dsd(*_d(a, b), keep, 1.5, block, bias.double()), dtype)
    out = tri.sdd(g, b, keep, 1.5, block, out=_nan_like((B, M, K), g), config=cfg)
    _assert_close(out, ref.reference_sdd(*_d(g, b), keep, 1.5, block), dtype)
    assert (out[~ref.expand_block_keep(keep, M, K, *block)] == 0).all(), "dropped blocks must be exact zeros"
    batched = Bb == B and B > 1
    out = tri.dsd_tn(a_p, g, keep, 1.5, block, batched, out=_nan_like((B if batched else 1, K, N), a), config=cfg)
    _assert_close(out, ref.reference_dsd_tn(*_d(a, g), keep, 1.5, block, batched), dtype)


@pytest.mark.parametrize("programs", [3, 40], ids=["3_slots", "40_slots"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", BALANCED_SHAPES, ids=lambda s: f"B{s[0]}Bb{s[1]}_{s[2]}x{s[3]}x{s[4]}_blk{s[5][0]}x{s[5][1]}_t{s[6]}x{s[7]}")
def test_balanced_schedule(shape, p, programs, monkeypatch):
    """Persistent sdd and cost-ordered dsd / dsd_tn against the oracle. The interpreter's
    "GPU" has ``programs`` slots: 3 gives several full rounds, 40 mostly a split last round."""
    monkeypatch.setattr(tri, "_INTERPRETER_PROGRAMS", programs)
    B, Bb, M, K, N, block, tm, tk = shape
    gen = torch.Generator().manual_seed(int(p * 10) + programs)
    _check_all_three(B, Bb, M, K, N, block, _balanced_cfg(tm, tk), _keep(B, M, K, block, p, gen), seed=13)


@pytest.mark.parametrize("fill", [True, False], ids=["keep_all", "drop_all"])
def test_balanced_keep_all_and_drop_all(fill, monkeypatch):
    monkeypatch.setattr(tri, "_INTERPRETER_PROGRAMS", 4)
    B, Bb, M, K, N, block, tm, tk = BALANCED_SHAPES[2]
    keep = torch.full((B, cdiv(M, block[0]), cdiv(K, block[1])), fill)
    _check_all_three(B, Bb, M, K, N, block, _balanced_cfg(tm, tk), keep, seed=14)


def test_balanced_tail_split_boundary(monkeypatch):
    """Kept tiles = 2 x slots + r for r just under, at and over half the slots: the split and
    unsplit last rounds, on a mask with uneven row counts."""
    B, Bb, M, K, N, block, tm, tk = 1, 1, 64, 128, 20, (32, 64), 32, 32  # 2 x 2 blocks, 2 tiles each
    keep = torch.tensor([[[True, True], [True, False]]])  # 3 kept blocks = 6 kept tiles
    for programs in (2, 4, 5, 12):  # 6 = 3*2 | 1*4 + 2 (split) | 1*5 + 1 (split) | 0*12 + 6 (split)
        monkeypatch.setattr(tri, "_INTERPRETER_PROGRAMS", programs)
        _check_all_three(B, Bb, M, K, N, block, _balanced_cfg(tm, tk), keep, seed=15)


def test_kept_lists_order():
    gen = torch.Generator().manual_seed(16)
    keep = (torch.rand(3, 5, 7, generator=gen) > 0.5).to(DEVICE)
    for by, lines in (("row", keep.reshape(15, 7)), ("col", keep.transpose(1, 2).reshape(21, 5)),
                      ("col_sum", keep.permute(2, 0, 1).reshape(7, 15))):
        counts, _, order = _lists(keep, by, lines.shape[1], order=True)
        c = lines.sum(1).tolist()
        assert counts.tolist() == c
        assert order.tolist() == sorted(range(len(c)), key=lambda l: (-c[l], l)), by


def test_kept_lists_stream_k_schedule():
    """stream_k=P: in the same launch, the exclusive prefix sums of the lines' kept counts in
    ranked order, their total, and P zeroed flags."""
    gen = torch.Generator().manual_seed(17)
    keep = (torch.rand(2, 6, 5, generator=gen) > 0.45).to(DEVICE)
    keep[0, :, 3] = False  # a line with nothing kept (it ranks last, its prefix is the total)
    for by, lines in (("row", keep.reshape(12, 5)), ("col_sum", keep.permute(2, 0, 1).reshape(5, 12))):
        for programs in (3, 1100):  # fewer flags than a chunk, and several chunks of them
            counts, _, order, schedule = tri.kept_lists(keep, by, order=True, stream_k=programs)
            n = lines.shape[0]
            c = lines.sum(1).tolist()
            ranked = sorted(range(n), key=lambda l: (-c[l], l))
            assert order[:n].tolist() == ranked
            prefix = [sum(c[l] for l in ranked[:k]) for k in range(n + 1)]
            assert schedule.numel() == n + 1 + programs
            assert schedule[: n + 1].tolist() == prefix, by
            assert schedule[n + 1:].tolist() == [0] * programs


def test_candidates_lead_with_balanced():
    for kind in ("dsd", "sdd", "dsd_tn"):
        cands = tri.candidate_configs(kind, 4096, 4096, 4096, (128, 128), torch.bfloat16, tma=False)
        if not runtime.interpreting():
            assert cands[0].balance and len(cands) <= tri._MAX_CANDIDATES


# --------------------------------------------------------------------------- second masks: dropout on the output
def _out_side_inputs(B, Bb, M, K, N, block, dtype, seed):
    """A matmul y = x @ wᵀ (+ bias) with block dropout on y (keep_out over (M, N)) and, for both
    sides, on x (keep_in over (M, K)): x (B, M, K), w (Bb, N, K) as sdd's b, g = dOut (B, M, N)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, K, generator=gen).to(dtype)
    w = torch.randn(Bb, N, K, generator=gen).to(dtype)
    g = torch.randn(B, M, N, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    keep_out = _keep(B, M, N, block, 0.4, gen)
    keep_in = _keep(B, M, K, block, 0.4, gen)
    return [t.to(DEVICE) for t in (x, w, g, bias, keep_out, keep_in)]


def _check_output_side(B, Bb, M, K, N, block, dtype, both, bias_on, config=None, seed=20):
    x, w, g, bias, keep_out, keep_in = _out_side_inputs(B, Bb, M, K, N, block, dtype, seed)
    keep_in = keep_in if both else None
    bias = bias if bias_on else None
    scale, bias_scale = (1.5 * 1.25, 1.5) if both else (1.5, 1.5)
    x_read = _poison_dropped(x, keep_in, block) if both else x  # the kernels never read dropped blocks
    g_read = _poison_dropped(g, keep_out, block)
    dropped_out = ~ref.expand_block_keep(keep_out, M, N, *block)
    # forward: y' = (scale * (x [⊙ m_in]) wᵀ + bias_scale * bias) ⊙ m_out
    y = tri.sdd(x_read, w, keep_out, scale, block, bias, bias_scale=bias_scale, reduce_keep=keep_in,
                out=_nan_like((B, M, N), x), config=config)
    _assert_close(y, ref.reference_sdd(*_d(x, w), keep_out, scale, block, *_d(bias), bias_scale=bias_scale,
                                       reduce_keep=keep_in), dtype)
    assert (y[dropped_out] == 0).all(), "dropped output tiles must be exact zeros, bias included"
    # dX = scale * ((g ⊙ m_out) w) [⊙ m_in]
    dx = tri.dsd(g_read, w, keep_out, scale, block, out_keep=keep_in, out=_nan_like((B, M, K), x), config=config)
    _assert_close(dx, ref.reference_dsd(*_d(g, w), keep_out, scale, block, out_keep=keep_in), dtype)
    if both:
        assert (dx[~ref.expand_block_keep(keep_in, M, K, *block)] == 0).all()
    # dW = scale * (g ⊙ m_out)ᵀ (x [⊙ m_in]), summed over the batch when w is shared
    batched = Bb == B and B > 1
    dw = tri.dsd_tn(g_read, x_read, keep_out, scale, block, batched, grad_keep=keep_in,
                    out=_nan_like((B if batched else 1, N, K), x), config=config)
    _assert_close(dw, ref.reference_dsd_tn(*_d(g, x), keep_out, scale, block, batched, grad_keep=keep_in), dtype)


# (shape, sides, bias, dtype): shared and per-batch b, 1-3 tiles per block; the first two in
# every dtype.
OUTPUT_SIDE_CASES = [(SHAPES[0], False, True, dt) for dt, _, _ in TOLERANCES] + [
    (SHAPES[2], True, True, dt) for dt, _, _ in TOLERANCES] + [
    (SHAPES[1], True, False, torch.float16), (SHAPES[3], False, False, torch.float32)]


@pytest.mark.parametrize("shape,both,bias_on,dtype", OUTPUT_SIDE_CASES,
                         ids=lambda v: f"B{v[0]}Bb{v[1]}_{v[2]}x{v[3]}x{v[4]}_blk{v[5][0]}x{v[5][1]}" if isinstance(v, tuple)
                         else str(v).replace("torch.", ""))
def test_output_side_kernels(shape, both, bias_on, dtype):
    """The three kernels with the second mask and sdd's bias against the oracle, ragged shapes."""
    _check_output_side(*shape, dtype, both, bias_on)


@pytest.mark.parametrize("shape,both", [(BALANCED_SHAPES[0], False), (BALANCED_SHAPES[2], True)],
                         ids=lambda v: f"B{v[0]}Bb{v[1]}_{v[2]}x{v[3]}x{v[4]}_blk{v[5][0]}x{v[5][1]}_t{v[6]}x{v[7]}"
                         if isinstance(v, tuple) else None)
def test_output_side_balanced_schedule(shape, both, monkeypatch):
    """The persistent sdd (bias added in kept tiles of every round and of the split tail, never in
    the dropped ones) and cost-ordered dsd / dsd_tn with the second mask."""
    monkeypatch.setattr(tri, "_INTERPRETER_PROGRAMS", 3)
    B, Bb, M, K, N, block, tm, tk = shape
    _check_output_side(B, Bb, M, K, N, block, torch.float16, both, True, config=_balanced_cfg(tm, tk), seed=21)


def test_second_mask_needs_tile_n_dividing_the_block():
    x, w, _, _, keep_out, keep_in = _out_side_inputs(1, 1, 32, 32, 32, (16, 16), torch.float32, 22)
    with pytest.raises(ValueError, match="tile_n dividing block cols 16"):
        tri.sdd(x, w, keep_out, 1.0, (16, 16), reduce_keep=keep_in, config=tri.KernelConfig(16, 32, 16, 1, 4))
    with pytest.raises(ValueError, match=r"reduce_keep must be a bool tensor of shape \(1, 2, 2\)"):
        tri.sdd(x, w, keep_out, 1.0, (16, 16), reduce_keep=keep_in[:, :1])
    assert tri.unsupported_reason((x, w), (16, 16)) is None
    cands = tri.candidate_configs("sdd", 4096, 4096, 4096, (128, 64), torch.bfloat16, second_keep=True)
    assert all(64 % c.tile_n == 0 for c in cands)


@pytest.mark.parametrize("fill", [True, False], ids=["keep_all", "drop_all"])
def test_output_side_keep_all_and_drop_all(fill):
    """All kept: the dense matmul plus bias, scaled. All dropped: exact zeros, no bias."""
    x, w, g, bias, keep_out, keep_in = _out_side_inputs(2, 1, 40, 48, 36, (16, 16), torch.float16, 23)
    keep_out = torch.full_like(keep_out, fill)
    y = tri.sdd(x, w, keep_out, 2.0, (16, 16), bias)
    if fill:
        _assert_close(y, (x.double() @ w.double().transpose(1, 2) + bias.double()) * 2, torch.float16)
    else:
        assert torch.equal(y, torch.zeros_like(y))
        assert torch.equal(tri.dsd(g, w, keep_out, 2.0, (16, 16), out_keep=keep_in), torch.zeros(2, 40, 48, dtype=g.dtype, device=g.device))

# --------------------------------------------------------------------------- through the registered ops
def _op_grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fn(*inputs)
    gen = torch.Generator().manual_seed(9)
    grad = torch.randn(out.shape, generator=gen).to(out.dtype).to(out.device)
    out.backward(grad)
    return out, [t.grad if t is not None and t.is_floating_point() else None for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_op_triton_matches_reference(dtype):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 37, 64, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(48, 64, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(48, generator=gen).to(dtype).to(DEVICE)
    block = (32, 32)
    keep = (torch.rand(1, cdiv(74, 32), 2, generator=gen) > 0.5).to(DEVICE)

    def run(kernel):
        return _op_grads(lambda x, w, b: torch.ops.sparsedrop.linear(x, w, b, keep, 2.0, *block, kernel), [x, w, bias])

    out_t, grads_t = run("triton")
    out_r, grads_r = run("reference")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out_t, out_r, atol=atol * 10, rtol=rtol * 2)
    for gt, gr in zip(grads_t, grads_r):
        torch.testing.assert_close(gt, gr, atol=atol * 10, rtol=rtol * 2)


@pytest.mark.parametrize("b_batched", [False, True], ids=["shared_b", "batched_b"])
def test_matmul_op_triton_matches_reference(b_batched):
    dtype = torch.float16
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(2, 3, 40, 48, generator=gen).to(dtype).to(DEVICE)
    b = torch.randn(*((2, 3) if b_batched else ()), 48, 24, generator=gen).to(dtype).to(DEVICE)
    block = (16, 16)
    keep = (torch.rand(6, 3, 3, generator=gen) > 0.4).to(DEVICE)  # one mask per matrix of a

    def run(kernel):
        return _op_grads(lambda a, b: torch.ops.sparsedrop.matmul(a, b, keep, 1.25, *block, kernel), [a, b])

    out_t, grads_t = run("triton")
    out_r, grads_r = run("reference")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out_t, out_r, atol=atol * 10, rtol=rtol * 2)
    for gt, gr in zip(grads_t, grads_r):
        torch.testing.assert_close(gt, gr, atol=atol * 10, rtol=rtol * 2)


def test_opcheck_linear_triton():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(20, 32, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(16, 32, generator=gen).to(DEVICE).requires_grad_()
    keep = (torch.rand(1, 2, 2, generator=gen) > 0.5).to(DEVICE)
    torch.library.opcheck(torch.ops.sparsedrop.linear.default, (x, w, None, keep, 2.0, 16, 16, "triton"))


# --------------------------------------------------------------------------- GPU: full size, every config
gpu = pytest.mark.gpu


def _gpu_problem(B, Bb, M, K, N, block, p, dtype=torch.bfloat16, b_transposed=True, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(B, M, K, device="cuda", generator=gen, dtype=dtype)
    if b_transposed:
        b = torch.randn(Bb, N, K, device="cuda", generator=gen, dtype=dtype).transpose(1, 2)
    else:
        b = torch.randn(Bb, K, N, device="cuda", generator=gen, dtype=dtype)
    g = torch.randn(B, M, N, device="cuda", generator=gen, dtype=dtype)
    keep = torch.rand(B, cdiv(M, block[0]), cdiv(K, block[1]), device="cuda", generator=gen) >= p
    return a, b, g, keep


def _assert_close_big(actual, expected):
    """bf16 output of a long fp32 reduction: half an ulp of bf16 plus summation-order noise."""
    assert not torch.isnan(actual).any()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-3 * scale, rtol=1e-2)


def _fp32_refs(a, b, g, keep, scale, block, batched_out):
    assert not torch.backends.cuda.matmul.allow_tf32, "the fp32 oracle must not use tf32"
    return (
        ref.reference_dsd(a.float(), b.float(), keep, scale, block),
        ref.reference_sdd(g.float(), b.float(), keep, scale, block),
        ref.reference_dsd_tn(a.float(), g.float(), keep, scale, block, batched_out),
    )


@gpu
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_gpu_linear_4096(p):
    block = (128, 128)
    a, b, g, keep = _gpu_problem(1, 1, 4096, 4096, 4096, block, p)
    scale = 1 / (1 - p)
    r_dsd, r_sdd, r_tn = _fp32_refs(a, b, g, keep, scale, block, False)
    _assert_close_big(tri.dsd(a, b, keep, scale, block), r_dsd)
    _assert_close_big(tri.sdd(g, b, keep, scale, block), r_sdd)
    _assert_close_big(tri.dsd_tn(a, g, keep, scale, block, False), r_tn)


@gpu
def test_gpu_attention_pv():
    """P @ V for B=8, H=16, S=1024, D=64: a (128, 1024, 1024) probability matrix, per-batch V."""
    block = (128, 128)
    a, b, g, keep = _gpu_problem(128, 128, 1024, 1024, 64, block, 0.1, b_transposed=False)
    a = torch.softmax(a.float(), -1).to(a.dtype)
    r_dsd, r_sdd, r_tn = _fp32_refs(a, b, g, keep, 1 / 0.9, block, True)
    _assert_close_big(tri.dsd(a, b, keep, 1 / 0.9, block), r_dsd)
    _assert_close_big(tri.sdd(g, b, keep, 1 / 0.9, block), r_sdd)
    _assert_close_big(tri.dsd_tn(a, g, keep, 1 / 0.9, block, True), r_tn)


@gpu
@pytest.mark.parametrize("kind", ["dsd", "sdd", "dsd_tn"])
@pytest.mark.parametrize(
    "M,K,N",
    [(1024, 1152, 512), (1000, 1096, 520), (999, 1100, 521)],
    ids=["aligned", "ragged_tma_ok", "unaligned_pointer_only"],
)
def test_gpu_every_candidate_config(kind, M, K, N):
    """Each config the tuner may pick (TMA and pointer variants) gives the right answer: on an
    aligned shape, on a ragged one whose rows are still 16-byte aligned (TMA descriptors zero
    fill the ragged last mask blocks), and on an unaligned one (pointer loads only)."""
    _check_every_config(kind, M, K, N, (128, 128), b_transposed=True)


@gpu
@pytest.mark.parametrize("kind", ["dsd", "sdd", "dsd_tn"])
@pytest.mark.parametrize("b_transposed", [True, False], ids=["b_k_contig", "b_n_contig"])
def test_gpu_every_candidate_config_small_blocks(kind, b_transposed):
    """The same with 16 x 16 mask blocks (tiles clamped to 16, the persistent sdd's tail not
    split) and b in both layouts (a linear's weight.T and a batched matmul's operand)."""
    _check_every_config(kind, 1000, 1096, 520, (16, 16), b_transposed)


def _walk_variants(kind, configs):
    """The launch-bound schedule of each pointer tiling (dsd and dsd_tn walk every block)."""
    if kind == "sdd":
        return []
    return [dataclasses.replace(c, walk=True, balance=False) for c in configs if not c.tma]


def _check_every_config(kind, M, K, N, block, b_transposed):
    a, b, g, keep = _gpu_problem(1, 1, M, K, N, block, 0.3, b_transposed=b_transposed)
    expected = dict(zip(("dsd", "sdd", "dsd_tn"), _fp32_refs(a, b, g, keep, 1.5, block, False)))[kind]
    tma_possible = runtime.tma_enabled(a.device)
    configs = tri.candidate_configs(kind, M, N, K, block, a.dtype, tma=False)
    if tma_possible:
        configs += tri.candidate_configs(kind, M, N, K, block, a.dtype, tma=True)
    configs += _walk_variants(kind, configs)
    if kind == "dsd_tn":  # the split reduction of the first tilings, over lists, balanced and walking
        configs += [dataclasses.replace(c, split=n) for c in configs[:3] + _walk_variants(kind, configs)[:1]
                    for n in (2, 4)]
    for cfg in dict.fromkeys(configs):
        if kind == "dsd":
            if cfg.tma and not (runtime.tma_view_ok(a) and runtime.tma_view_ok(tri._b_tma_view(b)) and N % 8 == 0):
                continue
            out = tri.dsd(a, b, keep, 1.5, block, config=cfg)
        elif kind == "sdd":
            if cfg.tma and not (runtime.tma_view_ok(g) and runtime.tma_view_ok(tri._b_tma_view(b)) and K % 8 == 0):
                continue
            out = tri.sdd(g, b, keep, 1.5, block, config=cfg)
        else:
            if cfg.tma and not (runtime.tma_view_ok(a) and runtime.tma_view_ok(g)):
                continue
            out = tri.dsd_tn(a, g, keep, 1.5, block, False, config=cfg)
        torch.cuda.synchronize()
        try:
            _assert_close_big(out, expected)
        except AssertionError as err:
            raise AssertionError(f"config {cfg}: {err}") from None


@gpu
@pytest.mark.parametrize("p", [0.0, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("case", ["linear_4096", "linear_ragged", "batched_attention"])
def test_gpu_balanced_every_candidate(case, p):
    """The balanced schedule of every candidate tiling (TMA and pointer) across drop rates:
    all kept, the p = 0.7 tail the schedule was made for, a nearly empty and an empty mask."""
    block = (128, 128)
    B, Bb, M, K, N, bt = {"linear_4096": (1, 1, 4096, 4096, 4096, True), "linear_ragged": (1, 1, 1000, 1096, 520, True),
                          "batched_attention": (16, 16, 1024, 1024, 64, False)}[case]
    a, b, g, keep = _gpu_problem(B, Bb, M, K, N, block, p, b_transposed=bt, seed=3)
    batched = B > 1
    scale = 1.5
    refs = dict(zip(("dsd", "sdd", "dsd_tn"), _fp32_refs(a, b, g, keep, scale, block, batched)))
    tma_possible = runtime.tma_enabled(a.device)
    for kind in ("dsd", "sdd", "dsd_tn"):
        configs = tri.candidate_configs(kind, M, N, K, block, a.dtype, tma=False)
        if tma_possible:
            configs += tri.candidate_configs(kind, M, N, K, block, a.dtype, tma=True)
        for cfg in dict.fromkeys(dataclasses.replace(c, balance=True) for c in configs):
            if kind == "dsd":
                if cfg.tma and not (runtime.tma_view_ok(a) and runtime.tma_view_ok(tri._b_tma_view(b)) and N % 8 == 0):
                    continue
                out = tri.dsd(a, b, keep, scale, block, out=torch.full((B, M, N), float("nan"), device="cuda", dtype=a.dtype), config=cfg)
            elif kind == "sdd":
                if cfg.tma and not (runtime.tma_view_ok(g) and runtime.tma_view_ok(tri._b_tma_view(b)) and K % 8 == 0):
                    continue
                out = tri.sdd(g, b, keep, scale, block, out=torch.full((B, M, K), float("nan"), device="cuda", dtype=a.dtype), config=cfg)
            else:
                if cfg.tma and not (runtime.tma_view_ok(a) and runtime.tma_view_ok(g)):
                    continue
                Bo = B if batched else 1
                out = tri.dsd_tn(a, g, keep, scale, block, batched, out=torch.full((Bo, K, N), float("nan"), device="cuda", dtype=a.dtype), config=cfg)
            torch.cuda.synchronize()
            expected = refs[kind]
            try:
                if p == 1.0:
                    assert torch.equal(out, torch.zeros_like(out))
                else:
                    _assert_close_big(out, expected)
            except AssertionError as err:
                raise AssertionError(f"{kind} config {cfg} at p={p}: {err}") from None


@gpu
@pytest.mark.parametrize("dtype,precision", [(torch.float16, "highest"), (torch.float32, "highest"), (torch.float32, "high")])
def test_gpu_other_dtypes(dtype, precision):
    """fp16 and fp32 (IEEE by default; tf32 when torch's fp32 matmul precision allows it)."""
    block = (64, 128)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        a, b, g, keep = _gpu_problem(2, 1, 700, 900, 300, block, 0.3, dtype=dtype)
        got = (tri.dsd(a, b, keep, 1.5, block), tri.sdd(g, b, keep, 1.5, block), tri.dsd_tn(a, g, keep, 1.5, block, False))
    finally:
        torch.set_float32_matmul_precision(old)
    refs = (
        ref.reference_dsd(a.double(), b.double(), keep, 1.5, block),
        ref.reference_sdd(g.double(), b.double(), keep, 1.5, block),
        ref.reference_dsd_tn(a.double(), g.double(), keep, 1.5, block, False),
    )
    # tf32 keeps 10 mantissa bits of each input: ~2^-11 relative error per product.
    rtol = {torch.float16: 2e-3, torch.float32: 1e-5 if precision == "highest" else 5e-3}[dtype]
    for out, expected in zip(got, refs):
        assert not torch.isnan(out).any()
        scale = expected.abs().max().item()
        torch.testing.assert_close(out.double(), expected, atol=rtol * scale, rtol=rtol)


@gpu
def test_gpu_cuda_graph_capture():
    """The whole fwd+bwd (mask sampling, lists, three kernels) replays from a CUDA graph."""
    from sparsedrop_compile.kernels.block_mask import sample_block_keep

    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        keep = sample_block_keep(x, 0.3, 128, 128, batched=False)
        y = torch.ops.sparsedrop.linear(x, w, None, keep, 1 / 0.7, 128, 128, "triton")
        y.backward(torch.ones_like(y))
        return keep, y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            x.grad = w.grad = None
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    x.grad = w.grad = None
    with torch.cuda.graph(graph):
        keep, y = step()
    graph.replay()
    torch.cuda.synchronize()
    expected = ref.reference_dsd(x.detach().float().unsqueeze(0), w.detach().float().t().unsqueeze(0), keep, 1 / 0.7, (128, 128))[0]
    _assert_close_big(y.detach(), expected)


@gpu
@pytest.mark.parametrize("both", [False, True], ids=["output", "both_sides"])
@pytest.mark.parametrize("M,K,N", [(4096, 4096, 4096), (1000, 1096, 520), (999, 1100, 521)],
                         ids=["aligned", "ragged_tma_ok", "unaligned_pointer_only"])
def test_gpu_output_side_every_candidate(M, K, N, both):
    """Dropout on a linear's output (and on both sides): sdd with bias (and a reduction mask),
    dsd with an output mask, dsd_tn with a grad mask, for every config the tuner may pick (TMA
    and pointer, grid order and balanced), against fp32 references."""
    block = (128, 128)
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(1, M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(1, N, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    g = torch.randn(1, M, N, device="cuda", generator=gen, dtype=torch.bfloat16)
    bias = torch.randn(N, device="cuda", generator=gen, dtype=torch.bfloat16)
    keep = torch.rand(1, cdiv(M, 128), cdiv(N, 128), device="cuda", generator=gen) >= 0.3
    keep_in = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda", generator=gen) >= 0.3 if both else None
    s, bs = (1 / 0.49, 1 / 0.7) if both else (1 / 0.7, 1 / 0.7)
    refs = {
        "sdd": ref.reference_sdd(x.float(), w.float(), keep, s, block, bias.float(), bias_scale=bs, reduce_keep=keep_in),
        "dsd": ref.reference_dsd(g.float(), w.float(), keep, s, block, out_keep=keep_in),
        "dsd_tn": ref.reference_dsd_tn(g.float(), x.float(), keep, s, block, False, grad_keep=keep_in),
    }
    # (launcher call, candidate_configs' (M, N, K) of that kernel)
    calls = {
        "sdd": (lambda cfg: tri.sdd(x, w, keep, s, block, bias, bias_scale=bs, reduce_keep=keep_in, config=cfg), (M, K, N)),
        "dsd": (lambda cfg: tri.dsd(g, w, keep, s, block, out_keep=keep_in, config=cfg), (M, K, N)),
        "dsd_tn": (lambda cfg: tri.dsd_tn(g, x, keep, s, block, False, grad_keep=keep_in, config=cfg), (M, K, N)),
    }
    tested = 0
    for kind, (run, (m, n, k)) in calls.items():
        configs = tri.candidate_configs(kind, m, n, k, block, x.dtype, tma=False, second_keep=both)
        if runtime.tma_enabled(x.device):
            configs += tri.candidate_configs(kind, m, n, k, block, x.dtype, tma=True, second_keep=both)
        configs = configs + [dataclasses.replace(c, balance=not c.balance) for c in configs]
        for cfg in dict.fromkeys(configs + _walk_variants(kind, configs)):
            try:
                out = run(cfg)
            except ValueError as err:
                if cfg.tma and "asks for TMA" in str(err):  # these operands cannot take a descriptor
                    continue
                raise
            torch.cuda.synchronize()
            try:
                _assert_close_big(out, refs[kind])
            except AssertionError as err:
                raise AssertionError(f"{kind} config {cfg}: {err}") from None
            tested += 1
    assert tested >= 6


def test_host_integer_helpers_match_triton():
    """The launch path's plain-int helpers give what triton.cdiv / triton.next_power_of_2 give."""
    import triton

    for n in list(range(-5, 5000)) + [2**20 - 1, 2**20, 2**20 + 1, 2**31 + 7]:
        assert runtime.next_pow2(n) == (triton.next_power_of_2(n) if n > 0 else 0), n
        for d in (1, 16, 64, 128):
            if n >= 0:
                assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


@pytest.mark.skipif(not (torch.cuda.is_available() or runtime.interpreting()), reason="runs the Triton kernels")
def test_a_launch_bound_linear_site_launches_three_kernels(monkeypatch, problem_size_class):
    """The host cost of a rewritten site is mostly its launches. A launch-bound linear site runs
    three kernels, forward and backward: dsd, sdd, dsd_tn (no kept-block list is built); a large
    one also builds the row lists for dsd and the column lists for dsd_tn (and the row lists of
    the persistent sdd)."""
    import sparsedrop_compile as sd

    launched = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append(self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__)
                return self.kernel[grid](*args, **kwargs)
            return run

    from sparsedrop_compile.kernels import kept_blocks
    monkeypatch.setattr(tri, "launch", Recorder)
    monkeypatch.setattr(kept_blocks, "launch", Recorder)  # the kept-block lists' launches
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 64, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(48, 64, generator=gen).to(DEVICE).requires_grad_()
    for _ in range(2):  # the first call of a problem also tries its config once (runtime.Tuner)
        launched.clear()
        sd.sparse_dropout_linear(x, w, p=0.3, block_size=16, kernel="triton").sum().backward()
    counts = {name: launched.count(name) for name in set(launched)}
    lists = counts.pop("_kept_lists_kernel", 0)
    assert counts == {"_dsd_kernel": 1, "_sdd_kernel": 1, "_dsd_tn_kernel": 1}, launched
    # large: row lists for dsd, column lists for dsd_tn, and row lists again where sdd is persistent
    assert lists == 0 if problem_size_class == "launch-bound" else lists in (2, 3), launched

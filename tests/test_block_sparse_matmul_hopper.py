"""The Gluon (wgmma) block-sparse matmuls on a Hopper GPU against the plain-PyTorch reference.

Gluon kernels cannot run under Triton's interpreter, so these tests need an sm_90 GPU; the CPU
tests check only when the launchers take that path. Each case asserts first that the Hopper path
was planned (so a silent fallback to the portable kernels cannot pass for it), then compares
with an fp32 reference from the same bf16/fp16 inputs, with NaN in every dropped block of the
sparse operand (the kernels must never read one).
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from sparsedrop_compile import ops  # noqa: F401  (registers torch.ops.sparsedrop)
from sparsedrop_compile.kernels import block_sparse_matmul as ref
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper
from sparsedrop_compile.kernels import block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels import runtime
from sparsedrop_compile.kernels.block_mask import cdiv
from sparsedrop_compile.kernels.block_sparse_matmul_kernels import _dealt_tile, _dealt_turns

on_hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and hopper._listed_wgmma_kernel is not None),
    reason="the Gluon wgmma kernels need a Hopper GPU (sm_90) and Triton's Gluon",
)
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def every_size_large(monkeypatch):
    """The Hopper path skips launch-bound problems; these test shapes are small, count them large."""
    monkeypatch.setattr(runtime, "LAUNCH_BOUND_WORK", 0)
    monkeypatch.setattr(hopper, "OPAQUE_MIN_WORK", 0)  # compiled code: the opaque op at every size
    monkeypatch.delenv("SPARSEDROP_HOPPER", raising=False)


def _poison(a, keep, block):
    mask = ref.expand_block_keep(keep, a.shape[1], a.shape[2], *block)
    return torch.where(mask, a, torch.full((), float("nan"), dtype=a.dtype, device=a.device))


def _close(actual, expected):
    """bf16/fp16 output of a long fp32 reduction: about half an ulp plus summation-order noise
    (the same bound as the portable kernels' GPU tests)."""
    assert not torch.isnan(actual).any(), "NaN: a dropped block was read, or an output left unwritten"
    scale = max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-3 * scale, rtol=1e-2)


# (B, M, K, N, block): aligned, ragged in every dim (rows still 16-byte aligned), a batch that
# folds into the rows, 64 x 64 blocks, a column-narrow output.
SHAPES = [
    (1, 1024, 1152, 768, (128, 128)),
    (1, 1000, 1096, 520, (128, 128)),
    (3, 256, 640, 384, (128, 128)),
    (1, 704, 576, 448, (64, 64)),
    (1, 2048, 768, 64, (128, 128)),
]
IDS = ["aligned", "ragged", "batch_folded", "blocks64", "narrow_n"]


def every_problem(test):
    """test(shape, p, b_transposed, dtype) on a Hopper GPU, for every shape, p, b layout and dtype."""
    for mark in (
        pytest.mark.parametrize("shape", SHAPES, ids=IDS),
        pytest.mark.parametrize("p", [0.0, 0.4, 1.0]),
        pytest.mark.parametrize("b_transposed", [True, False], ids=["b_k_contig", "b_n_contig"]),
        pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str),
        on_hopper,
        gpu,
    ):
        test = mark(test)
    return test


def _problem(B, M, K, N, block, p, dtype, b_transposed, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(B, M, K, device="cuda", generator=gen, dtype=dtype)
    if b_transposed:  # a linear's weight.t(): K contiguous
        b = torch.randn(1, N, K, device="cuda", generator=gen, dtype=dtype).transpose(1, 2)
    else:
        b = torch.randn(1, K, N, device="cuda", generator=gen, dtype=dtype)
    g = torch.randn(B, M, N, device="cuda", generator=gen, dtype=dtype)
    bias_n = torch.randn(N, device="cuda", generator=gen, dtype=dtype)
    bias_k = torch.randn(K, device="cuda", generator=gen, dtype=dtype)
    keep = torch.rand(B, cdiv(M, block[0]), cdiv(K, block[1]), device="cuda", generator=gen) >= p
    return a, b, g, bias_n, bias_k, keep


def _schedule(monkeypatch, schedule):
    """Force the listed schedule: whole tiles, or stream-K (the shapes here are small enough
    that the default rule would take stream-K on most of them)."""
    monkeypatch.setattr(hopper, "_STREAM_K", schedule == "stream_k")


def _assert_schedule(plan, schedule):
    assert plan is not None
    assert plan.stream_k == (schedule == "stream_k")


@every_problem
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("schedule", ["tiles", "stream_k"])
def test_dsd(shape, p, b_transposed, dtype, with_bias, schedule, monkeypatch):
    """With a bias and without; whole tiles and stream-K."""
    B, M, K, N, block = shape
    _schedule(monkeypatch, schedule)
    a, b, g, bias, _, keep = _problem(B, M, K, N, block, p, dtype, b_transposed)
    bias = bias if with_bias else None
    out = torch.empty(B, M, N, device="cuda", dtype=dtype)
    _assert_schedule(hopper.plan_dsd(a, b, keep, block, bias, None, out), schedule)
    got = tri.dsd(_poison(a, keep, block), b, keep, 1.25, block, bias)
    _close(got, ref.reference_dsd(a.float(), b.float(), keep, 1.25, block, None if bias is None else bias.float()))


@every_problem
@pytest.mark.parametrize("tiles", ["grouped_pingpong", "grouped", "row_major", "paired"])
def test_sdd(shape, p, b_transposed, dtype, tiles, monkeypatch):
    """Every sdd schedule: whole tiles of one kept block listed in groups of rows (kept_grouped),
    by the PINGPONG kernel (the default where its tiles fit) or by one warpgroup pair; listed
    row-major (kept_lists); tiles whose halves lie in two kept blocks of a column (paired)."""
    B, M, K, N, block = shape
    monkeypatch.setattr(hopper, "_SDD_PINGPONG", tiles == "grouped_pingpong")
    monkeypatch.setattr(hopper, "_SDD_GROUP", None if tiles == "row_major" else 8)
    monkeypatch.setattr(hopper, "_SDD_PAIRS", hopper._CONFIGS["tall"] if tiles == "paired" else None)
    a, b, g, _, bias, keep = _problem(B, M, K, N, block, p, dtype, b_transposed)
    out = torch.empty(B, M, K, device="cuda", dtype=dtype)
    plan = hopper.plan_sdd(g, b, keep, block, bias, None, out)
    assert plan is not None
    assert (plan.list_by == "pairs") == (tiles == "paired" and block == (128, 128)), plan.list_by
    assert plan.cfg.pingpong == (tiles == "grouped_pingpong" and block == (128, 128)), plan.cfg
    got = tri.sdd(g, b, keep, 1.25, block, bias, bias_scale=0.5)
    _close(got, ref.reference_sdd(g.float(), b.float(), keep, 1.25, block, bias.float(), bias_scale=0.5))


def _wider_rows(t: torch.Tensor, extra: int) -> torch.Tensor:
    """``t`` (2-D or 3-D, rows contiguous) as a view into a buffer whose rows are ``extra``
    elements longer: the same values, another row stride."""
    base = torch.full((*t.shape[:-1], t.shape[-1] + extra), float("nan"), device=t.device, dtype=t.dtype)
    view = base[..., : t.shape[-1]]
    view.copy_(t)
    return view


@every_problem
def test_unaligned_weight_rows_are_read_from_an_aligned_copy(shape, p, b_transposed, dtype, monkeypatch):
    """dsd and sdd read a right operand whose rows do not start on 32-byte boundaries from an
    aligned copy (Plan.copy_y; every size counted large enough here); an unaligned left operand
    (g) is read as it is. Against the reference, the same values in every layout."""
    monkeypatch.setattr(hopper, "_COPY_Y_MIN_ROWS", 0)
    B, M, K, N, block = shape
    a, b, g, bias_n, bias_k, keep = _problem(B, M, K, N, block, p, dtype, b_transposed)
    es = b.element_size()
    for b_extra, g_extra in ((0, 0), (8, 0), (0, 8)):
        b_v = (_wider_rows(b.transpose(1, 2), b_extra).transpose(1, 2) if b_transposed else _wider_rows(b, b_extra)) \
            if b_extra else b
        g_v = _wider_rows(g, g_extra) if g_extra else g
        b_rows = b_v.stride(-1) if b_transposed else b_v.stride(-2)  # the row stride TMA reads b by
        unaligned = (b_rows * es) % 32 != 0
        dsd = hopper.plan_dsd(a, b_v, keep, block, bias_n, None, torch.empty(B, M, N, device="cuda", dtype=dtype))
        sdd = hopper.plan_sdd(g_v, b_v, keep, block, bias_k, None, torch.empty(B, M, K, device="cuda", dtype=dtype))
        assert dsd is not None and sdd is not None
        assert dsd.copy_y == unaligned and sdd.copy_y == unaligned, (b_v.stride(), dsd.copy_y, sdd.copy_y)
        got = tri.dsd(_poison(a, keep, block), b_v, keep, 1.25, block, bias_n)
        _close(got, ref.reference_dsd(a.float(), b.float(), keep, 1.25, block, bias_n.float()))
        got = tri.sdd(g_v, b_v, keep, 1.25, block, bias_k, bias_scale=0.5)
        _close(got, ref.reference_sdd(g.float(), b.float(), keep, 1.25, block, bias_k.float(), bias_scale=0.5))


@gpu
@on_hopper
@pytest.mark.parametrize("rows", ["aligned", "unaligned"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dsd_tn_takes_whole_square_tiles_where_they_fill_the_waves(rows, p, monkeypatch):
    """A weight gradient (768 x 1024, wide enough for the big tiles first) whose 24 tiles of
    256 x 128 fill 0.75 of their waves on 16 programs and whose 48 of 128 x 128 fill them:
    whole 128 x 128 tiles where the rows are aligned, the big tiles' stream-K where the
    activation's rows are not (session 25's measurements, _plan)."""
    sm = runtime.sm_resources
    monkeypatch.setattr(runtime, "sm_resources", lambda d: (16, *sm(d)[1:]))
    block = (128, 128)
    a, _, g, _, _, keep = _problem(1, 512, 1024, 768, block, p, torch.bfloat16, True, seed=5)
    a_read = _poison(a, keep, block)
    if rows == "unaligned":
        a_read = _wider_rows(a_read, 8)
    wgrad = torch.empty(768, 1024, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
    plan = hopper.plan_dsd_tn(a_read, g, keep, block, False, None, wgrad)
    assert plan is not None
    expected = ((128, 128), False) if rows == "aligned" else ((256, 128), True)
    assert ((plan.cfg.tile_r, plan.cfg.tile_c), plan.stream_k) == expected
    got = tri.dsd_tn(a_read, g, keep, 1.25, block, False, out=wgrad)
    _close(got, ref.reference_dsd_tn(a.float(), g.float(), keep, 1.25, block, False))


@gpu
@on_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("out_layout", ["row_major", "weight_grad"])
@pytest.mark.parametrize("p", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("schedule", ["tiles", "stream_k"])
def test_dsd_tn(shape, p, out_layout, dtype, schedule, monkeypatch):
    """The weight gradient summed over the batch, into a row-major (K, N) output or, as ops.py
    writes a linear's, into (N, K) order (a column-major view: the transposed problem); whole
    tiles and stream-K."""
    B, M, K, N, block = shape
    _schedule(monkeypatch, schedule)
    a, _, g, _, _, keep = _problem(B, M, K, N, block, p, dtype, True)
    if out_layout == "row_major":
        out = torch.empty(1, K, N, device="cuda", dtype=dtype)
    else:
        out = torch.empty(N, K, device="cuda", dtype=dtype).t().unsqueeze(0)
    _assert_schedule(hopper.plan_dsd_tn(a, g, keep, block, False, None, out), schedule)
    got = tri.dsd_tn(_poison(a, keep, block), g, keep, 1.25, block, False, out=out)
    _close(got, ref.reference_dsd_tn(a.float(), g.float(), keep, 1.25, block, False))


@gpu
@on_hopper
@pytest.mark.parametrize("programs", [1, 5, 29, None], ids=lambda n: f"programs{n or 'all'}")
@pytest.mark.parametrize("p", [0.0, 0.1, 0.6, 0.97])
def test_stream_k_shares(p, programs, monkeypatch):
    """Stream-K on a narrow weight gradient (1024 x 3072: 96 tiles of 256 x 128) and a forward
    with a bias (1536 x 1024: 48 tiles of 128 x 256), as the default rule takes it on the whole
    GPU (fewer big tiles than SMs: 128 x 128 tiles), and forced with the iterations dealt to 1
    program (no partial sums), 5 (tiles cut into long pieces) and 29 (tiles summed from several
    programs' partial sums, some programs' shares inside one tile), where the big tiles stay;
    lines with nothing kept at high p."""
    if programs is not None:
        sm = runtime.sm_resources
        monkeypatch.setattr(runtime, "sm_resources", lambda d: (programs, *sm(d)[1:]))
        monkeypatch.setattr(hopper, "_STREAM_K", True)
    big = programs is not None  # the big tiles are at least as many as the programs
    block = (128, 128)
    a, b, g, bias, _, keep = _problem(1, 1536, 3072, 1024, block, p, torch.bfloat16, True, seed=3)
    wgrad = torch.empty(1024, 3072, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
    plan = hopper.plan_dsd_tn(a, g, keep, block, False, None, wgrad)
    _assert_schedule(plan, "stream_k")
    assert (plan.cfg.tile_r, plan.cfg.tile_c) == ((256, 128) if big else (128, 128))
    got = tri.dsd_tn(_poison(a, keep, block), g, keep, 1.25, block, False, out=wgrad)
    _close(got, ref.reference_dsd_tn(a.float(), g.float(), keep, 1.25, block, False))
    monkeypatch.setattr(hopper, "_STREAM_K", True)
    out = torch.empty(1, 1536, 1024, device="cuda", dtype=torch.bfloat16)
    plan = hopper.plan_dsd(a, b, keep, block, bias, None, out)
    _assert_schedule(plan, "stream_k")
    assert (plan.cfg.tile_r, plan.cfg.tile_c) == ((128, 256) if big else (128, 128))
    got = tri.dsd(_poison(a, keep, block), b, keep, 1.25, block, bias)
    _close(got, ref.reference_dsd(a.float(), b.float(), keep, 1.25, block, bias.float()))


@gpu
@on_hopper
@pytest.mark.parametrize("snake", [True, False], ids=["snake", "in_order"])
@pytest.mark.parametrize("programs", [1, 3, 7])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_whole_tiles_dealt_over_several_rounds(p, programs, snake, monkeypatch):
    """Whole tiles of ranked lines on fewer programs than tiles (the shapes above fit in one
    round on a whole GPU), so that each program takes several, every other round in reverse
    with the snake deal, the last round partial: the forward (40 tiles of 128 x 128) with a bias
    and the weight gradient in (N, K) order."""
    sm = runtime.sm_resources
    monkeypatch.setattr(runtime, "sm_resources", lambda d: (programs, *sm(d)[1:]))
    monkeypatch.setattr(hopper, "_STREAM_K", False)
    monkeypatch.setattr(hopper, "_SNAKE", snake)
    block = (128, 128)
    a, b, g, bias, _, keep = _problem(1, 1000, 1096, 520, block, p, torch.bfloat16, True, seed=5)
    out = torch.empty(1, 1000, 520, device="cuda", dtype=torch.bfloat16)
    _assert_schedule(hopper.plan_dsd(a, b, keep, block, bias, None, out), "tiles")
    got = tri.dsd(_poison(a, keep, block), b, keep, 1.25, block, bias)
    _close(got, ref.reference_dsd(a.float(), b.float(), keep, 1.25, block, bias.float()))
    wgrad = torch.empty(520, 1096, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
    _assert_schedule(hopper.plan_dsd_tn(a, g, keep, block, False, None, wgrad), "tiles")
    got = tri.dsd_tn(_poison(a, keep, block), g, keep, 1.25, block, False, out=wgrad)
    _close(got, ref.reference_dsd_tn(a.float(), g.float(), keep, 1.25, block, False))


@triton.jit
def _deal_probe(out_ptr, n_tiles, SLOTS: tl.constexpr, SNAKE: tl.constexpr):
    """Each program writes how many tiles the deal gives it, then the tiles, turn by turn."""
    pid = tl.program_id(0)
    turns = _dealt_turns(n_tiles, pid, tl.num_programs(0), SNAKE)
    tl.store(out_ptr + pid * SLOTS, turns)
    for turn in range(turns):
        tl.store(out_ptr + pid * SLOTS + 1 + turn, _dealt_tile(turn, pid, tl.num_programs(0), SNAKE))


@pytest.mark.interpret
def test_deal_gives_every_tile_to_one_program():
    """_dealt_turns / _dealt_tile (the Gluon kernel's persistent deal, here under Triton's
    interpreter): every tile to exactly one program; in order, program i takes i, i + P, ...;
    with the snake deal, odd rounds go to the programs in reverse, partial last rounds included."""
    for programs in (1, 3, 7):
        for n_tiles in (0, 1, 2, 3, 5, 7, 8, 20, 21, 22):
            for snake in (False, True):
                out = torch.full((programs, 32), -1, dtype=torch.int32)
                _deal_probe[(programs,)](out, n_tiles, SLOTS=32, SNAKE=snake)
                taken = [out[i, 1:1 + out[i, 0]].tolist() for i in range(programs)]
                assert sorted(t for ts in taken for t in ts) == list(range(n_tiles)), (programs, n_tiles, snake, taken)
                for i, tiles in enumerate(taken):
                    if snake:
                        expect = [r * programs + (i if r % 2 == 0 else programs - 1 - i) for r in range(n_tiles)]
                        assert tiles == [t for t in expect if t < n_tiles], (programs, n_tiles, i, tiles)
                    else:
                        assert tiles == list(range(i, n_tiles, programs)), (programs, n_tiles, i, tiles)
    out = torch.full((3, 32), -1, dtype=torch.int32)
    _deal_probe[(3,)](out, 8, SLOTS=32, SNAKE=True)
    assert [out[i, 1:1 + out[i, 0]].tolist() for i in range(3)] == [[0, 5, 6], [1, 4, 7], [2, 3]]


def test_stream_k_rule():
    """Stream-K where whole tiles would fill less than 90 % of their waves, and only while the
    kernel's int32 iteration arithmetic holds."""
    assert hopper._stream_k(72, 132, 72 * 64 * 2)          # the T5 weight gradient: 0.55 of a wave
    assert hopper._stream_k(192, 132, 192 * 64 * 2)        # 1.45 waves: 0.73
    assert not hopper._stream_k(512, 132, 512 * 32 * 2)    # 3.9 waves: 0.97
    assert not hopper._stream_k(132, 132, 132 * 64 * 2)    # one full wave
    assert not hopper._stream_k(72, 132, 2**31 // 132)     # shares past int32
    assert not hopper._stream_k(0, 132, 0)


@gpu
@on_hopper
def test_sparse_dropout_linear_op_matches_portable_kernels():
    """torch.ops.sparsedrop.linear (eager: forward, dX and dW) on the Hopper path gives what the
    portable kernels give, within rounding, for the same mask."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 512, 1024, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(768, 1024, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(768, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
    keep = torch.rand(1, 8, 8, device="cuda", generator=gen) >= 0.3
    dy = torch.randn(2, 512, 768, device="cuda", generator=gen, dtype=torch.bfloat16)

    def run():
        y = torch.ops.sparsedrop.linear(x, w, bias, keep, 1 / 0.7, 128, 128, "triton")
        return (y, *torch.autograd.grad(y, (x, w, bias), dy))

    hopper_results = run()
    import os
    os.environ["SPARSEDROP_HOPPER"] = "0"
    try:
        portable = run()
    finally:
        del os.environ["SPARSEDROP_HOPPER"]
    for got, expected in zip(hopper_results, portable):
        _close(got, expected)


@gpu
@on_hopper
@pytest.mark.parametrize("k", [1024, 1000], ids=["aligned_rows", "unaligned_rows"])
def test_eager_replays_launch_the_hopper_kernel(k, monkeypatch):
    """The eager functional path records each call's launches once and replays them (launch
    plans): the Gluon kernel must be among the recorded launches, so every replay with new
    values is right, not only the first call; with a weight of 2000-byte rows, the aligned copy
    of it too (Plan.copy_y, every size counted large enough)."""
    from sparsedrop_compile import ops as sd_ops
    from sparsedrop_compile.kernels import launch_plans
    from sparsedrop_compile.kernels.block_sparse_matmul_kernels import _copy_rows_kernel

    monkeypatch.setattr(hopper, "_COPY_Y_MIN_ROWS", 0)  # not in a plan's key: plans from here on are this test's
    launch_plans.clear()
    gen = torch.Generator(device="cuda").manual_seed(2)
    w = torch.randn(640, k, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
    keep = torch.rand(1, 4, 8, device="cuda", generator=gen) >= 0.3
    replayed = launch_plans.stats["replayed"]
    for _ in range(4):
        x = torch.randn(512, k, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(512, 640, device="cuda", generator=gen, dtype=torch.bfloat16)
        y = sd_ops.linear_call(x, w, None, keep, 1 / 0.7, 128, 128, "triton")
        dx, dw = torch.autograd.grad(y, (x, w), dy)
        xm = ref._masked(x.detach().float()[None], keep, (128, 128))[0] / 0.7
        _close(y, xm @ w.detach().float().t())
        _close(dw, dy.float().t() @ xm)
        mask = ref.expand_block_keep(keep, 512, k, 128, 128)[0]
        _close(dx, torch.where(mask, (dy.float() @ w.detach().float()) / 0.7, 0.0))
    assert launch_plans.stats["replayed"] > replayed, "the eager calls were never replayed: the test checks nothing"
    # A plan is recorded under a dispatch mode (launch_plans._OnlyViews) with real tensors: that
    # must not count as traced, or the recorded (replayed) launches are the portable kernels.
    recorded = {r.kernel for plan in launch_plans._plans.values() if plan is not None for r in plan.launches}
    assert hopper._listed_wgmma_kernel in recorded, "the replays launch the portable kernels"
    assert (_copy_rows_kernel in recorded) == (k == 1000), "the unaligned weight's copy is not (or wrongly) replayed"
    launch_plans.clear()


def test_hopper_path_not_planned_without_a_hopper_gpu():
    """On CPU tensors (and under the interpreter) the launchers never plan the Gluon kernels."""
    a = torch.randn(1, 256, 256, dtype=torch.bfloat16)
    b = torch.randn(1, 256, 256, dtype=torch.bfloat16)
    keep = torch.ones(1, 2, 2, dtype=torch.bool)
    out = torch.empty(1, 256, 256, dtype=torch.bfloat16)
    assert hopper.plan_dsd(a, b, keep, (128, 128), None, None, out) is None
    assert hopper.plan_sdd(a, b, keep, (128, 128), None, None, out) is None
    assert hopper.plan_dsd_tn(a, a, keep, (128, 128), False, None, out) is None


def test_rows_aligned_reads_the_rows_tma_reads():
    """_rows_aligned: every operand's rows (as TMA reads them: the base of a transposed view)
    start on 32-byte boundaries, by row stride and by address (traced: storage offset)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(2000, 3072, dtype=torch.bfloat16)
        assert hopper._rows_aligned(w, w.t())                    # 6144-byte rows; the transpose reads w's
        assert not hopper._rows_aligned(w[:, :3000].contiguous())  # 6000-byte rows
        assert hopper._rows_aligned(w[:, :3000])                 # a view keeps the 6144-byte stride
        assert hopper._rows_aligned(w[:, :2000].contiguous())    # 4000-byte rows: whole sectors
        assert not hopper._rows_aligned(w[:, 8:])                # starts 16 bytes in
        assert hopper._rows_aligned(w[:, 16:])                   # 32 bytes in
        assert not hopper._rows_aligned(w, torch.empty(64, 1004, dtype=torch.float32).t())  # 4016-byte rows
        assert hopper._rows_aligned(torch.empty(64, 1000, dtype=torch.float32).t())


@pytest.mark.interpret
def test_aligned_copy_keeps_the_values_and_aligns_the_rows():
    """_aligned_copy (the copy kernel, here under Triton's interpreter): the same values, rows a
    multiple of 128 bytes apart, from rows 16-byte aligned (bf16, fp32) or not even that (fp16)."""
    for dtype, cols, extra in ((torch.bfloat16, 3000, 8), (torch.float16, 72, 3), (torch.float32, 1004, 4)):
        src = torch.randn(37, cols + extra, dtype=dtype)[:, :cols]
        got = hopper._aligned_copy(src)
        assert got.shape == src.shape and (got.stride(0) * got.element_size()) % 128 == 0 and got.stride(1) == 1
        assert torch.equal(got, src)


# --------------------------------------------------------------------------- under torch.compile
def _operands(device, dtype, seed=3):
    """dsd / sdd / dsd_tn operands with ragged rows and a keep of about 40 % dropped blocks."""
    gen = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(2, 200, 96, device=device, dtype=dtype, generator=gen)
    b = torch.randn(1, 96, 80, device=device, dtype=dtype, generator=gen)
    g = torch.randn(2, 200, 80, device=device, dtype=dtype, generator=gen)
    bias = torch.randn(80, device=device, dtype=dtype, generator=gen)
    keep = torch.rand(2, cdiv(200, 32), cdiv(96, 32), device=device, generator=gen) >= 0.4
    return a, b, g, bias, keep


@pytest.mark.interpret
def test_opaque_ops_run_the_launchers():
    """The ops a traced call records (sparsedrop::wgmma_*) write what the launchers compute into
    ``out``, for every argument they pass on (bias, bias_scale, the summed weight gradient into a
    transposed view). Here on CPU tensors, where the launchers run the portable kernels."""
    a, b, g, bias, keep = _operands("cpu", torch.float32)
    block, scale = (32, 32), 1 / 0.6
    out = torch.empty(2, 200, 80)
    torch.ops.sparsedrop.wgmma_dsd(a, b, keep, scale, *block, bias, out)
    torch.testing.assert_close(out, ref.reference_dsd(a, b, keep, scale, block, bias), atol=1e-4, rtol=1e-4)
    out = torch.empty(2, 200, 96)
    bias_k = torch.linspace(-1, 1, 96)
    torch.ops.sparsedrop.wgmma_sdd(g, b, keep, scale, *block, bias_k, 0.5, out)  # out = (g bᵀ) ⊙ m
    torch.testing.assert_close(out, ref.reference_sdd(g, b, keep, scale, block, bias_k, bias_scale=0.5),
                               atol=1e-4, rtol=1e-4)
    dw = torch.empty(80, 96)
    torch.ops.sparsedrop.wgmma_dsd_tn(a, g, keep, scale, *block, False, dw.t().unsqueeze(0))
    torch.testing.assert_close(dw.t()[None], ref.reference_dsd_tn(a, g, keep, scale, block, False), atol=1e-4, rtol=1e-4)


@pytest.mark.interpret
def test_opaque_ops_are_schema_ops_that_write_in_place():
    """The ops are defined by schema, with no Python autograd or in-place layers around the body
    (custom_op's: about 40 us of host time a call), and keep what those did: a call bumps the
    version counter of ``out``, and torch.compile, which functionalises the call, writes through
    it in place, here into a graph input, without a copy."""
    from torch._inductor.utils import run_and_get_code

    for name in ("wgmma_dsd", "wgmma_sdd", "wgmma_dsd_tn"):
        op = getattr(torch.ops.sparsedrop, name).default
        out_arg = op._schema.arguments[-1]
        assert out_arg.name == "out" and out_arg.alias_info.is_write and not op._schema.returns, op._schema
        for key in ("Autograd", "ADInplaceOrView"):
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (name, key)
    a, b, g, bias, keep = _operands("cpu", torch.float32)
    out = torch.empty(2, 200, 80)
    version = out._version
    torch.ops.sparsedrop.wgmma_dsd(a, b, keep, 2.0, 32, 32, bias, out)
    assert out._version > version

    def f(a, b, keep, bias, out):
        torch.ops.sparsedrop.wgmma_dsd(a, b, keep, 2.0, 32, 32, bias, out)
        return out * 0.5

    out.zero_()
    got, code = run_and_get_code(torch.compile(f), a, b, keep, bias, out)
    calls = [line for line in "\n".join(code).splitlines() if "sparsedrop.wgmma_dsd.default(" in line]
    assert len(calls) == 1 and calls[0].strip().endswith("arg4_1)"), calls  # the input itself
    assert "clone" not in "\n".join(code) and ".copy_(" not in "\n".join(code)
    expected = ref.reference_dsd(a, b, keep, 2.0, (32, 32), bias)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, 0.5 * expected, atol=1e-4, rtol=1e-4)


@pytest.mark.interpret
def test_traced_call_records_the_opaque_op(monkeypatch):
    """While a call is traced (fake tensors, as when torch.compile traces an op body), a launcher
    whose call the wgmma kernel would serve records one sparsedrop::wgmma_* node in the graph and
    launches nothing; outside a trace the same call runs the plan."""
    from torch.fx.experimental.proxy_tensor import make_fx

    ran = []

    class FakePlan:
        R, C, D = 200, 80, 96

        def run(self, scale, bias=None, bias_scale=1.0):
            ran.append(scale)

    for name in ("plan_dsd", "plan_sdd", "plan_dsd_tn"):
        monkeypatch.setattr(hopper, name, lambda *args: FakePlan())
    a, b, g, bias, keep = _operands("cpu", torch.bfloat16)
    calls = {
        "wgmma_dsd": lambda a, b, g, keep: tri.dsd(a, b, keep, 2.0, (32, 32)),
        "wgmma_sdd": lambda a, b, g, keep: tri.sdd(g, b, keep, 2.0, (32, 32)),
        "wgmma_dsd_tn": lambda a, b, g, keep: tri.dsd_tn(a, g, keep, 2.0, (32, 32), False),
    }
    for op, call in calls.items():
        graph = make_fx(call, tracing_mode="fake")(a, b, g, keep).graph
        targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        assert f"sparsedrop.{op}.default" in targets, targets
        assert not any("triton_kernel_wrapper" in t for t in targets), targets
    assert not ran, "a traced call ran the plan"
    tri.dsd(a, b, keep, 2.0, (32, 32))
    tri.sdd(g, b, keep, 2.0, (32, 32))
    assert ran == [2.0, 2.0]
    # Real tensors under a dispatch mode: with torch's launch wrapper on (someone else's mode)
    # the portable kernels serve, as always; with it off (a launch plan's recording) the plan runs.
    from torch._library.triton import set_wrap_triton_enabled
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    plan = FakePlan()
    with Watch():
        assert not hopper.serve(plan, None, (a, b, keep), 2.0)
        with set_wrap_triton_enabled(False):
            assert hopper.serve(plan, None, (a, b, keep), 3.0)
    assert ran == [2.0, 2.0, 3.0]


def test_traced_call_with_symbolic_sizes_keeps_the_portable_kernels():
    """Symbolic sizes: the plan would guard on them, so no wgmma plan while traced."""
    from torch.fx.experimental.proxy_tensor import make_fx

    seen = []

    def call(a, b, keep, out):
        seen.append(hopper._usable((a.shape[0], a.shape[1], a.shape[2], b.shape[2]), a, b, out))
        return out

    a, b, g, bias, keep = _operands("cpu", torch.bfloat16)
    make_fx(call, tracing_mode="symbolic")(a, b, keep, torch.empty(2, 200, 80, dtype=torch.bfloat16))
    assert seen == [False]


@gpu
@on_hopper
@pytest.mark.parametrize("side", ["input", "output"])
def test_compiled_ops_run_the_hopper_kernel(side):
    """torch.compile of the linear ops (forward and both gradients): the generated code calls the
    opaque sparsedrop::wgmma_* ops (Inductor cannot emit the Gluon kernel itself), and output and
    gradients equal the eager op's, which the other tests check against the reference; a second
    call with new values checks the ops' launch plans. Input side: against the fp32 reference
    too, with NaN in x's dropped blocks."""
    from torch._inductor.utils import run_and_get_code

    gen = torch.Generator(device="cuda").manual_seed(4)
    block, scale = (128, 128), 1 / 0.6
    w = torch.randn(640, 1024, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(640, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
    if side == "input":
        keep = torch.rand(1, 5, 8, device="cuda", generator=gen) >= 0.4
        op = lambda x, w, b: torch.ops.sparsedrop.linear(x, w, b, keep, scale, *block, "triton")  # noqa: E731
    else:
        keep = torch.rand(1, 5, 5, device="cuda", generator=gen) >= 0.4
        op = lambda x, w, b: torch.ops.sparsedrop.linear_out(x, w, b, keep, scale, *block, "triton")  # noqa: E731
    compiled = torch.compile(op, fullgraph=True, dynamic=False)

    def step(f, x, dy):
        y = f(x, w, bias)
        return (y, *torch.autograd.grad(y, (x, w, bias), dy))

    for call in range(2):
        x = torch.randn(640, 1024, device="cuda", generator=gen, dtype=torch.bfloat16)
        if side == "input":
            x = _poison(x[None], keep, block)[0]
        x.requires_grad_()
        dy = torch.randn(640, 640, device="cuda", generator=gen, dtype=torch.bfloat16)
        if call == 0:
            got, code = run_and_get_code(step, compiled, x, dy)
            code = "\n".join(code)
            for name in ("wgmma_dsd", "wgmma_sdd", "wgmma_dsd_tn"):
                assert f"sparsedrop.{name}" in code, f"compiled code does not call {name}"
        else:
            got = step(compiled, x, dy)
        expected = step(op, x, dy)
        for g, e in zip(got, expected):
            _close(g, e)  # no NaN either: x's poisoned blocks are never read
        if side == "input":
            xm = ref._masked(x.detach().float()[None], keep, block)[0] * scale
            _close(got[0], xm @ w.detach().float().t() + bias.detach().float())
            _close(got[2], dy.float().t() @ xm)


@pytest.mark.interpret
def test_opaque_op_in_a_compiled_op_body_writes_in_place():
    """Inductor compiling an op body that calls an opaque op (as a traced launcher records it):
    the op writes straight into the body's buffer, through a transposed view (dsd_tn's weight
    gradient), with no copy of the output, and the compiled result is the reference's. On CPU
    tensors under the interpreter, where the op runs the portable kernels."""
    from torch._inductor.utils import run_and_get_code
    from sparsedrop_compile.kernels import launch_plans

    def body(a: torch.Tensor, g: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        dw = launch_plans.empty((g.shape[2], a.shape[2]), a.dtype, a.device)
        hopper.wgmma_dsd_tn(a, g, keep, 2.0, 32, 32, False, dw.t().unsqueeze(0))
        return dw

    op = torch.library.triton_op("sparsedrop_test::opaque_in_body", body, mutates_args=())
    a, b, g, bias, keep = _operands("cpu", torch.float32)
    got, code = run_and_get_code(torch.compile(lambda a, g, keep: op(a, g, keep) * 0.5), a, g, keep)
    calls = [line for line in "\n".join(code).splitlines() if "sparsedrop.wgmma_dsd_tn" in line]
    assert len(calls) == 1 and "reinterpret_tensor(buf" in calls[0], calls
    assert "clone" not in "\n".join(code) and ".copy_(" not in "\n".join(code)
    torch.testing.assert_close(got.t()[None], 0.5 * ref.reference_dsd_tn(a, g, keep, 2.0, (32, 32), False),
                               atol=1e-4, rtol=1e-4)


def test_traced_call_below_the_opaque_op_bound_keeps_the_portable_kernels(monkeypatch):
    """Outside CUDA graphs a traced call below OPAQUE_MIN_WORK multiply-adds is not served (the
    opaque op's host cost would pass its GPU time); under CUDA graphs it is."""
    from torch._inductor import config as inductor_config
    from torch._subclasses.fake_tensor import FakeTensorMode

    class FakePlan:
        R, C, D = 256, 80, 96

    recorded = []
    monkeypatch.setattr(hopper, "OPAQUE_MIN_WORK", 256 * 80 * 96 + 1)
    with FakeTensorMode() as mode:
        out = mode.from_tensor(torch.empty(1, 256, 80))
        for cudagraphs in (False, True):
            monkeypatch.setattr(inductor_config.triton, "cudagraphs", cudagraphs)
            recorded.append(hopper.serve(FakePlan(), lambda *args: None, (out,), 2.0))
    assert recorded == [False, True]

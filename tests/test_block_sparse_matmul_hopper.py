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

from sparsedrop_compile import ops  # noqa: F401  (registers torch.ops.sparsedrop)
from sparsedrop_compile.kernels import block_sparse_matmul as ref
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper
from sparsedrop_compile.kernels import block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels import runtime
from sparsedrop_compile.kernels.block_mask import cdiv

on_hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and hopper._listed_wgmma_kernel is not None),
    reason="the Gluon wgmma kernels need a Hopper GPU (sm_90) and Triton's Gluon",
)
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def every_size_large(monkeypatch):
    """The Hopper path skips launch-bound problems; these test shapes are small, count them large."""
    monkeypatch.setattr(runtime, "LAUNCH_BOUND_WORK", 0)
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
@pytest.mark.parametrize("tiles", ["paired", "flat"])
def test_sdd(shape, p, b_transposed, dtype, tiles, monkeypatch):
    """Both sdd schedules: tiles whose halves lie in two kept blocks of a column (the default
    where the blocks are 128 x 128), and whole tiles of one kept block (forced here)."""
    B, M, K, N, block = shape
    if tiles == "flat":
        monkeypatch.setattr(hopper, "_SDD_PAIRS", None)
    a, b, g, _, bias, keep = _problem(B, M, K, N, block, p, dtype, b_transposed)
    out = torch.empty(B, M, K, device="cuda", dtype=dtype)
    plan = hopper.plan_sdd(g, b, keep, block, bias, None, out)
    assert plan is not None
    assert (plan.list_by == "pairs") == (tiles == "paired" and block == (128, 128)), plan.list_by
    got = tri.sdd(g, b, keep, 1.25, block, bias, bias_scale=0.5)
    _close(got, ref.reference_sdd(g.float(), b.float(), keep, 1.25, block, bias.float(), bias_scale=0.5))


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
def test_eager_replays_launch_the_hopper_kernel():
    """The eager functional path records each call's launches once and replays them (launch
    plans): the Gluon kernel must be among the recorded launches, so every replay with new
    values is right, not only the first call."""
    from sparsedrop_compile import ops as sd_ops
    from sparsedrop_compile.kernels import launch_plans

    gen = torch.Generator(device="cuda").manual_seed(2)
    w = torch.randn(640, 1024, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
    keep = torch.rand(1, 4, 8, device="cuda", generator=gen) >= 0.3
    replayed = launch_plans.stats["replayed"]
    for _ in range(4):
        x = torch.randn(512, 1024, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(512, 640, device="cuda", generator=gen, dtype=torch.bfloat16)
        y = sd_ops.linear_call(x, w, None, keep, 1 / 0.7, 128, 128, "triton")
        dx, dw = torch.autograd.grad(y, (x, w), dy)
        xm = ref._masked(x.detach().float()[None], keep, (128, 128))[0] / 0.7
        _close(y, xm @ w.detach().float().t())
        _close(dw, dy.float().t() @ xm)
        mask = ref.expand_block_keep(keep, 512, 1024, 128, 128)[0]
        _close(dx, torch.where(mask, (dy.float() @ w.detach().float()) / 0.7, 0.0))
    assert launch_plans.stats["replayed"] > replayed, "the eager calls were never replayed: the test checks nothing"


def test_hopper_path_not_planned_without_a_hopper_gpu_or_when_traced():
    """On CPU tensors (and under the interpreter) the launchers never plan the Gluon kernels."""
    a = torch.randn(1, 256, 256, dtype=torch.bfloat16)
    b = torch.randn(1, 256, 256, dtype=torch.bfloat16)
    keep = torch.ones(1, 2, 2, dtype=torch.bool)
    out = torch.empty(1, 256, 256, dtype=torch.bfloat16)
    assert hopper.plan_dsd(a, b, keep, (128, 128), None, None, out) is None
    assert hopper.plan_sdd(a, b, keep, (128, 128), None, None, out) is None
    assert hopper.plan_dsd_tn(a, a, keep, (128, 128), False, None, out) is None

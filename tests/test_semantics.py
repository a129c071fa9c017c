"""Compiled output and every gradient equal "block dropout, then the dense op" with the same mask."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from sparsedrop_compile.kernels.block_mask import apply_block_keep, expand_block_keep, sample_block_keep

P = 0.3
BLOCK = (16, 8)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _cases():
    """name -> (fn(drop, x, w, b), x shape, w shape, batched). Each activation holds enough blocks
    (at BLOCK and at the Triton test's (16, 32)) that P**k stays below max_drop_all."""
    return {
        "linear_2d_ragged": (lambda drop, x, w, b: F.linear(drop(x), w, b), (37, 40), (12, 40), False),
        "linear_3d": (lambda drop, x, w, b: F.linear(drop(x), w, b), (3, 21, 40), (12, 40), False),
        "linear_3d_tall": (lambda drop, x, w, b: F.linear(drop(x), w, b), (3, 41, 40), (12, 40), False),
        "linear_cast_scale": (lambda drop, x, w, b: F.linear(drop(x).to(torch.float32) * 0.5, w), (3, 21, 40), (12, 40), False),
        "linear_view": (lambda drop, x, w, b: F.linear(drop(x).view(-1, 40), w, b), (3, 21, 40), (12, 40), False),
        "addmm": (lambda drop, x, w, b: torch.addmm(b, drop(x), w.t().contiguous()), (101, 40), (12, 40), False),
        "matmul_broadcast_b": (lambda drop, x, w, b: torch.matmul(drop(x), w.t()), (3, 21, 40), (12, 40), True),
        "matmul_4d_pv": (lambda drop, x, w, b: torch.matmul(drop(x), w.reshape(2, 1, 40, 6)), (2, 3, 21, 40), (12, 40), True),
        "bmm": (lambda drop, x, w, b: torch.bmm(drop(x), w.reshape(1, 40, 12).expand(3, 40, 12)), (3, 21, 40), (12, 40), True),
        "shared_mask_two_linears_and_residual": (
            lambda drop, x, w, b: (lambda d: (F.linear(d, w, b), F.linear(d, w * 2), d + 1))(drop(x)),
            (3, 21, 40),
            (12, 40),
            False,
        ),
    }


def _run(case, inner, dtype=torch.float32, seed=0, kernel="auto", modes=("compiled", "reference"), block=BLOCK, device="cpu"):
    """Outputs and (x, w, b) grads of each mode, from the same inputs and the same mask.

    "compiled": the sparsedrop backend on F.dropout; "reference": block dropout by hand, then
    the dense ops; "reference64": the same in float64 without autocast (the accuracy oracle).
    """
    fn, x_shape, w_shape, batched = _cases()[case]
    gen = torch.Generator().manual_seed(1234)
    x0 = torch.randn(x_shape, generator=gen).to(device)
    w0 = (torch.randn(w_shape, generator=gen) / w_shape[1] ** 0.5).to(device)
    b0 = torch.randn(w_shape[0], generator=gen).to(device)
    results = []
    for mode in modes:
        wide = mode == "reference64"
        x, w, b = (t.clone().double() if wide else t.clone() for t in (x0, w0, b0))
        for t in (x, w, b):
            t.requires_grad_()
        torch.manual_seed(seed)
        if mode == "compiled":
            opts = {"block_size": block, "inner": inner, "kernel": kernel}
            f = torch.compile(lambda x, w, b: fn(lambda t: F.dropout(t, P, True), x, w, b), backend="sparsedrop", options=opts, fullgraph=True)
        else:
            keep = sample_block_keep(x, P, *block, batched)
            f = lambda x, w, b: fn(lambda t: apply_block_keep(t, keep, 1 / (1 - P), *block, batched), x, w, b)  # noqa: E731
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16 and not wide):
            out = f(x, w, b)
        if mode == "compiled":  # else the comparison would be of element-wise dropout
            assert sum(v for k, v in counters["sparsedrop"].items() if k.endswith("_fused")) >= 1, dict(counters["sparsedrop"])
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64, device=o.device).reshape(o.shape)).sum() for o in outs)
        loss.backward()
        results.append((outs, (x.grad, w.grad, b.grad)))
    return results


def _rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", sorted(_cases()))
def test_matches_block_dropout_reference_aot_eager(case):
    (out, grads), (ref_out, ref_grads) = _run(case, "aot_eager")
    assert sum(v for k, v in counters["sparsedrop"].items() if k.endswith("_fused")) >= 1
    for o, r in zip(out, ref_out):
        assert o.dtype == r.dtype
        torch.testing.assert_close(o, r, **TOL[torch.float32])
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r, **TOL[torch.float32])


@pytest.mark.parametrize("case", ["linear_3d", "matmul_4d_pv", "shared_mask_two_linears_and_residual"])
def test_matches_reference_under_bf16_autocast(case):
    """Under bf16 autocast, dtypes match the original ops and the error against a float64 oracle
    is bf16-sized and no worse than twice that of eager bf16 block dropout + dense ops."""
    ours, eager, wide = _run(case, "aot_eager", dtype=torch.bfloat16, modes=("compiled", "reference", "reference64"))
    for (o, e, r) in zip(ours[0] + ours[1], eager[0] + eager[1], wide[0] + wide[1]):
        if r is None:
            continue
        assert o.dtype == e.dtype  # what the original op would have produced under autocast
        err, eager_err = _rel_err(o, r), _rel_err(e, r)
        assert err < 1e-2 and err <= 2 * eager_err + 1e-3, (err, eager_err)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("case", ["linear_3d", "matmul_4d_pv"])
def test_compile_tiers(case, inner):
    # fallback_random makes Inductor draw from the same generator as eager, so masks agree.
    with torch._inductor.config.patch(fallback_random=True):
        (out, grads), (ref_out, ref_grads) = _run(case, inner)
    for o, r in zip(out + grads, ref_out + ref_grads):
        if r is not None:
            torch.testing.assert_close(o, r, **TOL[torch.float32])


def test_dropped_pattern_is_block_structured_with_ragged_edges():
    x = torch.ones(3, 37, 45, requires_grad=True)
    w = torch.ones(5, 45)
    f = torch.compile(lambda x: F.linear(F.dropout(x, 0.5, True), w), backend="sparsedrop", options={"block_size": (16, 8), "inner": "aot_eager"})
    torch.manual_seed(3)
    f(x).sum().backward()
    g = x.grad.reshape(111, 45)  # dx = scale * (dy W) ⊙ m = 2 * 5 in kept blocks, 0 elsewhere
    assert set(g.unique().tolist()) == {0.0, 10.0}
    blocks = torch.nn.functional.pad(g, (0, 3, 0, 1)).reshape(7, 16, 6, 8)  # 111 = 6*16+15, 45 = 5*8+5
    for i in range(7):
        for j in range(6):
            rows, cols = min(16, 111 - 16 * i), min(8, 45 - 8 * j)
            tile = blocks[i, :rows, j, :cols]
            assert tile.eq(tile[0, 0]).all(), f"block ({i}, {j}) is not uniform"


def test_kept_fraction_and_expectation():
    torch.manual_seed(0)
    x = torch.randn(256, 64) + 1.0
    w = torch.randn(32, 64) / 8
    f = torch.compile(lambda x: (F.linear(F.dropout(x, 0.3, True), w), F.dropout(x, 0.3, True)), backend="sparsedrop", options={"block_size": 8, "inner": "eager"})
    # The second dropout has no matmul user: it stays element-wise. Check only the fused one.
    keeps = [sample_block_keep(x, 0.3, 8, 8, False).float().mean() for _ in range(50)]
    assert abs(torch.stack(keeps).mean().item() - 0.7) < 0.02
    mean = torch.stack([f(x)[0] for _ in range(400)]).mean(0)
    dense = F.linear(x, w)
    # Each output averages 400 draws of 8 blocks: the mean is within a few standard errors.
    assert (mean - dense).abs().mean() < 0.05 * dense.abs().mean() + 0.02
    assert counters["sparsedrop"]["linear_fused"] == 1


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_same_seed_same_outputs(inner):
    x = torch.randn(64, 48)
    w = torch.randn(16, 48)
    f = torch.compile(lambda x: F.linear(F.dropout(x, 0.5, True), w), backend="sparsedrop", options={"block_size": 16, "inner": inner})
    torch.manual_seed(7)
    a = f(x)
    torch.manual_seed(7)
    b = f(x)
    c = f(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(b, c)


def test_materialised_users_see_the_same_mask_as_the_fused_matmul():
    x = torch.randn(96, 64)  # 24 blocks of 16 x 16
    w = torch.eye(64)
    f = torch.compile(lambda x: (F.linear(F.dropout(x, 0.5, True), w), None), backend="sparsedrop", options={"block_size": 16, "inner": "aot_eager"})

    def g(x):
        d = F.dropout(x, 0.5, True)
        return F.linear(d, w), d

    fg = torch.compile(g, backend="sparsedrop", options={"block_size": 16, "inner": "aot_eager"})
    torch.manual_seed(1)
    fused, materialised = fg(x)
    torch.testing.assert_close(fused, materialised)  # identity weight: both are the dropped x
    assert counters["sparsedrop"]["linear_fused"] == 1
    keep = expand_block_keep((materialised != 0).reshape(1, 96, 64)[:, ::16, ::16], 96, 64, 16, 16)[0]
    torch.testing.assert_close(materialised, torch.where(keep, x * 2, 0))
    del f


@pytest.mark.parametrize("case", ["linear_3d_tall", "addmm", "matmul_4d_pv", "matmul_broadcast_b"])
def test_triton_kernels_through_the_backend(case):
    """kernel="triton" runs the real Triton kernels (on CUDA where there is one, else under the
    interpreter on CPU) in the compiled graph; the result is the same block dropout as the
    reference."""
    # Tensor-core tiles are at least 16 wide, so the Triton path takes blocks in multiples of 16.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    (out, grads), (ref_out, ref_grads) = _run(case, "aot_eager", kernel="triton", block=(16, 32), device=device)
    for o, r in zip(out + grads, ref_out + ref_grads):
        if r is not None:
            torch.testing.assert_close(o, r, **TOL[torch.float32])

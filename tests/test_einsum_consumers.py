"""torch.einsum as a matmul consumer of a dropout, and reasons that name the real users."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sparsedrop_compile as sd
from sparsedrop_compile.kernels.block_mask import apply_block_keep, sample_block_keep

P = 0.3
BLOCK = (8, 8)
TOL = dict(rtol=1e-5, atol=1e-5)


def _cases():
    """name -> (fn(drop, x, b), x shape, other operand shape, batched mask layout).

    Every activation has at least 24 blocks of BLOCK (per matrix for batched layouts)."""
    return {
        "linear_bsk_nk": (lambda drop, x, b: torch.einsum("bsk,nk->bsn", drop(x), b), (2, 48, 32), (12, 32), False),
        "linear_ik_kj_list_form": (lambda drop, x, b: torch.einsum("ik,kj->ij", [drop(x), b]), (48, 32), (32, 12), False),
        "linear_implicit_output": (lambda drop, x, b: torch.einsum("ik,kj", drop(x), b), (48, 33), (33, 12), False),
        "linear_operands_swapped": (lambda drop, x, b: torch.einsum("nk,bsk->bsn", b, drop(x)), (2, 48, 32), (12, 32), False),
        "linear_through_scale": (lambda drop, x, b: torch.einsum("bsk,nk->bsn", drop(x) * 0.5, b), (2, 47, 32), (12, 32), False),
        "matmul_pv": (lambda drop, x, b: torch.einsum("bhqk,bhkd->bhqd", drop(x), b), (2, 3, 48, 32), (2, 3, 32, 16), True),
        "matmul_b_transposed": (lambda drop, x, b: torch.einsum("bhqk,bhdk->bhqd", drop(x), b), (2, 3, 48, 32), (2, 3, 16, 32), True),
        "matmul_b_broadcast": (lambda drop, x, b: torch.einsum("bhqk,hkd->bhqd", drop(x), b), (2, 3, 48, 33), (3, 33, 16), True),
        "matmul_2d_dropout_batched_b": (lambda drop, x, b: torch.einsum("qk,bkd->bqd", drop(x), b), (48, 32), (3, 32, 16), True),
    }


def _run(case, mode, seed=0, kernel="reference", block=BLOCK, shapes=None, device="cpu"):
    fn, x_shape, b_shape, batched = _cases()[case]
    x_shape, b_shape = shapes or (x_shape, b_shape)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(x_shape, generator=gen).to(device).requires_grad_()
    b = (torch.randn(b_shape, generator=gen) / b_shape[-1] ** 0.5).to(device).requires_grad_()
    torch.manual_seed(seed)
    if mode == "compiled":
        opts = {"block_size": block, "inner": "aot_eager", "kernel": kernel}
        f = torch.compile(lambda x, b: fn(lambda t: F.dropout(t, P, True), x, b), backend="sparsedrop", options=opts, fullgraph=True)
    else:
        keep = sample_block_keep(x, P, *block, batched)
        f = lambda x, b: fn(lambda t: apply_block_keep(t, keep, 1 / (1 - P), *block, batched), x, b)  # noqa: E731
    out = f(x, b)
    (out.double() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=out.device).reshape(out.shape)).sum().backward()
    return out, x.grad, b.grad


@pytest.mark.parametrize("case", sorted(_cases()))
def test_einsum_matches_block_dropout_reference(case):
    ours = _run(case, "compiled")
    assert counters["sparsedrop"]["einsum_fused"] == 1, dict(counters["sparsedrop"])
    for a, r in zip(ours, _run(case, "reference")):
        torch.testing.assert_close(a, r, **TOL)


@pytest.mark.parametrize("case", ["linear_bsk_nk", "matmul_b_transposed"])
def test_einsum_through_the_triton_kernels(case):
    # Tensor-core tiles need blocks in multiples of 16; (96, 64) per matrix is 24 blocks of (16, 16).
    shapes = {"linear_bsk_nk": ((2, 96, 64), (12, 64)), "matmul_b_transposed": ((1, 2, 96, 64), (1, 2, 16, 64))}[case]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under Triton's interpreter
    ours = _run(case, "compiled", kernel="triton", block=(16, 16), shapes=shapes, device=device)
    assert counters["sparsedrop"]["einsum_fused"] == 1
    for a, r in zip(ours, _run(case, "reference", block=(16, 16), shapes=shapes, device=device)):
        torch.testing.assert_close(a, r, **TOL)


def test_einsum_under_bf16_autocast_keeps_the_dtype():
    x = torch.randn(2, 48, 32)
    w = torch.randn(12, 32)
    f = torch.compile(lambda x, w: torch.einsum("bsk,nk->bsn", F.dropout(x, P, True), w), backend="sparsedrop",
                      options={"block_size": BLOCK, "inner": "aot_eager", "kernel": "reference"})
    torch.manual_seed(0)
    keep = sample_block_keep(x, P, *BLOCK, False)  # the mask the compiled graph draws first
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        out = f(x, w)
        ref = torch.einsum("bsk,nk->bsn", apply_block_keep(x, keep, 1 / (1 - P), *BLOCK, False), w)
    assert counters["sparsedrop"]["einsum_fused"] == 1
    assert out.dtype == ref.dtype == torch.bfloat16
    exact = torch.einsum("bsk,nk->bsn", apply_block_keep(x.double(), keep, 1 / (1 - P), *BLOCK, False), w.double())
    err = ((out.double() - exact).norm() / exact.norm()).item()
    ref_err = ((ref.double() - exact).norm() / exact.norm()).item()
    assert err < 1e-2 and err <= 2 * ref_err + 1e-3, (err, ref_err)


REFUSED = {
    "output_order": (lambda d, x, w: torch.einsum("bsk,nk->bns", d, w), (2, 48, 32), "einsum 'bsk,nk->bns': output order 'bns' is not the matmul's 'bsn'"),
    "contracted_index_not_last": (lambda d, x, w: torch.einsum("bks,nk->bsn", d, w), (2, 32, 48), "einsum 'bks,nk->bsn': the dropout operand's last index 's'"),
    "extra_sum": (lambda d, x, w: torch.einsum("bsk,nk->sn", d, w), (2, 48, 32), "einsum 'bsk,nk->sn' sums over an index besides 'k'"),
    "ellipsis": (lambda d, x, w: torch.einsum("...k,nk->...n", d, w), (2, 48, 32), "einsum '...k,nk->...n' has an ellipsis"),
    "three_operands": (lambda d, x, w: torch.einsum("bsk,nk,n->bs", d, w, w[:, 0]), (2, 48, 32), "einsum 'bsk,nk,n->bs' has 3 operands"),
    "repeated_index": (lambda d, x, w: torch.einsum("bkk,nk->bn", d, w), (2, 32, 32), "einsum 'bkk,nk->bn' repeats an index"),
    "dropout_twice": (lambda d, x, w: torch.einsum("ik,jk->ij", d, d), (48, 32), "einsum 'ik,jk->ij' reads the dropout output as both operands"),
    "batch_misaligned": (lambda d, x, w: torch.einsum("bqk,kbd->bqd", d, w.t().reshape(32, 2, 6)), (2, 48, 32), "einsum 'bqk,kbd->bqd': 'k' is not among"),
    "sublist_form": (lambda d, x, w: torch.einsum(d, [0, 1], w, [2, 1], [0, 2]), (48, 32), "einsum in sublist form"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_einsum_that_is_no_matmul_of_the_dropout_is_left_with_its_equation(name):
    fn, shape, reason = REFUSED[name]
    w = torch.randn(12, 32)
    x = torch.randn(shape)
    report = sd.explain(lambda x, w: fn(F.dropout(x, P, True), x, w), x, w, options={"block_size": BLOCK})
    (site,) = report.sites
    assert not site.rewritten and counters["sparsedrop"]["einsum_fused"] == 0
    assert reason in site.reason, site.reason
    assert any(c.startswith("einsum") for c in site.consumers)


def test_refused_einsum_runs_the_original_graph():
    w = torch.randn(12, 32)
    x = torch.randn(2, 48, 32)
    fn = REFUSED["output_order"][0]
    outs = []
    for backend, options in (("sparsedrop", {"block_size": BLOCK, "inner": "aot_eager"}), ("aot_eager", None)):
        torch.manual_seed(4)
        outs.append(torch.compile(lambda x, w: fn(F.dropout(x, P, True), x, w), backend=backend, options=options)(x, w))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


# --------------------------------------------------------------------------- reason texts
# A dropout returned from the graph: its matmul, if any, is in another graph (here: none at all).
RETURNED = "; the compiled function returns it; a matmul that reads it later is in another graph and cannot be fused"
USERS = {
    "cat": (lambda d, x, w: torch.cat([d, x]), "no matmul consumer: users are cat"),
    "graph_output": (lambda d, x, w: d, "no matmul consumer: users are graph output" + RETURNED),
    "cat_and_output": (lambda d, x, w: (torch.cat([d, x]), d), "no matmul consumer: users are cat, graph output" + RETURNED),
    "add_through_cast": (lambda d, x, w: d.double() + 1, "no matmul consumer: users are add"),
    "refused_einsum_and_add": (lambda d, x, w: (torch.einsum("sk,nk->ns", d, w), d + x),
                               "einsum 'sk,nk->ns': output order 'ns' is not the matmul's 'sn'; other users: add"),
}


@pytest.mark.parametrize("name", sorted(USERS))
def test_reason_names_the_real_users(name):
    fn, reason = USERS[name]
    report = sd.explain(lambda x, w: fn(F.dropout(x, P, True), x, w), torch.randn(48, 32), torch.randn(12, 32), options={"block_size": BLOCK})
    (site,) = report.sites
    assert not site.rewritten
    # and the output side's: x is a graph input, no matmul's output
    assert site.reason == reason + "; no matmul producer: its input comes from a graph input"

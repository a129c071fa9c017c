"""The keep flags of a graph's sites come from one draw per (p, device) (passes/keep_sampling.py).

The merged draw must give every site the flags the separate draws gave, in graph order (the
CPU generator draws n1 + n2 values as n1 then n2), so outputs and gradients equal a reference
that draws each site's flags in turn; sites of another p draw apart; symbolic sizes keep their
own draw (no new guards); a checkpointed region replays its draw in backward; explain says it.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import sparsedrop_compile as sd
from sparsedrop_compile.kernels.block_mask import apply_block_keep, sample_block_keep
from sparsedrop_compile.passes.keep_sampling import draw_keeps

BLOCK = (8, 8)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _weights(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 32, generator=gen) / 6 for _ in range(n)]


def _chain(ps):
    def f(x, *ws):
        for w, p in zip(ws, ps):
            x = F.linear(F.dropout(x, p, True), w).tanh()
        return x
    return f


def _reference(x, ws, ps):
    """Each site's flags drawn in turn with the plain-PyTorch sampler, then the dense ops."""
    keeps = []
    for w, p in zip(ws, ps):
        keep = sample_block_keep(x, p, *BLOCK, False)
        keeps.append(keep)
        x = F.linear(apply_block_keep(x, keep, 1 / (1 - p), *BLOCK, False), w).tanh()
    return x, keeps


def _compiled_graph_code(fn, *args, **options):
    """Run ``fn`` compiled by sparsedrop with aot_eager and return the Dynamo graphs' code after
    the passes (the backend is wrapped to see the rewritten graph)."""
    codes = []
    from sparsedrop_compile import backend as sd_backend

    def spy(gm, example_inputs, **kwargs):
        compiled = sd_backend.sparsedrop(gm, example_inputs, **kwargs)
        codes.append(gm.code)
        return compiled

    out = torch.compile(fn, backend=lambda gm, ex: spy(gm, ex, options={"block_size": BLOCK, "inner": "aot_eager", **options}))(*args)
    return out, codes


@pytest.mark.parametrize("ps", [(0.3, 0.3, 0.3), (0.3, 0.5, 0.3)], ids=["one_p", "two_ps"])
def test_merged_draw_gives_each_site_its_flags_in_graph_order(ps):
    x = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    ws = _weights(len(ps))
    leaves = [x.clone().requires_grad_()] + [w.clone().requires_grad_() for w in ws]
    torch.manual_seed(7)
    out, codes = _compiled_graph_code(_chain(ps), *leaves)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    code = "\n".join(codes)
    # one draw for all sites of a p: one_p merges all three; two_ps merges the two p = 0.3 sites
    # and leaves the p = 0.5 one alone (a group of one is not merged)
    assert code.count("keep_sampling_draw_keeps(") == 1, code
    assert code.count("mask_ops_sample_keep(") == (0 if len(set(ps)) == 1 else 1), code

    ref_leaves = [x.clone().requires_grad_()] + [w.clone().requires_grad_() for w in ws]
    torch.manual_seed(7)
    if len(set(ps)) == 1:
        expected, keeps = _reference(ref_leaves[0], ref_leaves[1:], ps)
    else:
        # merged group first (drawn where its first site was), then the lone p = 0.5 draw
        k0 = sample_block_keep(x, ps[0], *BLOCK, False)
        k2 = sample_block_keep(x, ps[2], *BLOCK, False)
        k1 = sample_block_keep(x, ps[1], *BLOCK, False)
        keeps = [k0, k1, k2]
        h = ref_leaves[0]
        for w, p, keep in zip(ref_leaves[1:], ps, keeps):
            h = F.linear(apply_block_keep(h, keep, 1 / (1 - p), *BLOCK, False), w).tanh()
        expected = h
    assert all(0 < k.float().mean() < 1 for k in keeps)
    (expected * torch.linspace(-1, 1, expected.numel()).reshape(expected.shape)).sum().backward()
    torch.testing.assert_close(out, expected, **TOL)
    for got, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, ref.grad, **TOL)


def test_draw_keeps_is_the_separate_draws_back_to_back():
    shapes = ((1, 7, 5), (2, 3, 4), (1, 1, 9))
    torch.manual_seed(11)
    merged = draw_keeps(shapes, 0.4, torch.device("cpu"))
    torch.manual_seed(11)
    separate = [torch.rand(s) >= 0.4 for s in shapes]
    for m, s, shape in zip(merged, separate, shapes):
        assert m.shape == shape and m.dtype == torch.bool
        assert torch.equal(m, s)


def test_symbolic_sizes_keep_their_own_draws_and_compile_as_often_as_aot_eager():
    from torch._dynamo.utils import counters

    ws = _weights(3)
    f = _chain((0.3, 0.3, 0.3))
    torch._dynamo.reset()
    counters.clear()
    codes = []
    from sparsedrop_compile import backend as sd_backend

    def spy(gm, ex):
        compiled = sd_backend.sparsedrop(gm, ex, options={"block_size": BLOCK, "inner": "aot_eager"})
        codes.append(gm.code)
        return compiled

    g = torch.compile(f, backend=spy, dynamic=True)
    for rows in (48, 40, 17):
        g(torch.randn(rows, 32), *ws)
    assert len(codes) == 1, "one graph for every row count, as aot_eager compiles"
    assert "draw_keeps(" not in codes[0] and codes[0].count("mask_ops_sample_keep(") == 3, codes[0]


def test_checkpointed_region_replays_its_merged_draw_in_backward():
    """Inductor-free check: under aot_eager the region's recomputation reruns the merged draw
    from the saved RNG state, so the gradients equal the reference drawn in turn."""
    x = torch.randn(48, 32, generator=torch.Generator().manual_seed(2))
    ws = _weights(2, seed=3)
    body = _chain((0.3, 0.3))
    leaves = [x.clone().requires_grad_()] + [w.clone().requires_grad_() for w in ws]
    f = torch.compile(lambda *t: checkpoint(body, *t, use_reentrant=False), backend="sparsedrop",
                      options={"block_size": BLOCK, "inner": "aot_eager"})
    torch.manual_seed(5)
    out = f(*leaves)
    out.sum().backward()
    ref_leaves = [x.clone().requires_grad_()] + [w.clone().requires_grad_() for w in ws]
    torch.manual_seed(5)
    expected, keeps = _reference(ref_leaves[0], ref_leaves[1:], (0.3, 0.3))
    expected.sum().backward()
    assert all(0 < k.float().mean() < 1 for k in keeps)
    torch.testing.assert_close(out, expected, **TOL)
    for got, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, ref.grad, **TOL)


def test_explain_says_how_many_sites_share_a_draw():
    ws = _weights(3)
    report = sd.explain(_chain((0.3, 0.3, 0.5)), torch.randn(48, 32), *ws, options={"block_size": BLOCK})
    assert len(report.rewritten) == 3
    assert "keep flags of 2 rewritten site(s) drawn in 1 launch" in str(report)


def test_triton_kernels_read_each_sites_flags_from_its_slice_of_the_shared_draw():
    """The Triton kernels (Triton's interpreter on CPU) read a site's keep through a view at an
    offset into the shared flags: input side, output side and both, against the reference."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 48, generator=gen)  # 16 x 16 blocks (the kernels' smallest): 4 x 3 of them
    ws = [torch.randn(48, 48, generator=gen) / 7 for _ in range(3)]

    def f(x, w0, w1, w2):
        h = F.linear(F.dropout(x, 0.3, True), w0)  # input side
        h = h + F.dropout(F.linear(h, w1), 0.3, True)  # output side
        return F.dropout(F.linear(F.dropout(h, 0.3, True), w2), 0.3, True)  # both sides

    results = []
    for kernel in ("triton", "reference"):
        leaves = [x.clone().requires_grad_()] + [w.clone().requires_grad_() for w in ws]
        torch.manual_seed(9)
        out, codes = _compiled_graph_code(f, *leaves, kernel=kernel, block_size=16)
        assert "keep_sampling_draw_keeps(" in "\n".join(codes)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_under_inductor_each_site_uses_the_flags_it_materialises():
    """Inductor (CPU) compiles the merged draw with its own RNG: the masks read off each site's
    materialised dropout output (a second user of the dropout) give the reference that the output
    and every gradient must equal, and the sites' masks differ from one another."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(48, 32, generator=gen) + 5  # no zeros: a zero in a dropped tensor means dropped
    ws = [torch.randn(32, 32, generator=gen) / 6 for _ in range(3)]

    def f(x, *ws):
        dropped = []
        for w in ws:
            d = F.dropout(x, 0.3, True)
            dropped.append(d)
            x = F.linear(d, w).tanh() + 5
        return x, *dropped

    leaves = [x.clone().requires_grad_()] + [w.clone().requires_grad_() for w in ws]
    out, codes = _compiled_graph_code_inductor(f, *leaves)
    assert "keep_sampling_draw_keeps(" in "\n".join(codes)
    y, *dropped = out
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    keeps = [(d != 0).reshape(1, 6, 8, 4, 8)[:, :, 0, :, 0] for d in dropped]
    assert all(0 < k.float().mean() < 1 for k in keeps)
    assert not all(torch.equal(keeps[0], k) for k in keeps[1:])

    ref = [x.clone().requires_grad_()] + [w.clone().requires_grad_() for w in ws]
    h = ref[0]
    for w, keep in zip(ref[1:], keeps):
        h = F.linear(apply_block_keep(h, keep, 1 / 0.7, *BLOCK, False), w).tanh() + 5
    (h * torch.linspace(-1, 1, h.numel()).reshape(h.shape)).sum().backward()
    # Inductor's fused C++ kernels sum fp32 in another order than eager over three layers
    # (differences ~2e-5); a wrong mask would differ by O(1).
    tol = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y, h, **tol)
    for got, expected in zip(leaves, ref):
        torch.testing.assert_close(got.grad, expected.grad, **tol)


def _compiled_graph_code_inductor(fn, *args):
    codes = []
    from sparsedrop_compile import backend as sd_backend

    def spy(gm, example_inputs):
        compiled = sd_backend.sparsedrop(gm, example_inputs, options={"block_size": BLOCK, "inner": "inductor"})
        codes.append(gm.code)
        return compiled

    return torch.compile(fn, backend=spy)(*args), codes

"""Sparse or dense compute for a block-dropped matmul site (passes/compute_choice.py).

Below ``sparse_min_p`` a GPU-bound site keeps its block dropout but materialises it in front of
the dense matmul. That must change nothing but the compute path: the same flags from the same
draws (so the same outputs and gradients, up to rounding, as the block-sparse rewrite at the same
seed), and ``explain`` must say which path each site took. The size at which a matmul counts as
GPU-bound is lowered here so that tiny CPU models exercise the choice.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsedrop_compile as sd
from sparsedrop_compile.kernels import runtime
from sparsedrop_compile.passes import compute_choice

BLOCK = (8, 8)
OPTS = {"block_size": BLOCK, "inner": "aot_eager"}


@pytest.fixture
def gpu_bound(monkeypatch):
    """Every matmul counts as GPU-bound (none as launch-bound)."""
    monkeypatch.setattr(runtime, "LAUNCH_BOUND_WORK", 1)


class InputSide(nn.Module):  # dropout -> linear, twice, the second without bias
    def __init__(self, p):
        super().__init__()
        self.a, self.b, self.p = nn.Linear(40, 24), nn.Linear(24, 16, bias=False), p

    def forward(self, x):
        return self.b(F.dropout(self.a(F.dropout(x, self.p)), self.p))


class OutputSide(nn.Module):  # x + dropout(linear(x)), then a T5-like dropout -> wo -> dropout
    def __init__(self, p):
        super().__init__()
        self.o, self.wi, self.wo, self.p = nn.Linear(24, 24), nn.Linear(24, 40), nn.Linear(40, 24), p

    def forward(self, x):
        x = x + F.dropout(self.o(x), self.p)
        return x + F.dropout(self.wo(F.dropout(torch.relu(self.wi(x)), self.p)), self.p)


class Attention(nn.Module):  # dropout(P) @ V, a batched matmul
    def forward(self, s, v):
        return F.dropout(torch.softmax(s, -1), 0.1) @ v


def _run(model, inputs, options, seed=0):
    """Output and every gradient of one compiled forward + backward."""
    torch._dynamo.reset()
    leaves = [t.clone().requires_grad_() for t in inputs]
    torch.manual_seed(seed)
    out = torch.compile(model, backend="sparsedrop", options=options)(*leaves)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return [out] + [t.grad for t in leaves] + [p.grad.clone() for p in model.parameters()]


def _compare_paths(model, inputs):
    """The dense path (sparse_min_p=1) against the block-sparse one (0), same seed."""
    dense = _run(model, inputs, {**OPTS, "sparse_min_p": 1.0})
    model.zero_grad()
    sparse = _run(model, inputs, {**OPTS, "sparse_min_p": 0.0})
    for d, s in zip(dense, sparse):
        torch.testing.assert_close(d, s, rtol=1e-5, atol=1e-5)
    assert dense[0].abs().sum() > 0


@pytest.mark.parametrize("model_cls,shape", [(InputSide, (3, 17, 40)), (OutputSide, (2, 19, 24))], ids=["input", "output_and_both"])
def test_dense_path_gives_the_block_sparse_results_at_the_same_seed(gpu_bound, model_cls, shape):
    torch.manual_seed(1)
    model = model_cls(0.3)
    _compare_paths(model, [torch.randn(shape)])


def test_dense_path_for_a_batched_matmul(gpu_bound):
    gen = torch.Generator().manual_seed(2)
    s, v = torch.randn(2, 3, 20, 20, generator=gen), torch.randn(2, 3, 20, 12, generator=gen)
    _compare_paths(Attention(), [s, v])


def test_explain_says_which_sites_run_dense_and_why(gpu_bound):
    x = torch.randn(2, 19, 24)
    model = OutputSide(0.1)
    report = sd.explain(model, x, options=OPTS)  # p = 0.1 < sparse_min_p = 0.25 by default
    rewritten = report.rewritten
    assert len(rewritten) == 3 and all(s.compute == "dense" for s in rewritten), str(report)
    assert all("sparse_min_p=0.25" in s.reason and "p=0.1" in s.reason for s in rewritten), str(report)
    assert "yes (output, dense)" in str(report) and "yes (input, dense)" in str(report)
    sparse = sd.explain(model, x, options={**OPTS, "sparse_min_p": 0.05})
    assert [s.compute for s in sparse.rewritten] == ["sparse"] * 3 and "dense" not in str(sparse)
    assert "yes (both)" in str(sparse)  # wo is block-sparse on both sides when both are sparse


def test_compiled_graph_has_no_sparse_op_on_the_dense_path(gpu_bound):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    from sparsedrop_compile.backend import run_passes
    from sparsedrop_compile.config import SparseDropConfig

    def backend(gm, example_inputs):
        run_passes(gm, SparseDropConfig.from_options({**OPTS, "sparse_min_p": 0.5}), example_inputs)
        return capture(gm, example_inputs)

    torch._dynamo.reset()
    torch.compile(InputSide(0.3), backend=backend)(torch.randn(3, 17, 40))
    assert "sparsedrop.linear" not in graphs[0] and "materialise" in graphs[0], graphs[0]


def test_launch_bound_sites_and_forced_kernels_stay_sparse():
    config = sd.SparseDropConfig(sparse_min_p=0.5)
    assert compute_choice.dense_reason(2048 * 768, 3072, 0.1, True, config) is None  # BERT 16x128: launch-bound
    assert compute_choice.dense_reason(32768 * 768, 3072, 0.1, True, config) is not None  # BERT 64x512
    assert compute_choice.dense_reason(32768 * 768, 3072, 0.5, True, config) is None  # p at the threshold
    for kernel in ("triton", "reference"):
        assert compute_choice.dense_reason(32768 * 768, 3072, 0.1, True, config.replace(kernel=kernel)) is None


def test_under_cuda_graphs_nothing_is_launch_bound():
    graphs = sd.SparseDropConfig(mode="reduce-overhead")
    assert compute_choice.cuda_graphs(graphs) and not compute_choice.cuda_graphs(sd.SparseDropConfig())
    assert compute_choice.cuda_graphs(sd.SparseDropConfig(inductor_options={"triton.cudagraphs": True}))
    small = (2048 * 768, 3072, 0.1)
    assert "under CUDA graphs" in compute_choice.dense_reason(*small[:2], 0.1, True, graphs)
    assert compute_choice.dense_reason(*small[:2], 0.1, False, graphs) is None  # CPU tensors: no CUDA graphs


def test_sparse_min_p_is_validated():
    with pytest.raises(ValueError, match=r"sparse_min_p=1.5: expected a number in \[0, 1\]"):
        sd.SparseDropConfig.from_options({"sparse_min_p": 1.5})


class MixedP(nn.Module):  # dropout(0.3) -> wo -> dropout(0.1): the input side sparse, the output side dense
    def __init__(self):
        super().__init__()
        self.wo = nn.Linear(40, 24)

    def forward(self, h):
        return F.dropout(self.wo(F.dropout(h, 0.3)), 0.1)


def test_a_dense_output_side_leaves_the_input_side_its_own_label(gpu_bound):
    """'both' says the matmul is block-sparse on both sides; with its output computed in full it
    is not, so the input row stays 'input' and the output row says 'output, dense'."""
    h = torch.randn(2, 19, 40)
    report = sd.explain(MixedP(), h, options=OPTS)
    rows = {s.p: s for s in report.sites}
    assert (rows[0.3].side, rows[0.3].compute) == ("input", "sparse"), str(report)
    assert (rows[0.1].side, rows[0.1].compute) == ("output", "dense"), str(report)
    _compare_paths(MixedP(), [h])  # and the same numbers as both sides block-sparse

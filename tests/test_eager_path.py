"""The functional forms outside a trace run the op bodies through a plain autograd.Function (no
custom-op layers: host time); inside torch.compile they stay the registered ops. Both paths must
give the same outputs and gradients for the same keep flags, also under autocast, and with the
Triton kernels (interpreter) as with the reference."""
import pytest
import torch

import sparsedrop_compile as sd
from sparsedrop_compile.kernels.block_mask import dropout_scale, sample_block_keep

BLOCK = 16
P = 0.3
# The Triton cases run the kernels on CPU tensors, so under the interpreter only (as on CI); on a
# GPU machine the GPU test files cover the same kernels.
TRITON = pytest.param("triton", marks=pytest.mark.interpret)


def _leaves(*shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=gen) / 4).to(dtype).requires_grad_() for s in shapes]


def _grads(fn, leaves):
    out = fn(*leaves)
    (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return [out] + [t.grad for t in leaves]


def _op_path_linear(kernel):
    def f(x, w, b=None):
        keep = sample_block_keep(x, P, BLOCK, BLOCK, False)
        return torch.ops.sparsedrop.linear(x, w, b, keep, dropout_scale(P), BLOCK, BLOCK, kernel)
    return f


def _op_path_matmul(kernel):
    def f(a, v):
        keep = sample_block_keep(a, P, BLOCK, BLOCK, True)
        return torch.ops.sparsedrop.matmul(a, v, keep, dropout_scale(P), BLOCK, BLOCK, kernel)
    return f


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
@pytest.mark.parametrize("kernel", [TRITON, "reference"])
def test_eager_linear_equals_the_registered_op(kernel, autocast):
    shapes = ((3, 40, 48), (56, 48), (56,))  # ragged rows and cols, a batch dim, bias
    results = []
    for fn in (lambda x, w, b: sd.sparse_dropout_linear(x, w, b, p=P, block_size=BLOCK, kernel=kernel), _op_path_linear(kernel)):
        leaves = _leaves(*shapes)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results.append(_grads(fn, leaves))
    eager, op = results
    assert eager[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    for e, o in zip(eager, op):
        assert e.dtype == o.dtype
        torch.testing.assert_close(e, o, rtol=0, atol=0)  # the same kernels on the same flags


@pytest.mark.parametrize("kernel", [TRITON, "reference"])
def test_eager_matmul_equals_the_registered_op_with_broadcast_operands(kernel):
    shapes = ((2, 3, 40, 32), (3, 32, 24))  # b broadcast over a's leading batch dim
    results = []
    for fn in (lambda a, v: sd.sparse_dropout_matmul(a, v, p=P, block_size=BLOCK, kernel=kernel), _op_path_matmul(kernel)):
        leaves = _leaves(*shapes, seed=1)
        torch.manual_seed(4)
        results.append(_grads(fn, leaves))
    for e, o in zip(*results):
        torch.testing.assert_close(e, o, rtol=0, atol=0)


def test_eager_path_skips_grads_nobody_needs():
    x, w = _leaves((40, 48), (56, 48))
    w.requires_grad_(False)
    sd.sparse_dropout_linear(x, w, None, p=P, block_size=BLOCK).sum().backward()
    assert x.grad is not None and w.grad is None


def test_compiled_functional_forms_stay_the_registered_ops():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x, w = torch.randn(40, 48), torch.randn(56, 48)
    torch.compile(lambda x, w: sd.sparse_dropout_linear(x, w, None, p=P, block_size=BLOCK), backend=capture, fullgraph=True)(x, w)
    assert "sparsedrop.linear" in graphs[0] and "_EagerLinear" not in graphs[0], graphs[0]


@pytest.mark.interpret
def test_eager_path_launches_kernels_without_the_tracing_wrapper(monkeypatch):
    """Forward and backward (autograd's thread) launch straight through Triton: torch's
    wrap_triton costs a few hundred microseconds of Python per launch outside a trace."""
    from torch._library.triton import is_wrap_triton_enabled

    from sparsedrop_compile.kernels import block_sparse_matmul_triton as tri, kept_blocks

    seen = []

    def spy(kernel):
        seen.append((kernel.__name__ if hasattr(kernel, "__name__") else str(kernel), is_wrap_triton_enabled()))
        return real_launch(kernel)

    real_launch = tri.launch
    monkeypatch.setattr(tri, "launch", spy)
    monkeypatch.setattr(kept_blocks, "launch", spy)  # the kept-block lists' launches
    x, w = _leaves((40, 48), (56, 48))
    sd.sparse_dropout_linear(x, w, None, p=P, block_size=BLOCK, kernel="triton").sum().backward()
    assert len(seen) >= 3, seen  # forward dsd, backward sdd and dsd_tn at least
    assert not any(enabled for _, enabled in seen), seen
    assert is_wrap_triton_enabled()  # restored after the call


def test_functional_forms_under_a_dispatch_mode_stay_the_registered_ops():
    """Anything that records ops (make_fx, fake tensors, a user's TorchDispatchMode) sees the
    registered op, not the kernels launched from an autograd.Function it cannot trace."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(40, 48), torch.randn(56, 48)
    with Record() as rec:
        sd.sparse_dropout_linear(x, w, None, p=P, block_size=BLOCK)
        sd.sparse_dropout_matmul(x.reshape(1, 40, 48), w.t().contiguous(), p=P, block_size=BLOCK)
    assert "sparsedrop.linear.default" in rec.ops and "sparsedrop.matmul.default" in rec.ops, rec.ops

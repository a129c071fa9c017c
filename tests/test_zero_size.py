"""Zero-size operands behave as the dense ops do: outputs and gradients equal F.linear /
torch.matmul (zeros where the dense op gives zeros, the bias broadcast).

With any dimension zero the mask cannot change a result (there is no element of the activation
that reaches a non-empty output), so the dense op without dropout is the exact reference.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from sparsedrop_compile import sparse_dropout_linear, sparse_dropout_matmul

P = 0.3
BLOCK = (16, 16)  # the Triton kernels take multiples of 16
KERNELS = ["reference", "triton"]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under Triton's interpreter


def _on(kernel, tensors):
    device = TRITON_DEVICE if kernel == "triton" else "cpu"
    return [t.to(device) if t is not None else None for t in tensors]


def _linear_cases():
    """(x shape, N, bias) with at least one zero among rows, K and N."""
    cases = []
    for rows, k, n, bias in itertools.product((0, 5), (0, 20), (0, 3), (False, True)):
        if 0 in (rows, k, n):
            cases.append(((rows, k), n, bias))
    cases += [((0, 5, 20), 3, True), ((2, 0, 20), 3, False), ((2, 5, 0), 3, True), ((2, 5, 20), 0, True)]
    return cases


def _matmul_cases():
    """(a shape, b shape) with a zero batch, M, K or N; plus broadcast batches."""
    cases = []
    for batch, m, k, n in itertools.product((0, 2), (0, 5), (0, 20), (0, 3)):
        if 0 in (batch, m, k, n):
            cases.append(((batch, m, k), (batch, k, n)))
    cases += [
        ((0, 5, 20), (20, 3)),  # b shared by an empty batch
        ((2, 5, 0), (0, 3)),
        ((1, 5, 20), (0, 20, 3)),  # a broadcast to an empty batch
        ((2, 0, 5, 20), (2, 1, 20, 3)),
        ((2, 3, 5, 0), (2, 3, 0, 4)),
    ]
    return cases


def _ids(cases):
    return ["x".join(map(str, c[0])) + "-" + "-".join(map(str, c[1:])) for c in cases]


def _grads(fn, tensors, seed=0):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    torch.manual_seed(seed)
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device))
    return [out] + [t.grad if t is not None else None for t in leaves]


def _linear_inputs(shape, n, bias):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen), torch.randn(n, shape[-1], generator=gen), torch.randn(n, generator=gen) if bias else None]


def _matmul_inputs(a_shape, b_shape):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(a_shape, generator=gen), torch.randn(b_shape, generator=gen)]


def _assert_equal(ours, dense):
    for a, b in zip(ours, dense):
        if b is None:
            assert a is None
        else:
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape,n,bias", _linear_cases(), ids=_ids(_linear_cases()))
def test_sparse_dropout_linear_zero_size(shape, n, bias, kernel):
    inputs = _on(kernel, _linear_inputs(shape, n, bias))
    ours = _grads(lambda x, w, b: sparse_dropout_linear(x, w, b, p=P, block_size=BLOCK, kernel=kernel), inputs)
    _assert_equal(ours, _grads(F.linear, inputs))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("a_shape,b_shape", _matmul_cases(), ids=_ids(_matmul_cases()))
def test_sparse_dropout_matmul_zero_size(a_shape, b_shape, kernel):
    inputs = _on(kernel, _matmul_inputs(a_shape, b_shape))
    ours = _grads(lambda a, b: sparse_dropout_matmul(a, b, p=P, block_size=BLOCK, kernel=kernel), inputs)
    _assert_equal(ours, _grads(torch.matmul, inputs))


def _compiled(fn, kernel):
    return torch.compile(fn, backend="sparsedrop", options={"block_size": BLOCK, "inner": "aot_eager", "kernel": kernel}, fullgraph=True)


@pytest.mark.parametrize("kernel", KERNELS)
def test_compiled_linear_zero_size(kernel):
    """dropout -> linear through the backend, and the functional op compiled whole (its fake
    implementations and backward under AOTAutograd), for every zero-size case."""
    for shape, n, bias in _linear_cases():
        inputs = _on(kernel, _linear_inputs(shape, n, bias))
        dense = _grads(F.linear, inputs)
        torch._dynamo.reset()
        _assert_equal(_grads(_compiled(lambda x, w, b: F.linear(F.dropout(x, P, True), w, b), kernel), inputs), dense)
        functional = torch.compile(lambda x, w, b: sparse_dropout_linear(x, w, b, p=P, block_size=BLOCK, kernel=kernel), backend="aot_eager", fullgraph=True)
        _assert_equal(_grads(functional, inputs), dense)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("op", ["matmul", "bmm"])
def test_compiled_matmul_and_bmm_zero_size(op, kernel):
    target = torch.bmm if op == "bmm" else torch.matmul
    for a_shape, b_shape in _matmul_cases():
        if op == "bmm" and not (len(a_shape) == len(b_shape) == 3 and a_shape[0] == b_shape[0]):
            continue
        inputs = _on(kernel, _matmul_inputs(a_shape, b_shape))
        dense = _grads(target, inputs)
        torch._dynamo.reset()
        _assert_equal(_grads(_compiled(lambda a, b: target(F.dropout(a, P, True), b), kernel), inputs), dense)
        functional = torch.compile(lambda a, b: sparse_dropout_matmul(a, b, p=P, block_size=BLOCK, kernel=kernel), backend="aot_eager", fullgraph=True)
        _assert_equal(_grads(functional, inputs), dense)


@pytest.mark.parametrize("shape", [(0, 5, 20, 3), (2, 0, 20, 3), (2, 5, 0, 3), (2, 5, 20, 0), (0, 0, 0, 0)], ids=lambda s: "BMKN=" + "x".join(map(str, s)))
def test_triton_launchers_zero_size_match_the_reference(shape):
    """Each launcher called directly (under the interpreter on CPU): no empty grid is launched,
    and the result equals the plain-PyTorch reference, including shared (Bb = 1) operands."""
    from sparsedrop_compile.kernels import block_sparse_matmul as ref
    from sparsedrop_compile.kernels import block_sparse_matmul_triton as tri
    from sparsedrop_compile.kernels.block_mask import sample_block_keep

    B, M, K, N = shape
    gen = torch.Generator().manual_seed(2)
    a, grad = _on("triton", [torch.randn(B, M, K, generator=gen), torch.randn(B, M, N, generator=gen)])
    keep = sample_block_keep(a, P, *BLOCK, True)
    for bb in (1, B):
        b, bias = _on("triton", [torch.randn(bb, K, N, generator=gen), torch.randn(N, generator=gen)])
        _assert_equal([tri.dsd(a, b, keep, 2.0, BLOCK, bias)], [ref.reference_dsd(a, b, keep, 2.0, BLOCK, bias)])
        _assert_equal([tri.sdd(grad, b, keep, 2.0, BLOCK)], [ref.reference_sdd(grad, b, keep, 2.0, BLOCK)])
    for batched_out in (True, False):
        _assert_equal([tri.dsd_tn(a, grad, keep, 2.0, BLOCK, batched_out)], [ref.reference_dsd_tn(a, grad, keep, 2.0, BLOCK, batched_out)])


@pytest.mark.parametrize("shape", [(0, 20), (5, 0), (0, 0), (2, 0, 20), (0, 5, 20)], ids=lambda s: "x".join(map(str, s)))
def test_materialised_block_dropout_of_an_empty_activation(shape):
    """An empty activation with another user besides the matmul: the materialised block dropout
    (sample_block_keep / apply_block_keep, both layouts) is empty too, and the compiled graph
    gives the dense results."""
    from sparsedrop_compile.kernels.block_mask import apply_block_keep, sample_block_keep

    x = torch.randn(shape)
    for batched in (False, True):
        keep = sample_block_keep(x, P, *BLOCK, batched)
        assert apply_block_keep(x, keep, 1 / (1 - P), *BLOCK, batched).shape == x.shape
    w = torch.randn(3, shape[-1])

    def linear_and_residual(x, w):
        d = F.dropout(x, P, True)
        return F.linear(d, w), d * 2 + 1

    fn = _compiled(linear_and_residual, "reference")

    def both(x, w):
        y, z = fn(x, w)
        return y.sum() + z.sum() + y.new_zeros(())

    ours = _grads(both, [x, w])
    _assert_equal(ours, _grads(lambda x, w: F.linear(x, w).sum() + (x * 2 + 1).sum() + x.new_zeros(()), [x, w]))

"""The keep-mask kernels (kernels/block_mask_triton.py) against their references: materialised
block dropout against block_mask.apply_block_keep with the same flags (odd shapes, both layouts,
a padded keep, a non-contiguous input, three dtypes, and inf / NaN in dropped blocks, which must
come out as zeros), and the flags from uniform draws against u >= p. Without a GPU the kernels
run under Triton's interpreter on CPU tensors."""
import pytest
import torch

from sparsedrop_compile.kernels import block_mask_triton as tri
from sparsedrop_compile.kernels import runtime
from sparsedrop_compile.kernels.block_mask import apply_block_keep, block_layout, padded, sample_block_keep

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or runtime.interpreting()), reason="runs the Triton kernel")

CASES = [
    # (shape of x, block, batched)
    ((45, 37), (16, 8), False),
    ((3, 33, 70), (16, 32), False),  # rows over two leading dims, ragged last blocks
    ((2, 3, 40, 24), (16, 16), True),  # one mask per matrix
    ((1, 130, 260), (128, 128), True),  # more than one tile per block in both dims
]


def _tolerance(dtype):
    # bf16 under the interpreter: its fp32 -> bf16 conversion truncates (one ulp); on a GPU, and
    # for fp16 / fp32 everywhere, the kernel computes x * scale in fp32 and rounds once, as torch.
    if dtype == torch.bfloat16 and runtime.interpreting():
        return {"rtol": 2**-7, "atol": 0}
    return {"rtol": 0, "atol": 0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,block,batched", CASES)
def test_kernel_equals_apply_block_keep(shape, block, batched, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2).to(DEVICE, dtype)  # strided
    torch.manual_seed(len(shape))
    keep = sample_block_keep(x, 0.4, *block, batched)
    assert keep.any() and not keep.all()
    b, m, k = block_layout(x.shape, batched)
    # NaN and inf where blocks are dropped: never read, so zeros in the output
    dropped = ~apply_block_keep(torch.ones(x.shape, device=DEVICE), keep, 1.0, *block, batched).bool()
    x = x.masked_fill(dropped, float("nan"))
    padded_keep = torch.ones(padded(keep.shape), dtype=torch.bool, device=DEVICE)
    padded_keep[..., : keep.shape[-2], : keep.shape[-1]] = keep  # the extra blocks are kept: must not matter
    ref = apply_block_keep(x, keep, 1 / 0.6, *block, batched)
    for flags in (keep, padded_keep):
        out = tri.block_dropout(x.reshape(b, m, k), flags, 1 / 0.6, block).reshape(x.shape)
        assert out.is_contiguous() and out.dtype == dtype
        assert not out.isnan().any()
        torch.testing.assert_close(out, ref, **_tolerance(dtype))


@pytest.mark.parametrize("shape", [(1, 3, 5), (2, 33, 47), (4, 40, 41)])
def test_keep_from_uniform_kernel_equals_the_comparison(shape):
    u = torch.rand(shape, device=DEVICE)
    u.view(-1)[::7] = 0.3  # draws equal to p are kept, as u >= p says
    out = tri.keep_from_uniform(u, 0.3)
    assert out.dtype == torch.bool and out.shape == u.shape
    assert torch.equal(out, u >= 0.3)


def test_op_uses_the_kernel_only_where_it_runs():
    """sparsedrop::block_dropout: the kernel on CUDA for fp16/bf16/fp32, the reference otherwise
    (here fp64, and CPU tensors outside the interpreter's direct calls)."""
    x = torch.randn(40, 24, dtype=torch.float64, device=DEVICE)
    keep = sample_block_keep(x, 0.5, 16, 8, False)
    assert tri.unsupported_reason(x, (16, 8)) is not None
    out = torch.ops.sparsedrop.block_dropout(x, keep, 2.0, 16, 8, False)
    torch.testing.assert_close(out, apply_block_keep(x, keep, 2.0, 16, 8, False), rtol=0, atol=0)
    assert (tri.unsupported_reason(x.float(), (16, 8)) is None) == (DEVICE == "cuda")


@pytest.mark.gpu
def test_dynamic_shape_graph_launches_the_kernel():
    """Under dynamic shapes a dropout whose dropped tensor is also read (so it is materialised
    beside the sparse matmul) compiles to the Triton kernel, forward and backward, launched from
    Inductor's code: no call back into the op, nor into the reference; the flags likewise."""
    from torch._inductor.utils import run_and_get_code

    import sparsedrop_compile  # noqa: F401  (registers the backend)

    def f(x, w):
        d = torch.nn.functional.dropout(x, 0.3)
        return torch.nn.functional.linear(d, w).float().sum() + d.float().pow(2).sum()

    w = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(f, backend="sparsedrop", dynamic=True, options={"block_size": 16})
    x = torch.randn(48, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _, codes = run_and_get_code(lambda: compiled(x, w).backward())
    assert len(codes) == 2  # forward and backward
    assert "_keep_from_uniform_kernel" in codes[0] and "torch.ops.sparsedrop.keep_from_uniform" not in codes[0]
    for code in codes:
        assert "_block_dropout_kernel" in code, "the kernel is not launched from Inductor's code"
        assert "torch.ops.sparsedrop.block_dropout" not in code and "reference_block_dropout" not in code
    assert torch.isfinite(x.grad).all()
    # Recompiles over sizes: test_dynamic_shapes' linear_rows_read_too case, against aot_eager.

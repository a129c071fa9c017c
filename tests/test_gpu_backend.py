"""The backend end to end on a CUDA GPU: Triton kernels, Inductor, CUDA graphs (skipped on CI)."""
import math

import pytest
import torch
import torch.nn.functional as F

from sparsedrop_compile.harness import train_step
from sparsedrop_compile.kernels.block_mask import apply_block_keep
from sparsedrop_compile.models import build_model, example_batch

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["as_is", "large", "large_portable"])
def size_class(request, monkeypatch):
    """The test sizes are launch-bound (fused, list-free kernels outside CUDA graphs); "large"
    counts them GPU-bound (kept-block lists; on Hopper the Gluon kernels through opaque ops),
    "large_portable" also with the Hopper path off (the portable kernels traced into the graph)."""
    from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper, runtime

    if request.param != "as_is":
        monkeypatch.setattr(runtime, "LAUNCH_BOUND_WORK", 0)
        monkeypatch.setattr(hopper, "OPAQUE_MIN_WORK", 0)
    if request.param == "large_portable":
        monkeypatch.setenv("SPARSEDROP_HOPPER", "0")
    return request.param


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_site_under_inductor_and_cuda_graphs(mode, dtype, size_class):
    """Whatever RNG Inductor uses, the output equals block dropout with the mask the backward
    reveals: with dy = 1 and W > 0, dx is positive exactly in the kept blocks."""
    torch.manual_seed(0)
    rows, k, n, block = 1000, 1100, 300, (128, 128)
    x = torch.randn(rows, k, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.rand(n, k, device="cuda", dtype=dtype) + 0.1) / k**0.5
    f = torch.compile(lambda x: F.linear(F.dropout(x, 0.3, True), w), backend="sparsedrop", options={"block_size": block, "mode": mode})
    for _ in range(3):  # warm-up and cudagraph recording steps
        x.grad = None
        y = f(x)
        y.backward(torch.ones_like(y))
    keep = (x.grad.float() > 0).reshape(1, rows, k)[:, ::128, ::128]
    assert 0 < keep.float().mean() < 1
    ref = F.linear(apply_block_keep(x.detach().float(), keep, 1 / 0.7, *block, False), w.float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rows", [1000, 4100])
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_side_site_under_inductor_and_cuda_graphs(mode, dtype, size_class, rows):
    """dropout(linear(x, W, b)) with x, W, b > 0: y > 0 everywhere, so the output is zero exactly
    in dropped blocks. Output and every gradient equal plain block dropout with that mask. With
    4100 rows the weight gradient's 27 output tiles split their reduction over the rows
    (block_sparse_matmul_configs.reduction_split) on the portable kernels."""
    torch.manual_seed(0)
    k, n, block = 1100, 300, (128, 128)
    x = (torch.rand(rows, k, device="cuda", dtype=dtype) + 0.1).requires_grad_()
    w = ((torch.rand(n, k, device="cuda", dtype=dtype) + 0.1) / k**0.5).requires_grad_()
    b = (torch.rand(n, device="cuda", dtype=dtype) + 0.1).requires_grad_()
    f = torch.compile(lambda x, w, b: F.dropout(F.linear(x, w, b), 0.3, True), backend="sparsedrop",
                      options={"block_size": block, "mode": mode})
    for _ in range(3):  # warm-up and cudagraph recording steps
        for t in (x, w, b):
            t.grad = None
        y = f(x, w, b)
        # built in fp32: an fp16 linspace of 300k points counts past fp16's range and holds inf
        dy = torch.linspace(-1, 1, y.numel(), device="cuda").to(dtype).reshape(y.shape)
        y.backward(dy)
    assert torch._dynamo.utils.counters["sparsedrop"]["linear_out_fused"] >= 1
    keep = (y.detach() != 0).reshape(1, rows, n)[:, ::128, ::128]
    assert 0 < keep.float().mean() < 1
    leaves = [t.detach().float().requires_grad_() for t in (x, w, b)]
    ref = apply_block_keep(F.linear(*leaves), keep, 1 / 0.7, *block, False)
    ref.backward(dy.float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    for t, r in zip((x, w, b), leaves):
        scale = r.grad.abs().max().item()
        torch.testing.assert_close(t.grad.float(), r.grad, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("family", ["t5", "bert", "gpt2"])
def test_hf_models_train_on_gpu_with_triton_kernels(family):
    torch.manual_seed(0)
    model = build_model(family, size="demo").cuda().train()
    batch = example_batch(model, batch=8, seq=256, device="cuda")
    compiled = torch.compile(model, backend="sparsedrop", options={"block_size": 64})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = [train_step(lambda: compiled(**batch).loss, opt, autocast="cuda").item() for _ in range(6)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    fused = torch._dynamo.utils.counters["sparsedrop"]
    assert fused["attention_fused"] > 0 or fused["matmul_fused"] > 0, dict(fused)


@pytest.mark.parametrize("family", ["linear", "matmul", "attention", "linear_out", "linear_both_sides"])
def test_inductor_launches_the_kernels_itself(family):
    """The rewritten sites' ops are traced into (triton_op): Inductor's generated code launches
    our Triton kernels directly, forward and backward, and never calls back into the op."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    dt = torch.bfloat16
    if family == "linear":
        x = torch.randn(1024, 256, device="cuda", dtype=dt, requires_grad=True)  # 16 blocks: max_drop_all holds
        w = torch.randn(192, 256, device="cuda", dtype=dt, requires_grad=True)
        f = lambda: F.linear(F.dropout(x, 0.2, True), w)  # noqa: E731
        kernels, ops = ("_dsd_kernel", "_sdd_kernel", "_dsd_tn_kernel"), ("sparsedrop.linear",)
    elif family == "matmul":
        x = torch.randn(4, 2, 256, 256, device="cuda", dtype=dt, requires_grad=True)
        w = torch.randn(4, 2, 256, 64, device="cuda", dtype=dt, requires_grad=True)
        f = lambda: torch.matmul(F.dropout(x, 0.2, True), w)  # noqa: E731
        kernels, ops = ("_dsd_kernel", "_sdd_kernel", "_dsd_tn_kernel"), ("sparsedrop.matmul",)
    elif family.startswith("linear_"):
        x = torch.randn(1024, 256, device="cuda", dtype=dt, requires_grad=True)  # 16 blocks on each side: max_drop_all holds
        w = torch.randn(192, 256, device="cuda", dtype=dt, requires_grad=True)
        drop_in = (lambda t: F.dropout(t, 0.2, True)) if family == "linear_both_sides" else (lambda t: t)
        f = lambda: F.dropout(F.linear(drop_in(x), w), 0.2, True)  # noqa: E731
        kernels, ops = ("_sdd_kernel", "_dsd_kernel", "_dsd_tn_kernel"), ("sparsedrop.linear_out", "sparsedrop.linear")
    else:
        x = torch.randn(2, 4, 256, 64, device="cuda", dtype=dt, requires_grad=True)
        w = torch.randn(2, 4, 256, 64, device="cuda", dtype=dt, requires_grad=True)
        f = lambda: F.scaled_dot_product_attention(x, w, w, dropout_p=0.2)  # noqa: E731
        kernels, ops = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"), ("sparsedrop.attention",)
    compiled = torch.compile(f, backend="sparsedrop")
    _, codes = run_and_get_code(lambda: compiled().float().sum().backward())
    code = "\n".join(codes)
    for name in kernels:
        assert name in code, f"{name} is not launched from Inductor's code"
    for op in ops:
        assert f"torch.ops.{op}" not in code, f"Inductor's code calls back into {op}"

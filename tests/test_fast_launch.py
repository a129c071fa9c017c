"""kernels/_launch.py: repeat launches that skip JITFunction.run must run the kernel Triton would.

The key must separate every pair of calls that Triton would compile differently: the GPU tests
alternate aligned and misaligned operands, and sizes with different divisibility, between calls
of the same launcher, and compare every result with the reference and with Triton's own path.
"""
from __future__ import annotations

import pytest
import torch

from sparsedrop_compile import ops  # noqa: F401  (registers torch.ops.sparsedrop)
from sparsedrop_compile.kernels import _launch
from sparsedrop_compile.kernels import block_sparse_matmul as ref
from sparsedrop_compile.kernels.block_mask import cdiv


def test_key_separates_what_triton_specialises_on():
    base = torch.zeros(64)
    aligned, misaligned = base[:32], base[1:33]
    k = _launch._arg_key
    assert k((aligned,)) != k((misaligned,))  # 16-byte alignment of a pointer
    assert k((aligned,)) == k((base[4:36],))  # 16 bytes further: still aligned, same kernel
    assert k((aligned,)) != k((aligned.half(),))  # dtype
    assert k((1,)) != k((17,)) and k((16,)) != k((17,)) and k((32,)) == k((48,))  # == 1, % 16
    assert k((2**31 - 16,)) != k((2**31,)) != k((2**63,))  # i32, i64, u64
    assert k((True,)) != k((1,)) and k((True,)) != k((False,))
    assert k((1.0,)) != k((1,)) and k((None,)) != k((0,))
    assert k((object(),)) is None  # unknown kinds take Triton's path


def test_empty_hook_chain_counts_as_no_hook():
    class HookChain:  # Triton 3.6's default launch hooks: an empty chain, never None
        def __init__(self, calls):
            self.calls = calls

    assert _launch._no_hook(None) and _launch._no_hook(HookChain([]))
    assert not _launch._no_hook(HookChain([print])) and not _launch._no_hook(print)


def test_interpreter_takes_tritons_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _launch.fast_launch_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("SPARSEDROP_FAST_LAUNCH", "0")
    assert not _launch.fast_launch_enabled()


gpu = pytest.mark.gpu


def _offset(t: torch.Tensor, elems: int) -> torch.Tensor:
    """A copy of t whose data starts ``elems`` elements into a fresh buffer (misaligned for odd elems)."""
    buf = torch.empty(t.numel() + elems, device=t.device, dtype=t.dtype)
    out = buf[elems:].view(t.shape)
    out.copy_(t)
    return out


@gpu
def test_gpu_repeat_launches_match_reference_across_specialisations(monkeypatch):
    from sparsedrop_compile.kernels import block_sparse_matmul_triton as tri

    block = (128, 128)
    gen = torch.Generator(device="cuda").manual_seed(0)
    fast_dsd = _launch.fast(tri._dsd_kernel)
    before = fast_dsd.fast_launches
    results = []
    # Same launcher, alternating: aligned, misaligned (1 element), M not a multiple of 16,
    # aligned again. Each is checked against the fp32 reference.
    for M, shift in [(512, 0), (512, 1), (500, 0), (512, 0), (512, 1), (500, 0)]:
        a = torch.randn(1, M, 384, device="cuda", generator=gen, dtype=torch.bfloat16)
        b = torch.randn(1, 384, 200, device="cuda", generator=gen, dtype=torch.bfloat16)
        keep = torch.rand(1, cdiv(M, 128), 3, device="cuda", generator=gen) >= 0.3
        a_in = _offset(a, shift) if shift else a
        got = tri.dsd(a_in, b, keep, 1.5, block)
        expected = ref.reference_dsd(a.float(), b.float(), keep, 1.5, block)
        torch.testing.assert_close(got.float(), expected, atol=2e-2 * expected.abs().max().item(), rtol=1e-2)
        results.append((a_in, b, keep, got))
    assert fast_dsd.fast_launches > before, f"the repeat calls never took the direct path: {fast_dsd.fallback}"
    # Triton's own path gives the same bits for every call.
    monkeypatch.setenv("SPARSEDROP_FAST_LAUNCH", "0")
    for a_in, b, keep, got in results:
        assert torch.equal(tri.dsd(a_in, b, keep, 1.5, block), got)


@gpu
def test_gpu_linear_and_attention_ops_equal_tritons_path(monkeypatch):
    """Whole ops, forward and backward, with the direct path on and off: identical bits."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4, 300, 256, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(192, 256, device="cuda", generator=gen, dtype=torch.bfloat16)
    keep = torch.rand(1, cdiv(1200, 128), 2, device="cuda", generator=gen) >= 0.3
    b, h, s, d = 2, 3, 200, 64
    qkv = [torch.randn(b, s, h * d, device="cuda", generator=gen, dtype=torch.bfloat16).view(b, s, h, d).transpose(1, 2)
           for _ in range(3)]
    mask = torch.randn(1, h, s, s, device="cuda", generator=gen, dtype=torch.bfloat16)
    akeep = torch.rand(b, h, cdiv(s, 64), cdiv(s, 128), device="cuda", generator=gen) >= 0.3
    grad_attn = torch.randn(b, h, s, d, device="cuda", generator=gen, dtype=torch.bfloat16)

    def run():
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = torch.ops.sparsedrop.linear(xs, ws, None, keep, 1.4, 128, 128, "triton")
        y.backward(torch.ones_like(y))
        leaves = [t.detach().clone().requires_grad_() for t in (*qkv, mask)]
        o = torch.ops.sparsedrop.attention(*leaves, akeep, 0.3, False, None, False, 64, 128, "post_softmax", "triton")
        o.backward(grad_attn)
        return [y, xs.grad, ws.grad, o] + [t.grad for t in leaves]

    first = run()
    repeat = run()  # every launch now has a cached specialisation: the direct path
    monkeypatch.setenv("SPARSEDROP_FAST_LAUNCH", "0")
    jit = run()
    names = ["y", "dx", "dw", "attn", "dq", "dk", "dv", "dmask"]
    for name, a, c in zip(names, repeat, jit):
        assert torch.equal(a, c), name
    # The attention kernels are deterministic and configured without timing (the matmuls' first
    # call may tune), so the first call, made through Triton's path, has the same bits too.
    for name, a, c in list(zip(names, first, repeat))[3:]:
        assert torch.equal(a, c), name

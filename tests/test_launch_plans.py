"""Launch plans (kernels/launch_plans.py): the eager functional forms record a launcher's launches
on the second call of a key and replay them after. A replay must compute exactly what the
launcher computes, with each call's own tensors; a launcher call that hands a kernel anything but
its own arguments or its own fresh buffers is never planned."""
import pytest
import torch
import triton
import triton.language as tl

import sparsedrop_compile as sd
from sparsedrop_compile.kernels import launch_plans, runtime
from test_eager_path import BLOCK, P, _op_path_linear as _linear_op, _op_path_matmul as _matmul_op  # the same op paths


@pytest.fixture(autouse=True)
def _fresh_plans():
    launch_plans.clear()
    yield
    launch_plans.clear()


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _leaves(shapes, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=gen) / 4).to(_device(), dtype).requires_grad_() for s in shapes]


def _run(fn, leaves, seed):
    torch.manual_seed(seed)
    out = fn(*leaves)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    grads = torch.autograd.grad((out.float() * weights).sum(), leaves)
    return [out, *grads]


CASES = {
    # ragged rows and columns, a batch dim, bias
    "linear_bias": (((3, 40, 48), (56, 48), (56,)),
                    lambda x, w, b: sd.sparse_dropout_linear(x, w, b, p=P, block_size=BLOCK, kernel="triton"),
                    _linear_op),
    "linear": (((70, 33), (20, 33)),
               lambda x, w: sd.sparse_dropout_linear(x, w, None, p=P, block_size=BLOCK, kernel="triton"),
               _linear_op),
    # b broadcast over a's leading batch dim
    "matmul": (((2, 3, 40, 32), (3, 32, 24)),
               lambda a, v: sd.sparse_dropout_matmul(a, v, p=P, block_size=BLOCK, kernel="triton"),
               _matmul_op),
}


@pytest.mark.parametrize("case", list(CASES))
def test_replayed_calls_equal_the_registered_op_on_fresh_inputs(case):
    """Four eager calls with the same shapes and new values each time (call 2 records, 3 and 4
    replay), each against the registered op with the Triton kernels (no plans there: it is not
    the eager path) and against the reference, on the same flags."""
    shapes, eager, op = CASES[case]
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    for call in range(4):
        before = dict(launch_plans.stats)
        got = _run(eager, _leaves(shapes, seed=call, dtype=dtype), seed=100 + call)
        after = dict(launch_plans.stats)
        same = _run(op("triton"), _leaves(shapes, seed=call, dtype=dtype), seed=100 + call)
        ref = _run(op("reference"), _leaves(shapes, seed=call, dtype=dtype), seed=100 + call)
        for g, s, r in zip(got, same, ref):
            torch.testing.assert_close(g, s, rtol=0, atol=0)  # the same kernels on the same flags
            torch.testing.assert_close(g.float(), r.float(), **({"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}))
        if call >= 2:
            assert after["replayed"] > before["replayed"], f"call {call} did not replay: {before} -> {after}"
    assert launch_plans.stats["refused"] == 0


def test_a_new_shape_or_layout_gets_its_own_plan():
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    fn = CASES["linear"][1]
    for shapes, transposed in ((((70, 33), (20, 33)), False), (((70, 33), (20, 33)), True), (((50, 33), (20, 33)), False)):
        for call in range(3):
            x, w = _leaves(shapes, seed=call, dtype=dtype)
            if transposed:  # the same sizes with other strides: another key
                x = x.detach().t().contiguous().t().requires_grad_()
            got = _run(fn, [x, w], seed=call)
            ref = _run(_linear_op("triton"), [x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()], seed=call)
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, rtol=0, atol=0)
    # Each launcher (dsd forward, sdd and dsd_tn backward) records once per key: three keys for
    # dsd and dsd_tn, which read x; two for sdd, whose operands (grad, weight) the strides of x
    # do not change.
    assert launch_plans.stats["recorded"] == 3 + 2 + 3


@triton.jit
def _scaled_copy_kernel(src, dst, n, factor, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=mask) * factor, mask=mask)


@launch_plans.planned(runtime.launch_settings)
def _copy_launcher(x, factor):
    out = launch_plans.empty(x.shape, x.dtype, x.device)
    runtime.launch(_scaled_copy_kernel)[(triton.cdiv(x.numel(), 64),)](x, out, x.numel(), factor, BLOCK_SIZE=64)
    return out


@launch_plans.planned(runtime.launch_settings)
def _computing_launcher(x):
    doubled = x * 2  # a tensor made by a torch op: a replay could not reproduce its values
    out = launch_plans.empty(x.shape, x.dtype, x.device)
    runtime.launch(_scaled_copy_kernel)[(triton.cdiv(x.numel(), 64),)](doubled, out, x.numel(), 1.0, BLOCK_SIZE=64)
    return out


def test_a_launcher_replays_with_each_calls_tensors():
    with runtime.direct_launches():
        for call in range(4):
            x = torch.randn(100, device=_device())
            torch.testing.assert_close(_copy_launcher(x, 3.0), x * 3, rtol=0, atol=0)
    assert launch_plans.stats == {"recorded": 1, "replayed": 2, "refused": 0}


def test_a_launcher_that_hands_a_kernel_a_computed_tensor_is_never_planned():
    with runtime.direct_launches():
        for call in range(4):
            x = torch.randn(100, device=_device())
            torch.testing.assert_close(_computing_launcher(x), x * 2, rtol=0, atol=0)
    assert launch_plans.stats == {"recorded": 0, "replayed": 0, "refused": 1}


@launch_plans.planned(runtime.launch_settings)
def _add_launcher(x, y):
    out = launch_plans.empty(x.shape, x.dtype, x.device)
    runtime.launch(_add_kernel)[(triton.cdiv(x.numel(), 64),)](x, y, out, x.numel(), BLOCK_SIZE=64)
    return out


@triton.jit
def _add_kernel(x, y, out, n, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    tl.store(out + offs, tl.load(x + offs, mask=mask) + tl.load(y + offs, mask=mask), mask=mask)


def test_one_tensor_in_two_roles_is_never_replayed_for_two():
    """A call that passes one tensor as both operands must not record a plan that a later call
    with two different tensors (same key otherwise) would replay with one of them twice."""
    with runtime.direct_launches():
        for call in range(3):
            x = torch.randn(100, device=_device())
            torch.testing.assert_close(_add_launcher(x, x), x + x, rtol=0, atol=0)
        x, y = torch.randn(100, device=_device()), torch.randn(100, device=_device())
        torch.testing.assert_close(_add_launcher(x, y), x + y, rtol=0, atol=0)
    assert launch_plans.stats == {"recorded": 0, "replayed": 0, "refused": 0}


def test_no_plans_outside_the_eager_path_or_when_switched_off(monkeypatch):
    for call in range(3):  # a launcher called directly: not inside direct_launches
        _copy_launcher(torch.randn(100, device=_device()), 2.0)
    assert launch_plans.stats == {"recorded": 0, "replayed": 0, "refused": 0}
    monkeypatch.setattr(launch_plans, "ENABLED", False)
    with runtime.direct_launches():
        for call in range(3):
            x = torch.randn(100, device=_device())
            torch.testing.assert_close(_copy_launcher(x, 2.0), x * 2, rtol=0, atol=0)
    assert launch_plans.stats == {"recorded": 0, "replayed": 0, "refused": 0}


def test_a_changed_setting_is_a_new_key(monkeypatch):
    with runtime.direct_launches():
        for call in range(3):
            _copy_launcher(torch.randn(100, device=_device()), 2.0)
        monkeypatch.setattr(runtime, "LAUNCH_BOUND_WORK", 1)
        for call in range(3):
            x = torch.randn(100, device=_device())
            torch.testing.assert_close(_copy_launcher(x, 2.0), x * 2, rtol=0, atol=0)
    assert launch_plans.stats == {"recorded": 2, "replayed": 2, "refused": 0}


@pytest.mark.gpu
def test_gpu_replays_call_the_compiled_kernels():
    """On a GPU a replay calls each compiled kernel's own launcher (not Triton's Python path), for
    every launch of sparse_dropout_linear at a size that builds kept-block lists."""
    x = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(768, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outs = []
    for call in range(3):
        torch.manual_seed(7)
        y = sd.sparse_dropout_linear(x, w, None, p=0.5, block_size=128)
        outs.append([y, *torch.autograd.grad(y.float().sum(), (x, w))])
    assert launch_plans.stats["replayed"] == 3
    plans = [p for p in launch_plans._plans.values() if p is not None]
    assert plans and all(r.compiled is not None for p in plans for r in p.launches)
    for got in outs[1:]:
        for g, r in zip(got, outs[0]):
            torch.testing.assert_close(g, r, rtol=0, atol=0)

"""Launch plans (kernels/launch_plans.py): the eager functional forms record a launcher's launches
on the second call of a key and replay them after. A replay must compute exactly what the
launcher computes, with each call's own tensors; a launcher call that hands a kernel anything but
its own arguments or its own fresh buffers is never planned."""
import gc
import weakref

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
    # (leaf shapes, eager call, op path, whether the op bodies themselves are planned)
    # ragged rows and columns, a batch dim, bias
    "linear_bias": (((3, 40, 48), (56, 48), (56,)),
                    lambda x, w, b: sd.sparse_dropout_linear(x, w, b, p=P, block_size=BLOCK, kernel="triton"),
                    _linear_op, True),
    "linear": (((70, 33), (20, 33)),
               lambda x, w: sd.sparse_dropout_linear(x, w, None, p=P, block_size=BLOCK, kernel="triton"),
               _linear_op, True),
    "matmul": (((3, 40, 32), (3, 32, 24)),
               lambda a, v: sd.sparse_dropout_matmul(a, v, p=P, block_size=BLOCK, kernel="triton"),
               _matmul_op, True),
    # b broadcast over a's leading batch dim: each op body copies b (expand + reshape) and the
    # weight gradient is summed over the broadcast, so the bodies are not planned; the
    # launchers inside them are, from their own second call (the body's fourth).
    "matmul_broadcast_b": (((2, 3, 40, 32), (3, 32, 24)),
                           lambda a, v: sd.sparse_dropout_matmul(a, v, p=P, block_size=BLOCK, kernel="triton"),
                           _matmul_op, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_replayed_calls_equal_the_registered_op_on_fresh_inputs(case):
    """Five eager calls with the same shapes and new values each time (call 2 records, 3 on
    replay: the op bodies, or where a body cannot be planned the launchers inside it, one call
    later), each against the registered op with the Triton kernels (no plans there: it is not
    the eager path) and against the reference, on the same flags."""
    shapes, eager, op, body_planned = CASES[case]
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    for call in range(5):
        before = dict(launch_plans.stats)
        got = _run(eager, _leaves(shapes, seed=call, dtype=dtype), seed=100 + call)
        after = dict(launch_plans.stats)
        same = _run(op("triton"), _leaves(shapes, seed=call, dtype=dtype), seed=100 + call)
        ref = _run(op("reference"), _leaves(shapes, seed=call, dtype=dtype), seed=100 + call)
        for g, s, r in zip(got, same, ref):
            torch.testing.assert_close(g, s, rtol=0, atol=0)  # the same kernels on the same flags
            torch.testing.assert_close(g.float(), r.float(), **({"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}))
        if call >= (2 if body_planned else 3):
            assert after["replayed"] > before["replayed"], f"call {call} did not replay: {before} -> {after}"
    # the bodies: forward and the two gradients
    assert launch_plans.stats["refused"] == (0 if body_planned else 3)


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
    # Each op body (the forward, dx and dW) records once per key: three keys for the forward and
    # dW, which read x; two for dx, whose operands (grad, weight) the strides of x do not change.
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


@launch_plans.planned(runtime.launch_settings)
def _descriptor_launcher(x):
    """2 * x, read through a TMA descriptor built on the host (as the attention kernels' tile
    loops read their streamed operands on Hopper)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    out = launch_plans.empty(x.shape, x.dtype, x.device)
    desc = TensorDescriptor(x, [x.numel()], [1], [64])
    runtime.launch(_descriptor_double_kernel)[(triton.cdiv(x.numel(), 64),)](desc, out, x.numel(), BLOCK_SIZE=64)
    return out


@triton.jit
def _descriptor_double_kernel(x_desc, out, n, BLOCK_SIZE: tl.constexpr):
    start = tl.program_id(0) * BLOCK_SIZE
    offs = start + tl.arange(0, BLOCK_SIZE)
    tl.store(out + offs, x_desc.load([start]) * 2, mask=offs < n)


def test_a_launch_given_a_tensor_descriptor_is_replayed_on_the_new_calls_tensor():
    """A descriptor holds the tensor it was built on: replayed as recorded, it would make later
    calls read the recording call's memory. Each call has its own x (the earlier ones still
    alive, so no address is reused): the replays must read theirs."""
    xs = []
    with runtime.direct_launches():
        for call in range(4):
            xs.append(torch.randn(100, device=_device()))
            torch.testing.assert_close(_descriptor_launcher(xs[-1]), xs[-1] * 2, rtol=0, atol=0)
    assert launch_plans.stats == {"recorded": 1, "replayed": 2, "refused": 0}
    # the plan keeps none of the recording call's tensors alive
    recorded = weakref.ref(xs[1])
    del xs[1]
    gc.collect()
    assert recorded() is None


@launch_plans.planned(runtime.launch_settings)
def _holding_launcher(x):
    """2 * x, the kernel handed x inside an argument that is neither a tensor nor a descriptor."""
    out = launch_plans.empty(x.shape, x.dtype, x.device)
    runtime.launch(_add_kernel)[(triton.cdiv(x.numel(), 64),)](x, x, out, _Holder(x), BLOCK_SIZE=64)
    return out


class _Holder(int):
    """An int (the kernel's element count) that also carries a tensor."""

    def __new__(cls, t):
        holder = super().__new__(cls, t.numel())
        holder.t = t
        return holder


def test_a_launch_given_another_argument_holding_a_tensor_is_never_planned():
    with runtime.direct_launches():
        for call in range(4):
            x = torch.randn(100, device=_device())
            torch.testing.assert_close(_holding_launcher(x), x * 2, rtol=0, atol=0)
    assert launch_plans.stats == {"recorded": 0, "replayed": 0, "refused": 1}


@launch_plans.planned(runtime.launch_settings)
def _filling_launcher(x):
    out = launch_plans.empty(x.shape, x.dtype, x.device)
    out.fill_(1.0)  # a torch op writing into a buffer: a replay, which only allocates, would skip it
    runtime.launch(_add_kernel)[(triton.cdiv(x.numel(), 64),)](x, out, out, x.numel(), BLOCK_SIZE=64)
    return out


def test_a_call_that_runs_a_torch_op_on_its_buffers_is_never_planned():
    with runtime.direct_launches():
        for call in range(4):
            x = torch.randn(100, device=_device())
            torch.testing.assert_close(_filling_launcher(x), x + 1, rtol=0, atol=0)
    assert launch_plans.stats == {"recorded": 0, "replayed": 0, "refused": 1}


@launch_plans.planned(runtime.launch_settings)
def _view_launcher(x, factor):
    """factor * x[1:, 2:] (x 2-D), launched on a view of x with a storage offset, and returned
    as a view of the buffer the kernel wrote."""
    part = x[1:, 2:]
    rows, cols = part.shape
    out = launch_plans.empty(rows * cols, x.dtype, x.device)
    for i in range(rows):  # one launch per row of part: views of x and of the buffer at growing offsets
        runtime.launch(_scaled_copy_kernel)[(triton.cdiv(cols, 64),)](
            part[i], out[i * cols:(i + 1) * cols], cols, factor, BLOCK_SIZE=64)
    return out.view(rows, cols)


def test_views_of_the_arguments_and_buffers_are_replayed_at_each_calls_offsets():
    """A plan records the views a call took (of its tensor arguments and of its buffers) relative
    to their bases: a replay takes them of the new call's tensors, whose own storage offsets may
    differ (here x is a slice of a larger tensor, at a new 16-byte aligned offset each call)."""
    with runtime.direct_launches():
        for call in range(4):
            big = torch.randn(200 + 4 * call, device=_device())
            x = big[4 * call: 4 * call + 120].view(10, 12)
            got = _view_launcher(x, 1.5)
            torch.testing.assert_close(got, 1.5 * x[1:, 2:], rtol=0, atol=0)
    assert launch_plans.stats == {"recorded": 1, "replayed": 2, "refused": 0}


@launch_plans.planned(runtime.launch_settings)
def _flat_launcher(x, factor):
    """factor * x (contiguous), launched on flat views of x and of a buffer at their own
    addresses, and returned as a view of the buffer in x's shape."""
    out = launch_plans.empty(x.numel(), x.dtype, x.device)
    runtime.launch(_scaled_copy_kernel)[(triton.cdiv(x.numel(), 64),)](x.view(-1), out[:], x.numel(), factor,
                                                                       BLOCK_SIZE=64)
    return out.view(x.shape)


def test_a_view_at_its_bases_address_is_replayed_as_its_base():
    """A kernel reads a tensor argument's address (and dtype and alignment), not its sizes: a
    replay hands it the base of a view at the base's own address and takes no view for it. The
    result, a view at its base's address too, is still taken: the call returns its shape."""
    with runtime.direct_launches():
        for call in range(4):
            x = torch.randn(10, 12, device=_device())
            got = _flat_launcher(x, 1.5)
            torch.testing.assert_close(got, 1.5 * x, rtol=0, atol=0)
            assert got.shape == (10, 12)
    assert launch_plans.stats == {"recorded": 1, "replayed": 2, "refused": 0}
    (plan,) = [p for p in launch_plans._plans.values() if p is not None]
    assert plan.views == [(1, (10, 12), (12, 1), 0)]  # the result's, of the buffer (slot 1, after x)
    assert sorted(s for _, s in plan.launches[0].slots) == [0, 1]  # x and the buffer themselves


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
    """Settings are read once per direct_launches block (one op body: nothing changes them
    inside), so each call below is a block of its own, as each eager op call is."""
    for call in range(3):
        with runtime.direct_launches():
            _copy_launcher(torch.randn(100, device=_device()), 2.0)
    monkeypatch.setattr(runtime, "LAUNCH_BOUND_WORK", 1)
    for call in range(3):
        x = torch.randn(100, device=_device())
        with runtime.direct_launches():
            torch.testing.assert_close(_copy_launcher(x, 2.0), x * 2, rtol=0, atol=0)
    assert launch_plans.stats == {"recorded": 2, "replayed": 2, "refused": 0}


@pytest.mark.gpu
def test_gpu_replays_call_the_compiled_kernels(monkeypatch):
    """On a GPU a replay calls each compiled kernel's own launcher (not Triton's Python path), for
    every launch of sparse_dropout_linear, at a launch-bound size and at one that builds
    kept-block lists: the replayed call runs with Triton's Python launch path made to fail, and
    its results equal the first (unplanned) call's on the same seed, bit for bit."""
    from triton.runtime.jit import JITFunction

    assert not launch_plans.launch_hooks_set()
    for rows, n, k in ((1024, 768, 512), (4096, 2048, 2048)):
        launch_plans.clear()
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        outs = []
        for call in range(3):
            if call == 2:
                monkeypatch.setattr(JITFunction, "run", lambda *a, **kw: pytest.fail("a replay launched through Triton"))
            torch.manual_seed(7)
            y = sd.sparse_dropout_linear(x, w, None, p=0.5, block_size=128)
            outs.append([y, *torch.autograd.grad(y.float().sum(), (x, w))])
        monkeypatch.undo()
        assert launch_plans.stats["replayed"] == 3
        plans = [p for p in launch_plans._plans.values() if p is not None]
        assert plans and all(r.compiled is not None for p in plans for r in p.launches)
        for got in outs[1:]:
            for g, r in zip(got, outs[0]):
                torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_launch_hooks_are_seen_in_either_form(monkeypatch):
    """Triton's launch hooks were None when unset up to 3.4 and are always-present chains since:
    a replay must take Triton's path exactly when one is set, in both forms."""
    class Chain:
        def __init__(self, calls):
            self.calls = calls

    class Knobs:
        launch_enter_hook = None
        launch_exit_hook = None

    monkeypatch.setattr(launch_plans, "_HOOKS", Knobs)
    assert not launch_plans.launch_hooks_set()
    monkeypatch.setattr(Knobs, "launch_exit_hook", lambda *a: None)
    assert launch_plans.launch_hooks_set()
    monkeypatch.setattr(Knobs, "launch_exit_hook", Chain([]))
    monkeypatch.setattr(Knobs, "launch_enter_hook", Chain([]))
    assert not launch_plans.launch_hooks_set()
    monkeypatch.setattr(Knobs, "launch_enter_hook", Chain([lambda *a: None]))
    assert launch_plans.launch_hooks_set()
    monkeypatch.setattr(launch_plans, "_HOOKS", None)
    assert launch_plans.launch_hooks_set()

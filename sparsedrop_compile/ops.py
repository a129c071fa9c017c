"""The registered ``sparsedrop::`` ops: block dropout fused into linear and matmul.

Each forward op takes the activation *before* dropout plus the block keep-flags and the scale
1/(1-p) (times any constant the graph multiplied by), so backward saves only the activation and
the small flags: never a full-size mask or a dropped copy. The backward formulas are ops of
their own, so compilers see them as opaque kernels:

    linear:  y  = scale (x ⊙ m) Wᵀ + b     dx = scale (dy W) ⊙ m     dW = scale dyᵀ (x ⊙ m)
    matmul:  y  = scale (a ⊙ m) b          da = scale (dy bᵀ) ⊙ m    db = scale (a ⊙ m)ᵀ dy

Every op runs on any device through the plain-PyTorch reference; ``kernel="auto"`` sends CUDA
tensors to the Triton kernels, ``"triton"`` forces them (CPU tensors need TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from sparsedrop_compile.kernels import block_sparse_matmul as _ref_matmul
from sparsedrop_compile.kernels import block_sparse_matmul_triton as _tri_matmul
from sparsedrop_compile.kernels.block_mask import block_layout, fit_keep, keep_fits, keep_shape
from sparsedrop_compile.kernels import launch_plans
from sparsedrop_compile.kernels.runtime import define_op, direct_launches, interpreting, launch_settings, tracing

LIB = "sparsedrop"
_autocast_lib = torch.library.Library(LIB, "FRAGMENT")


# --------------------------------------------------------------------------- kernel choice
class KernelFamily:
    """One family's implementations side by side: the Triton launchers, the plain-PyTorch
    references with the same signatures, and the check that says whether Triton can run a call.
    Ops ask :meth:`pick` once per call and get one table of functions back."""

    def __init__(self, name: str, triton: dict[str, Callable], reference: dict[str, Callable],
                 unsupported_reason: Callable[[Sequence[Tensor], tuple[int, int]], str | None]):
        self.name, self.triton, self.reference, self.unsupported_reason = name, triton, reference, unsupported_reason

    def pick(self, kernel: str, tensors: Sequence[Tensor], block: tuple[int, int]) -> dict[str, Callable]:
        return self.triton if use_triton(kernel, tensors, block, self) else self.reference


def use_triton(kernel: str, tensors: Sequence[Tensor], block: tuple[int, int], family: KernelFamily) -> bool:
    """Whether this call runs the Triton kernels; raises for kernel="triton" when it cannot."""
    if kernel == "reference":
        return False
    if kernel not in ("auto", "triton"):
        raise ValueError(f"sparsedrop kernel={kernel!r}: expected 'auto', 'triton' or 'reference'")
    device = tensors[0].device
    if kernel == "auto" and device.type != "cuda":
        return False
    if device.type not in ("cuda", "cpu") or (device.type == "cpu" and not interpreting()):
        raise RuntimeError(
            f"sparsedrop kernel='triton' got {device.type} tensors; the Triton kernels run on CUDA, or on CPU "
            "only under Triton's interpreter: set TRITON_INTERPRET=1 before importing sparsedrop_compile, "
            "or use kernel='reference'"
        )
    reason = family.unsupported_reason(tensors, block)
    if reason is None:
        return True
    if kernel == "triton":
        raise ValueError(f"sparsedrop kernel='triton' cannot run this call: {reason}; use kernel='auto' to fall back to the reference")
    return False


def _supported(fn: Callable) -> Callable:
    """A Triton launcher told that ``pick`` has already run its support check."""
    def call(*args, **kwargs):
        return fn(*args, _supported=True, **kwargs)
    return call


# --------------------------------------------------------------------------- opaque references
# The plain-PyTorch references as ops of their own. On a GPU the ops below are triton_ops, whose
# bodies torch.compile traces into; a call that falls back to the reference (CPU tensors, a dtype
# or layout the kernels do not take) would then trace the reference's mask indexing with
# symbolic sizes, adding guards (recompiles) the dense ops never had. As opaque ops the
# references enter the graph as one node each, with the dense op's output metadata.
def _cut(keep: Tensor | None, shape, block_rows: int, block_cols: int) -> Tensor | None:
    """A possibly padded keep cut to the blocks over a 3-D operand of ``shape`` (concrete tensors);
    None stays None (an absent second mask)."""
    return None if keep is None else fit_keep(keep, keep_shape(shape, (block_rows, block_cols), True))


def _reference_dsd(a: Tensor, b: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int,
                   bias: Tensor | None, out_keep: Tensor | None = None) -> Tensor:
    block = (block_rows, block_cols)
    out_keep = _cut(out_keep, (a.shape[0], a.shape[1], b.shape[2]), *block)  # over the output
    return _ref_matmul.reference_dsd(a, b, _cut(keep, a.shape, *block), scale, block, bias, out_keep=out_keep)


def _reference_dsd_fake(a, b, keep, scale, block_rows, block_cols, bias, out_keep=None):
    out = torch.matmul(a, b)
    return out if bias is None else out + bias


def _reference_sdd(grad: Tensor, b: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int,
                   bias: Tensor | None = None, bias_scale: float | None = None, reduce_keep: Tensor | None = None) -> Tensor:
    block = (block_rows, block_cols)
    keep = _cut(keep, (grad.shape[0], grad.shape[1], b.shape[1]), *block)  # over the output
    return _ref_matmul.reference_sdd(grad, b, keep, scale, block, bias, bias_scale=bias_scale,
                                     reduce_keep=_cut(reduce_keep, grad.shape, *block))


def _reference_sdd_fake(grad, b, keep, scale, block_rows, block_cols, bias=None, bias_scale=None, reduce_keep=None):
    return torch.matmul(grad, b.transpose(-1, -2))


def _reference_dsd_tn(a: Tensor, grad: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int,
                      batched_out: bool, grad_keep: Tensor | None = None) -> Tensor:
    block = (block_rows, block_cols)
    return _ref_matmul.reference_dsd_tn(a, grad, _cut(keep, a.shape, *block), scale, block, batched_out,
                                        grad_keep=_cut(grad_keep, grad.shape, *block))


def _reference_dsd_tn_fake(a, grad, keep, scale, block_rows, block_cols, batched_out, grad_keep=None):
    batch = a.shape[0] if batched_out else 1
    return a.new_empty((batch, a.shape[2], grad.shape[2]), dtype=torch.result_type(a, grad))


def opaque_reference(name: str, fn: Callable, fake: Callable):
    """``fn`` registered as the opaque op sparsedrop::``name`` whose metadata ``fake`` gives."""
    op = torch.library.custom_op(f"{LIB}::{name}", fn, mutates_args=())
    op.register_fake(fake)
    return op


_ref_dsd = opaque_reference("reference_dsd", _reference_dsd, _reference_dsd_fake)
_ref_sdd = opaque_reference("reference_sdd", _reference_sdd, _reference_sdd_fake)
_ref_dsd_tn = opaque_reference("reference_dsd_tn", _reference_dsd_tn, _reference_dsd_tn_fake)


# The launchers' signatures (the output side's second masks and sdd's bias included) over the ops.
def _dsd_ref(a, b, keep, scale, block, bias=None, *, out_keep=None):
    return _ref_dsd(a, b, keep, scale, block[0], block[1], bias, out_keep)


def _sdd_ref(grad, b, keep, scale, block, bias=None, *, bias_scale=None, reduce_keep=None):
    return _ref_sdd(grad, b, keep, scale, block[0], block[1], bias, bias_scale, reduce_keep)


def _dsd_tn_into(a, grad, keep, scale, block, batched_out, *, grad_keep=None, out=None):
    result = _ref_dsd_tn(a, grad, keep, scale, block[0], block[1], batched_out, grad_keep)
    return result if out is None else out.copy_(result)


# The tensors ``pick`` checks must be the launcher's first two operands (or views of them with
# the same dtype, device and matrix span), since that check stands in for the launcher's own.
MATMUL = KernelFamily(
    "matmul",
    triton={name: _supported(getattr(_tri_matmul, name)) for name in ("dsd", "sdd", "dsd_tn")},
    reference={"dsd": _dsd_ref, "sdd": _sdd_ref, "dsd_tn": _dsd_tn_into},
    unsupported_reason=_tri_matmul.unsupported_reason,
)


def _check_keep(keep: Tensor, shape, block: tuple[int, int], batched: bool, op: str) -> Tensor:
    """``keep`` if it holds the flags of the blocks over an operand of ``shape``, exactly or padded
    by one block in its last two dims (a compiled graph's keep: see block_mask.padded); raises if
    it does not fit. Returned uncut: the launchers read it through its strides, and the opaque
    references cut it (block_mask.keep_fits says why)."""
    expected = tuple(keep_shape(shape, block, batched))
    if not (keep.dtype == torch.bool and keep_fits(keep, expected)):
        raise ValueError(
            f"sparsedrop::{op}: keep must be a bool tensor of shape {expected} (blocks of {block} over an "
            f"operand of shape {tuple(shape)}), got {keep.dtype} {tuple(keep.shape)}"
        )
    return keep


def _check_same_dtype(op: str, **tensors: Tensor | None) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        raise TypeError(
            f"sparsedrop::{op}: operands must share one dtype, got "
            + ", ".join(f"{k}={v}" for k, v in dtypes.items())
            + "; cast them (or run under torch.autocast) as you would for the dense op"
        )


# --------------------------------------------------------------------------- linear
def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, keep: Tensor, scale: float, block_rows: int, block_cols: int, kernel: str) -> Tensor:
    """y = scale * (x ⊙ m) @ weight.T + bias, m laid over x viewed as (rows, K)."""
    block = (block_rows, block_cols)
    keep = _check_keep(keep, x.shape, block, False, "linear")
    _check_same_dtype("linear", x=x, weight=weight, bias=bias)
    _, rows, k = block_layout(x.shape, False)
    a = x.reshape(1, rows, k)
    out = MATMUL.pick(kernel, (a, weight), block)["dsd"](a, weight.t().unsqueeze(0), keep, scale, block, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _linear_fake(x, weight, bias, keep, scale, block_rows, block_cols, kernel):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


linear = define_op(f"{LIB}::linear", _linear, _linear_fake)


def _linear_grad_input(grad: Tensor, weight: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int, kernel: str) -> Tensor:
    """dx = scale * (grad @ weight) ⊙ m, zeros in dropped blocks."""
    block = (block_rows, block_cols)
    keep = _check_keep(keep, (*grad.shape[:-1], weight.shape[1]), block, False, "linear_grad_input")
    _, rows, n = block_layout(grad.shape, False)
    g = grad.reshape(1, rows, n)
    return MATMUL.pick(kernel, (g, weight), block)["sdd"](g, weight.t().unsqueeze(0), keep, scale, block).reshape(*grad.shape[:-1], weight.shape[1])


def _linear_grad_input_fake(grad, weight, keep, scale, block_rows, block_cols, kernel):
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]))


linear_grad_input = define_op(f"{LIB}::linear_grad_input", _linear_grad_input, _linear_grad_input_fake)


def _linear_grad_weight(grad: Tensor, x: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int, kernel: str) -> Tensor:
    """dW = scale * grad.T @ (x ⊙ m), an (N, K) tensor."""
    block = (block_rows, block_cols)
    keep = _check_keep(keep, x.shape, block, False, "linear_grad_weight")
    _, rows, k = block_layout(x.shape, False)
    a = x.reshape(1, rows, k)
    g = grad.reshape(1, rows, grad.shape[-1])
    fn = MATMUL.pick(kernel, (a, g), block)["dsd_tn"]
    # The kernel writes (K, N) tiles straight into an (N, K) row-major tensor: no transpose copy.
    dw = launch_plans.empty((grad.shape[-1], k), x.dtype, x.device)
    fn(a, g, keep, scale, block, False, out=dw.t().unsqueeze(0))
    return dw


def _linear_grad_weight_fake(grad, x, keep, scale, block_rows, block_cols, kernel):
    return x.new_empty((grad.shape[-1], x.shape[-1]))


linear_grad_weight = define_op(f"{LIB}::linear_grad_weight", _linear_grad_weight, _linear_grad_weight_fake)


def _linear_setup(ctx, inputs, output):
    x, weight, bias, keep, scale, block_rows, block_cols, kernel = inputs
    ctx.save_for_backward(x, weight, keep)
    ctx.args = (scale, block_rows, block_cols, kernel)
    ctx.has_bias = bias is not None


def _linear_grads(ctx, grad, grad_input: Callable, grad_weight: Callable):
    """(dx, dW, db): the formulas of both linear paths, with their own grad functions (the ops,
    or the op bodies on the eager path)."""
    x, weight, keep = ctx.saved_tensors
    args = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx = grad_input(grad, weight, keep, *args) if need_x else None
    dw = grad_weight(grad, x, keep, *args) if need_w else None
    db = grad.sum(dim=tuple(range(grad.dim() - 1))) if (ctx.has_bias and need_b) else None
    return dx, dw, db


def _linear_backward(ctx, grad):
    dx, dw, db = _linear_grads(ctx, grad, torch.ops.sparsedrop.linear_grad_input, torch.ops.sparsedrop.linear_grad_weight)
    return dx, dw, db, None, None, None, None, None


linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# --------------------------------------------------------------------------- matmul
def _broadcast_batch(a_shape, b_shape):
    return tuple(torch.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2])))


def matmul_output_shape(a_shape, b_shape, batched: bool) -> tuple:
    """The shape of ``linear(a, b)`` (batched=False: b is the (N, K) weight) or of
    ``torch.matmul(a, b)`` (batched=True; both at least 2-D)."""
    if not batched:
        return (*a_shape[:-1], b_shape[0])
    return (*_broadcast_batch(a_shape, b_shape), a_shape[-2], b_shape[-1])


def _matmul_operands(a: Tensor, b: Tensor, keep: Tensor | None):
    """Fold a (*ba, M, K) @ b (*bb, K, N) into 3-D launcher operands (see block_sparse_matmul);
    ``keep`` lies over a's matrices (None: no mask over a)."""
    a_batch = tuple(a.shape[:-2])
    # The usual cases, a 2-D b or equal batch dims, skip torch.broadcast_shapes (~20 us a call).
    if b.dim() == 2 or tuple(b.shape[:-2]) == a_batch:
        batch = a_batch
    else:
        batch = _broadcast_batch(a.shape, b.shape)
    n_batch = math.prod(batch)
    m, k = a.shape[-2:]
    n = b.shape[-1]
    if a_batch == batch:
        a3, keep3 = a.reshape(n_batch, m, k), keep
    else:
        # a is broadcast: every copy of an entry shares that entry's mask.
        a3 = a.expand(*batch, m, k).reshape(n_batch, m, k)
        keep3 = None
        if keep is not None:
            keep_b = keep.reshape(*a_batch, *keep.shape[-2:])
            keep3 = keep_b.expand(*batch, *keep.shape[-2:]).reshape(n_batch, *keep.shape[-2:])
    if math.prod(b.shape[:-2]) == 1:
        b3 = b.reshape(1, k, n)
    else:
        b3 = b.expand(*batch, k, n).reshape(n_batch, k, n)
    return a3, b3, keep3, batch


def _check_matmul(a: Tensor, b: Tensor, op: str) -> None:
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"sparsedrop::{op}: operands must have at least 2 dims, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"sparsedrop::{op}: a {tuple(a.shape)} and b {tuple(b.shape)} cannot be multiplied (K differs)")


def _matmul(a: Tensor, b: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int, kernel: str) -> Tensor:
    """y = scale * (a ⊙ m) @ b with torch.matmul broadcasting; m is per matrix of a."""
    block = (block_rows, block_cols)
    _check_matmul(a, b, "matmul")
    keep = _check_keep(keep, a.shape, block, True, "matmul")
    _check_same_dtype("matmul", a=a, b=b)
    a3, b3, keep3, batch = _matmul_operands(a, b, keep)
    return MATMUL.pick(kernel, (a3, b3), block)["dsd"](a3, b3, keep3, scale, block).reshape(*batch, a.shape[-2], b.shape[-1])


def _matmul_fake(a, b, keep, scale, block_rows, block_cols, kernel):
    return a.new_empty(matmul_output_shape(a.shape, b.shape, True))


matmul = define_op(f"{LIB}::matmul", _matmul, _matmul_fake)


def _matmul_grad_a(grad: Tensor, a: Tensor, b: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int, kernel: str) -> Tensor:
    """da = scale * (grad @ b.T) ⊙ m, summed back to a's shape if a was broadcast."""
    block = (block_rows, block_cols)
    keep = _check_keep(keep, a.shape, block, True, "matmul_grad_a")
    a3, b3, keep3, batch = _matmul_operands(a, b, keep)
    g3 = grad.reshape(a3.shape[0], a3.shape[1], b3.shape[-1])
    da = MATMUL.pick(kernel, (g3, b3), block)["sdd"](g3, b3, keep3, scale, block).reshape(*batch, *a.shape[-2:])
    return da.sum_to_size(a.shape) if tuple(a.shape[:-2]) != batch else da


def _matmul_grad_a_fake(grad, a, b, keep, scale, block_rows, block_cols, kernel):
    return a.new_empty(a.shape)


matmul_grad_a = define_op(f"{LIB}::matmul_grad_a", _matmul_grad_a, _matmul_grad_a_fake)


def _matmul_grad_b(grad: Tensor, a: Tensor, b: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int, kernel: str) -> Tensor:
    """db = scale * (a ⊙ m).T @ grad, summed back to b's shape if b was broadcast."""
    block = (block_rows, block_cols)
    keep = _check_keep(keep, a.shape, block, True, "matmul_grad_b")
    a3, b3, keep3, batch = _matmul_operands(a, b, keep)
    g3 = grad.reshape(a3.shape[0], a3.shape[1], b3.shape[-1])
    shared_b = b3.shape[0] == 1 and a3.shape[0] != 1
    fn = MATMUL.pick(kernel, (a3, g3), block)["dsd_tn"]
    db = fn(a3, g3, keep3, scale, block, not shared_b)
    if shared_b:
        return db.reshape(b.shape)
    db = db.reshape(*batch, *b.shape[-2:])
    return db.sum_to_size(b.shape) if tuple(b.shape[:-2]) != batch else db


def _matmul_grad_b_fake(grad, a, b, keep, scale, block_rows, block_cols, kernel):
    return b.new_empty(b.shape)


matmul_grad_b = define_op(f"{LIB}::matmul_grad_b", _matmul_grad_b, _matmul_grad_b_fake)


def _matmul_setup(ctx, inputs, output):
    a, b, keep, scale, block_rows, block_cols, kernel = inputs
    ctx.save_for_backward(a, b, keep)
    ctx.args = (scale, block_rows, block_cols, kernel)


def _matmul_grads(ctx, grad, grad_a: Callable, grad_b: Callable):
    """(da, db): the formulas of both matmul paths, with their own grad functions."""
    a, b, keep = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[:2]
    da = grad_a(grad, a, b, keep, *ctx.args) if need_a else None
    db = grad_b(grad, a, b, keep, *ctx.args) if need_b else None
    return da, db


def _matmul_backward(ctx, grad):
    return (*_matmul_grads(ctx, grad, torch.ops.sparsedrop.matmul_grad_a, torch.ops.sparsedrop.matmul_grad_b),
            None, None, None, None, None)


matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup)


# --------------------------------------------------------------------------- eager path
# From plain Python (no compile) the registered ops cost most of a call's host time: an eager
# fwd + bwd of linear at 4096^3 on an H200 spent 2.3 ms of CPU on 0.67 ms of GPU work, mostly in
# torch's custom-op layers (dispatch, the autograd wrapper, the aliasing check) around our bodies
# (results/raw/session8/eager_profile_4096cubed_54e412e.txt). Outside a trace the functional forms
# run the same bodies and backward formulas through a plain autograd.Function instead; a traced
# call (torch.compile, or any dispatch mode: make_fx, fake tensors) keeps the ops, which Inductor
# sees into. The eager bodies also launch their kernels directly (runtime.direct_launches): through
# torch's tracing wrapper, launches cost most of the rest (4.8 ms of wall time for 0.73 ms of GPU
# work at 4096^3, results/raw/session9/host_overhead_6545238.log).
# The eager bodies are launch-planned (kernels/launch_plans.py): from the second call of a key
# (every shape, stride, dtype, alignment and scalar of the call) a body's checks, kernel choice,
# launchers and views are not run again; its recorded buffers, views and compiled kernels are.
_planned = launch_plans.planned(launch_settings)
_eager_linear, _eager_linear_grad_input, _eager_linear_grad_weight = map(_planned, (_linear, _linear_grad_input, _linear_grad_weight))
_eager_matmul, _eager_matmul_grad_a, _eager_matmul_grad_b = map(_planned, (_matmul, _matmul_grad_a, _matmul_grad_b))


class _EagerLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, keep, scale, block_rows, block_cols, kernel):
        _linear_setup(ctx, (x, weight, bias, keep, scale, block_rows, block_cols, kernel), None)
        with direct_launches():
            return _eager_linear(x, weight, bias, keep, scale, block_rows, block_cols, kernel)

    @staticmethod
    def backward(ctx, grad):
        with direct_launches():
            grads = _linear_grads(ctx, grad, _eager_linear_grad_input, _eager_linear_grad_weight)
        return (*grads, None, None, None, None, None)


class _EagerMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, keep, scale, block_rows, block_cols, kernel):
        _matmul_setup(ctx, (a, b, keep, scale, block_rows, block_cols, kernel), None)
        with direct_launches():
            return _eager_matmul(a, b, keep, scale, block_rows, block_cols, kernel)

    @staticmethod
    def backward(ctx, grad):
        with direct_launches():
            grads = _matmul_grads(ctx, grad, _eager_matmul_grad_a, _eager_matmul_grad_b)
        return (*grads, None, None, None, None, None)


def _eager(function: type[torch.autograd.Function], n_float_inputs: int, *args):
    """``function.apply(*args)`` with the registered op's autocast rule applied first."""
    device_type = args[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return function.apply(*args)
    cast = _autocast_cast(args, n_float_inputs, device_type)
    with torch.autocast(device_type, enabled=False):
        return function.apply(*cast)


def linear_call(x: Tensor, weight: Tensor, bias: Tensor | None, keep: Tensor, scale: float, block_rows: int,
                block_cols: int, kernel: str) -> Tensor:
    """``torch.ops.sparsedrop.linear``, or outside a trace the same computation without the op layers."""
    if tracing():
        return torch.ops.sparsedrop.linear(x, weight, bias, keep, scale, block_rows, block_cols, kernel)
    return _eager(_EagerLinear, 3, x, weight, bias, keep, scale, block_rows, block_cols, kernel)


def matmul_call(a: Tensor, b: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int, kernel: str) -> Tensor:
    """``torch.ops.sparsedrop.matmul``, or outside a trace the same computation without the op layers."""
    if tracing():
        return torch.ops.sparsedrop.matmul(a, b, keep, scale, block_rows, block_cols, kernel)
    return _eager(_EagerMatmul, 2, a, b, keep, scale, block_rows, block_cols, kernel)


# --------------------------------------------------------------------------- autocast
def _autocast_cast(args: Sequence, n_float_inputs: int, device_type: str) -> list:
    """``args`` with the first ``n_float_inputs`` floating tensors of ``device_type`` (not fp64)
    cast to the active autocast dtype, as the dense matmul ops are."""
    dtype = torch.get_autocast_dtype(device_type)
    cast = list(args)
    for i in range(n_float_inputs):
        t = cast[i]
        if isinstance(t, Tensor) and t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64:
            cast[i] = t.to(dtype)
    return cast


def register_autocast_like_matmul(op_name: str, n_float_inputs: int) -> None:
    """Under torch.autocast, cast the first ``n_float_inputs`` tensors to the autocast dtype.

    ``torch.library.register_autocast`` fixes one dtype at registration; linear and matmul
    follow whatever dtype the active autocast region asks for, so this reads it per call.
    """
    op = getattr(torch.ops.sparsedrop, op_name).default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _keyset_excl=keyset):
            cast = _autocast_cast(args, n_float_inputs, _device_type)
            with torch._C._ExcludeDispatchKeyGuard(_keyset_excl):
                return op(*cast)

        _autocast_lib.impl(op_name, kernel, key, with_keyset=True)


register_autocast_like_matmul("linear", 3)
register_autocast_like_matmul("matmul", 2)

"""Host-built TMA descriptors in launches that torch.compile traces.

A kernel may take a ``triton.tools.tensor_descriptor.TensorDescriptor`` built on the host (one
bulk copy a tile, no per-program set-up: see flash_attention_kernels.py, "TMA loads"). When
Dynamo traces user code that builds one, torch records the descriptor as its tensor plus
metadata (``("stable", (block_shape,))``) and Inductor's generated code rebuilds it with
``TensorDescriptor.from_tensor`` before each launch. A launch traced *outside* Dynamo, as a
``triton_op``'s body is, gets no metadata (torch 2.11-2.13, ``TracingTritonHOPifier.call_HOP``:
"TMA descriptor capturing not yet supported in non-dynamo tracing"); handed a descriptor, torch's
analysis of what the kernel writes then failed (KeyError on the parameter) and the graph was
rejected (session 17).

This module records such a launch as Dynamo would: each descriptor argument becomes its tensor,
with the stable metadata beside it. That is exact only when ``from_tensor`` on the tensor gives
the same descriptor, so a descriptor must be built over a tensor (or view) whose shape and
strides are the descriptor's, with zero padding: :func:`descriptor_of` builds them so, and
:func:`descriptor_arguments` refuses any other. It uses torch's private tracing classes; where
they are missing (another torch), :func:`available` is False and callers keep pointer loads.

Inductor's static launcher (C++) cannot launch a kernel with a descriptor parameter: torch
2.11-2.13 map each parameter type to a C type and have no entry for Triton 3.6's
``tensordesc<...>`` (a KeyError while the kernel compiles, where an unsupported kernel should fall
back to Triton's launcher; session 18, call 1). The backend turns static launches of user kernels
on (``STATIC_LAUNCH_ENV``: 20-35 us of host time a site), so with its defaults compiled code
keeps pointer loads; :func:`usable` says when descriptors may be recorded.

Only descriptors a kernel *reads* may go this way: torch's analysis of what a kernel writes does
not count ``tt.descriptor_reduce`` as a write (2.11-2.13; see flash_attention_triton.py,
``_launch_dkdv``), so a written descriptor could leave Inductor reading a stale buffer.
"""
from __future__ import annotations

import functools
import os
from typing import Any

from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["STATIC_LAUNCH_ENV", "available", "descriptor_arguments", "descriptor_of", "holds_descriptor",
           "static_launch", "traced_launch", "usable"]

# Inductor's switch for launching user-defined kernels (ours) through its static launcher; its
# compile workers read it from the environment when they start (see sparsedrop_compile/backend.py).
STATIC_LAUNCH_ENV = "TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS"


def _descriptor_type():
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor


def descriptor_of(t: Tensor, shape, strides, block_shape):
    """A host TMA descriptor of ``t`` read through ``shape`` and ``strides`` (which may differ
    from t's only in a size-1 dim's stride, which no address uses). Its base is then a view with
    exactly those strides, so that ``TensorDescriptor.from_tensor`` rebuilds it in compiled code."""
    TensorDescriptor = _descriptor_type()
    if not _carries(t, shape, strides):
        t = t.as_strided(list(shape), list(strides))
    return TensorDescriptor(t, list(shape), list(strides), list(block_shape))


def _carries(t: Tensor, shape, strides) -> bool:
    """Whether ``t`` has exactly this shape and these strides (for every size, no guard)."""
    return all(_same(a, b) for a, b in zip((*t.shape, *t.stride()), (*shape, *strides)))


def _same(a, b) -> bool:
    """a == b for every size (no guard when symbolic)."""
    if type(a) is int and type(b) is int:
        return a == b
    return a is b or statically_known_true(a == b)


def holds_descriptor(args, kwargs) -> bool:
    TensorDescriptor = _descriptor_type()
    return any(isinstance(a, TensorDescriptor) for a in (*args, *kwargs.values()))


def descriptor_arguments(combined_args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple]]:
    """The launch's arguments with each descriptor replaced by its tensor, and torch's stable TMA
    metadata for those parameters. Raises for a descriptor ``from_tensor`` would not rebuild."""
    from torch._higher_order_ops.triton_kernel_wrap import create_tma_stable_metadata

    TensorDescriptor = _descriptor_type()
    args, meta = dict(combined_args), {}
    for name, value in combined_args.items():
        if not isinstance(value, TensorDescriptor):
            continue
        base = value.base
        rebuilt = (len(value.shape) == base.dim()
                   and _carries(base, value.shape, value.strides)
                   and value.padding == "zero" and not getattr(value, "round_f32_to_tf32", False))
        if not rebuilt:
            raise ValueError(
                f"sparsedrop: traced launch argument {name!r} is a TMA descriptor of shape {list(value.shape)}, strides "
                f"{list(value.strides)}, padding {value.padding!r} over a tensor of shape {list(base.shape)}, strides "
                f"{list(base.stride())}; compiled code rebuilds a descriptor from its tensor alone, so build it with "
                "traced_descriptors.descriptor_of"
            )
        args[name] = base
        meta[name] = create_tma_stable_metadata(list(value.block_shape))
    return args, meta


@functools.cache
def _tracer():
    """torch's tracing HOPifier, recording descriptors with their metadata; None where this
    torch lacks the pieces."""
    try:
        from torch._higher_order_ops import triton_kernel_wrap as wrap

        base, hop = wrap.TracingTritonHOPifier, wrap.triton_kernel_wrapper_mutation
        wrap.create_tma_stable_metadata  # noqa: B018 - used by descriptor_arguments
    except (ImportError, AttributeError):
        return None

    class _DescriptorTracer(base):
        def call_HOP(self, variable, grids, combined_args, tx):
            args, meta = descriptor_arguments(combined_args)
            graphable, constant_args_idx = self.store_non_graphable_args(args)
            return hop(kernel_idx=variable.kernel_idx, constant_args_idx=constant_args_idx, grid=grids,
                       tma_descriptor_metadata=meta, kwargs=graphable)

    return _DescriptorTracer()


def available() -> bool:
    """Whether this torch has what recording a descriptor needs."""
    return _tracer() is not None


def static_launch() -> bool:
    """Whether Inductor may launch the user-defined kernels it compiles now through its static
    launcher: its master switch on, and the user-kernel switch on in this process or, where
    kernels compile in worker processes, not off in the environment (the workers read it when
    they start, so set it before the first compile: the backend defaults it to on)."""
    from torch._inductor import config

    if not getattr(config, "use_static_cuda_launcher", False):
        return False
    in_process = bool(getattr(config, "static_launch_user_defined_triton_kernels", False))
    in_workers = (config.compile_threads or 1) > 1 and os.environ.get(STATIC_LAUNCH_ENV, "0") != "0"
    return in_process or in_workers


def usable() -> bool:
    """Whether a launch traced now may take host-built descriptors: this torch can record them
    (``available``) and Inductor will not hand the kernel to its static launcher, which cannot
    take them (``static_launch``)."""
    return available() and not static_launch()


def traced_launch(wrapped, args, kwargs):
    """Record the launch ``wrapped(*args, **kwargs)`` (a ``wrap_triton`` kernel with its grid)
    with its descriptors as tensors plus metadata."""
    tracer = _tracer()
    if tracer is None:
        raise RuntimeError("sparsedrop: this torch cannot trace a launch with host TMA descriptors; "
                           "check traced_descriptors.available() before building them")
    return tracer.call_triton_kernel(wrapped, list(args), dict(kwargs), None)

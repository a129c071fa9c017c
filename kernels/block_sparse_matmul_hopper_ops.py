"""The opaque ops through which compiled code runs the Hopper block-sparse matmuls
(``sparsedrop::wgmma_dsd``, ``wgmma_sdd``, ``wgmma_dsd_tn``): Inductor emits the kernels a traced
op body launches as ``@triton.jit`` source, which a Gluon kernel is not, so
``block_sparse_matmul_hopper.serve`` records one of these ops in the traced graph instead, and
Inductor calls it as an extern kernel on the real tensors. Each runs the launcher of
``block_sparse_matmul_triton.py`` into ``out`` (its launches planned: ``launch_plans``).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import runtime


@functools.cache
def _launchers():
    """block_sparse_matmul_triton, imported on first use: it imports this module (through
    block_sparse_matmul_hopper)."""
    from . import block_sparse_matmul_triton as tri

    return tri


# The opaque ops are defined by schema on a Library, each with one CompositeExplicitAutograd
# kernel and a fake one, not with custom_op, whose Python layers around a body (an autograd
# wrapper, a version-counter bump that re-parses the arguments, the backend's aliasing check)
# cost the host about 40 us a call against 3 for a schema op's dispatch (both on CPU, the body
# empty). What of those layers matters here, the kernel does (_opaque): it bumps the version
# counter of ``out`` as an in-place op does, and Dynamo never traces into it. No autograd
# formula: only compiled graphs call these ops.
_lib = torch.library.Library("sparsedrop", "FRAGMENT")


def _opaque(schema: str):
    """Decorator: define the op ``sparsedrop::<schema>``, whose last argument ``out`` the body
    writes into (``Tensor(a!)``, returns nothing); returns the op."""
    name = schema.split("(", 1)[0]

    def register(body):
        @torch.compiler.disable
        def kernel(*args):
            body(*args)
            torch.autograd.graph.increment_version(args[-1])

        _lib.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
        _lib.impl(name, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(f"sparsedrop::{name}", lambda *args: None, lib=_lib)
        return getattr(torch.ops.sparsedrop, name).default

    return register


@_opaque("wgmma_dsd(Tensor a, Tensor b, Tensor keep, float scale, SymInt block_rows, SymInt block_cols, Tensor? bias, "
         "Tensor(a!) out) -> ()")
def wgmma_dsd(a: Tensor, b: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int,
              bias: Tensor | None, out: Tensor) -> None:
    """``block_sparse_matmul_triton.dsd(..., out=out)`` as one opaque op of a compiled graph."""
    with runtime.direct_launches():
        _launchers().dsd(a, b, keep, scale, (block_rows, block_cols), bias, out=out, _supported=True)


@_opaque("wgmma_sdd(Tensor grad, Tensor b, Tensor keep, float scale, SymInt block_rows, SymInt block_cols, "
         "Tensor? bias, float bias_scale, Tensor(a!) out) -> ()")
def wgmma_sdd(grad: Tensor, b: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int,
              bias: Tensor | None, bias_scale: float, out: Tensor) -> None:
    """``block_sparse_matmul_triton.sdd(..., out=out)`` as one opaque op of a compiled graph."""
    with runtime.direct_launches():
        _launchers().sdd(grad, b, keep, scale, (block_rows, block_cols), bias, bias_scale=bias_scale, out=out,
                         _supported=True)


@_opaque("wgmma_dsd_tn(Tensor a, Tensor grad, Tensor keep, float scale, SymInt block_rows, SymInt block_cols, "
         "bool batched_out, Tensor(a!) out) -> ()")
def wgmma_dsd_tn(a: Tensor, grad: Tensor, keep: Tensor, scale: float, block_rows: int, block_cols: int,
                 batched_out: bool, out: Tensor) -> None:
    """``block_sparse_matmul_triton.dsd_tn(..., out=out)`` as one opaque op of a compiled graph."""
    with runtime.direct_launches():
        _launchers().dsd_tn(a, grad, keep, scale, (block_rows, block_cols), batched_out, out=out, _supported=True)

"""What the Gluon (Hopper-only) kernels of both families share: the names of the Gluon
operations that moved between Triton releases, resolved once, and small layout helpers.

The GPU machine runs Triton 3.6 and CI 3.9 (which only compiles these kernels, for sm_90). 3.9
renamed the TMA copies (3.6's ``async_copy_global_to_shared`` / ``async_copy_shared_to_global``
are ``async_load`` / ``async_store`` there, same arguments; the old names raise) and the CTA
barrier (3.6's ``thread_barrier`` is ``barrier``).

``hopper_descriptor`` builds a TMA descriptor on the host, for a kernel parameter.
"""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.constexpr_function
def staged(stages, block):
    """The shape of ``stages`` buffers of ``block`` (a ring in shared memory)."""
    return [stages] + list(block)


@gluon.constexpr_function
def mma_layout(tile_r, tile_c, num_warps):
    """wgmma's accumulator layout for a (tile_r, tile_c) product: warps stacked along the rows (16
    rows each, a warpgroup spans 64), the rest along the columns; each instruction as wide as a
    warp's columns allow (<= 256)."""
    warps_r = min(num_warps, tile_r // 16)
    warps_c = num_warps // warps_r
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps_r, warps_c],
                                     instr_shape=[16, min(256, tile_c // warps_c), 16])


_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


def hopper_descriptor(t: torch.Tensor, copy: list, tile: list | None = None) -> TensorDescriptor:
    """A TMA descriptor over ``t`` (2-D, unit column stride, 16-byte aligned rows), built on the
    host: each copy moves a ``copy`` block into a shared-memory tile of shape ``tile`` (default:
    the block; a tile filled by several copies, e.g. two halves, takes its own tile's layout), laid
    out as wgmma reads it (``NVMMASharedLayout.get_default_for``)."""
    layout = gl.NVMMASharedLayout.get_default_for(list(tile or copy), _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], list(copy), layout)

"""What the Gluon (Hopper-only) kernels of both families share: the names of the Gluon
operations that moved between Triton releases, resolved once, and small layout helpers.

The GPU machine runs Triton 3.6 and CI 3.9 (which only compiles these kernels, for sm_90). 3.9
renamed the TMA copies (3.6's ``async_copy_global_to_shared`` / ``async_copy_shared_to_global``
are ``async_load`` / ``async_store`` there, same arguments; the old names raise) and the CTA
barrier (3.6's ``thread_barrier`` is ``barrier``).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma

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

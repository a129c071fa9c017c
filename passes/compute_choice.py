"""Where a block-dropped matmul skips its dropped blocks, and where it runs dense.

The block-sparse kernels win when they skip enough work to pay for running each kept tile
slower than cuBLAS does (issue 13), or when the matmul is so small that launching fewer kernels
is what counts (the fused op launches fewer than dropout + matmul + its backward). Measured on
an H200 (benchmarks/results/kernels_nvidia-h200.csv, CUDA-graph replay, forward + backward):
at p = 0.1 the kernels take 1.03-1.06x cuBLAS's time from 4096^3 to 8192x4096x14336 (1.29x at
T5-base's 8192x768x3072), at p = 0.3 0.83-0.87x, at p = 0.5 0.61-0.68x. So below
``sparse_min_p`` (0.25 by default) a GPU-bound site keeps its block dropout, drawn from the same
flags in the same order, but materialised (``mask_ops.materialise``, which Inductor fuses into
the neighbouring elementwise code) in front of the original dense matmul. Only the compute path
differs; ``explain`` says which each site got.
"""
from __future__ import annotations

from sparsedrop_compile.config import SparseDropConfig
from sparsedrop_compile.kernels import runtime

from ._graph import size_hint


def cuda_graphs(config: SparseDropConfig) -> bool:
    """Whether Inductor will run the compiled graph under CUDA graphs (then nothing is launch-bound)."""
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    on = bool(inductor_config.triton.cudagraphs)
    if config.mode:
        on = bool(list_mode_options(config.mode).get("triton.cudagraphs", on))
    return bool(config.inductor_options.get("triton.cudagraphs", on))


def dense_reason(out_numel, k, p: float, on_cuda: bool, config: SparseDropConfig) -> str | None:
    """Why a matmul site with an output of ``out_numel`` elements and inner size ``k`` should run
    dense (the reason names p, the work and the option), or None to skip dropped blocks."""
    if config.kernel != "auto" or p >= config.sparse_min_p:
        return None
    numel, inner = size_hint(out_numel), size_hint(k)
    if numel is None or inner is None:
        return None
    work = numel * inner
    graphs = on_cuda and cuda_graphs(config)
    if runtime.launch_bound_work(work, graphs):
        return None
    why = "under CUDA graphs" if graphs else f"{work / 2**30:.0f} G multiply-adds"
    return (f"dense matmul, block dropout materialised: p={p:g} < sparse_min_p={config.sparse_min_p:g} "
            f"({why}; the kernels pay from about p=0.25)")

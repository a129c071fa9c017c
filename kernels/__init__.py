"""Block-sparse kernels for SparseDrop: one file per op family, each with its PyTorch reference.

Triton modules (``*_triton``) are imported lazily by ``sparsedrop_compile.ops`` so that
TRITON_INTERPRET can still be set after ``import sparsedrop_compile``.
"""

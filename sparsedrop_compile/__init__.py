"""sparsedrop-compile: block dropout (SparseDrop) fused into matmuls, as a torch.compile backend."""
from sparsedrop_compile import ops  # noqa: F401  (registers the sparsedrop:: ops)
from sparsedrop_compile.config import SparseDropConfig

__all__ = ["SparseDropConfig", "ops"]

"""sparsedrop-compile: block dropout (SparseDrop) fused into matmuls, as a torch.compile backend.

``torch.compile(model, backend="sparsedrop")`` finds dropout feeding a matmul (linear, addmm,
matmul/bmm, and the dropout inside scaled_dot_product_attention) and replaces each pair with
block-sparse kernels that skip the dropped blocks.
"""
from sparsedrop_compile import ops  # noqa: F401  (registers the sparsedrop:: ops)
from sparsedrop_compile import attention_ops  # noqa: F401  (registers sparsedrop::attention)
from sparsedrop_compile.backend import sparsedrop
from sparsedrop_compile.config import SparseDropConfig
from sparsedrop_compile.explain import ExplainReport, explain
from sparsedrop_compile.functional import sparse_dropout_linear, sparse_dropout_matmul

__all__ = [
    "ExplainReport",
    "SparseDropConfig",
    "explain",
    "sparse_dropout_linear",
    "sparse_dropout_matmul",
    "sparsedrop",
]


def _register_backend() -> None:
    # The entry point makes the name work without this import; this covers source checkouts.
    from torch._dynamo.backends import registry

    if "sparsedrop" not in registry._COMPILER_FNS:
        registry.register_backend(sparsedrop, name="sparsedrop")


_register_backend()

"""sparsedrop-compile: block dropout (SparseDrop) fused into matmuls, as a torch.compile backend.

``torch.compile(model, backend="sparsedrop")`` finds dropout feeding a matmul (linear, addmm,
matmul/bmm, and the dropout inside scaled_dot_product_attention) and replaces each pair with
block-sparse kernels that skip the dropped blocks.
"""
from sparsedrop_compile import ops  # noqa: F401  (registers the sparsedrop:: ops)
from sparsedrop_compile import attention_ops  # noqa: F401  (registers sparsedrop::attention)
from sparsedrop_compile import mask_ops  # noqa: F401  (registers the keep-mask ops)
from sparsedrop_compile import output_ops  # noqa: F401  (registers the output-side ops)
from sparsedrop_compile import distributed
from sparsedrop_compile.backend import sparsedrop
from sparsedrop_compile.config import SparseDropConfig
from sparsedrop_compile.explain import explain
from sparsedrop_compile.functional import sparse_dropout_linear, sparse_dropout_matmul
from sparsedrop_compile.report import ExplainReport, Site

__all__ = [
    "ExplainReport",
    "Site",
    "SparseDropConfig",
    "explain",
    "sparse_dropout_linear",
    "sparse_dropout_matmul",
    "sparsedrop",
]


def _register_backend() -> None:
    """Make backend="sparsedrop" work after ``import sparsedrop_compile`` alone (e.g. a checkout
    on sys.path that was never pip-installed, so no entry point names it).

    When torch finds the installed entry point it is loading this package *from* its own
    ``lookup_backend``, which registers the name right after the import; registering it here as
    well would make torch raise "duplicate name: sparsedrop". So register only when no entry
    point for the name has been discovered and nothing holds the name yet.
    """
    from torch._dynamo.backends import registry

    discovered = registry._BACKENDS.get("sparsedrop") is not None  # an EntryPoint, being loaded
    if not discovered and "sparsedrop" not in registry._COMPILER_FNS:
        registry.register_backend(sparsedrop, name="sparsedrop")


_register_backend()
distributed.install_ddp_hook()  # under DDP, rewrite each graph whole before DDPOptimizer splits it

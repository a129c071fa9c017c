"""sparsedrop-compile: block dropout (SparseDrop) fused into matmuls, as a torch.compile backend.

``torch.compile(model, backend="sparsedrop")`` finds dropout feeding a matmul (linear, addmm,
matmul/bmm, and the dropout inside scaled_dot_product_attention) and replaces each pair with
block-sparse kernels that skip the dropped blocks.
"""
import os as _os


def _source_checkout_path() -> None:
    # Installed, passes/ and kernels/ live inside this package (setuptools package-dir). In a
    # source checkout that is not pip-installed they sit beside it: search there too.
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    here = _os.path.dirname(_os.path.abspath(__file__))
    if not _os.path.isdir(_os.path.join(here, "kernels")) and _os.path.isfile(_os.path.join(root, "kernels", "block_mask.py")) and _os.path.isfile(_os.path.join(root, "pyproject.toml")):
        __path__.append(root)  # noqa: F821  (the package's own __path__)


_source_checkout_path()

from sparsedrop_compile import ops  # noqa: E402,F401  (registers the sparsedrop:: ops)
from sparsedrop_compile import attention_ops  # noqa: E402,F401  (registers sparsedrop::attention)
from sparsedrop_compile.backend import sparsedrop  # noqa: E402
from sparsedrop_compile.config import SparseDropConfig  # noqa: E402
from sparsedrop_compile.explain import ExplainReport, explain  # noqa: E402
from sparsedrop_compile.functional import sparse_dropout_linear, sparse_dropout_matmul  # noqa: E402

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

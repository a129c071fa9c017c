"""``explain``: what the backend found in a model and what it did with each dropout."""
from __future__ import annotations

from typing import Any, Callable

import torch

from sparsedrop_compile import report as _report
from sparsedrop_compile.backend import sparsedrop
from sparsedrop_compile.config import SparseDropConfig
from sparsedrop_compile.report import ExplainReport


def explain(model_or_fn: torch.nn.Module | Callable, *args: Any, options: dict | SparseDropConfig | None = None,
            inner: str = "eager", **kwargs: Any) -> ExplainReport:
    """Compile ``model_or_fn`` with the sparsedrop backend, run one forward in train mode, report.

    The rewritten graphs run with ``inner`` ("eager" by default, whatever ``options`` say): which
    sites are rewritten does not depend on the compiler that runs the graph afterwards, and eager
    keeps explain fast. Dynamo's caches are reset first (as ``torch._dynamo.explain`` does) so
    every graph is compiled and seen.
    """
    config = SparseDropConfig.from_options(options).replace(inner=inner)
    is_module = isinstance(model_or_fn, torch.nn.Module)
    was_training = model_or_fn.training if is_module else None
    result = ExplainReport()

    def backend(gm, example_inputs, **kw):
        return sparsedrop(gm, example_inputs, options=config)

    torch._dynamo.reset()
    try:
        with _report.recording(result):
            if is_module:
                model_or_fn.train()
            torch.compile(model_or_fn, backend=backend)(*args, **kwargs)
    finally:
        if is_module:
            model_or_fn.train(was_training)
        torch._dynamo.reset()
    return result

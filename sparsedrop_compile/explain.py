"""``explain``: what the backend found in a model and what it did with each dropout."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sparsedrop_compile.backend import _site_recorder, sparsedrop
from sparsedrop_compile.config import SparseDropConfig

HEADER = ("graph", "location", "p", "kind", "consumers", "rewritten", "reason")


def format_sites(sites) -> str:
    rows = [HEADER] + [s.row() for s in sites]
    limits = (5, 60, 5, 9, 60, 9, 90)
    rows = [tuple(cell if len(cell) <= lim else cell[: lim - 1] + "…" for cell, lim in zip(row, limits)) for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class ExplainReport:
    """Every dropout site the backend saw while compiling one forward pass."""

    sites: list = field(default_factory=list)
    graphs: int = 0

    @property
    def rewritten(self) -> list:
        return [s for s in self.sites if s.rewritten]

    @property
    def skipped(self) -> list:
        return [s for s in self.sites if not s.rewritten]

    def __str__(self) -> str:
        head = f"sparsedrop: {len(self.rewritten)} of {len(self.sites)} dropout site(s) rewritten in {self.graphs} graph(s)"
        return head + ("\n" + format_sites(self.sites) if self.sites else "")


def explain(model_or_fn: torch.nn.Module | Callable, *args: Any, options: dict | SparseDropConfig | None = None, **kwargs: Any) -> ExplainReport:
    """Compile ``model_or_fn`` with the sparsedrop backend, run one forward in train mode, report.

    Unless ``options`` names ``inner``, the rewritten graphs run eagerly (the decisions do not
    depend on the inner compiler, and this keeps explain fast). Dynamo's caches are reset first
    (as ``torch._dynamo.explain`` does) so every graph is compiled and seen.
    """
    config = SparseDropConfig.from_options(options)
    if options is None or (isinstance(options, dict) and "inner" not in options):
        config = config.replace(inner="eager")
    is_module = isinstance(model_or_fn, torch.nn.Module)
    was_training = model_or_fn.training if is_module else None
    report = ExplainReport()

    def backend(gm, example_inputs, **kw):
        return sparsedrop(gm, example_inputs, options=config)

    torch._dynamo.reset()
    token = _site_recorder.set(report)
    try:
        if is_module:
            model_or_fn.train()
        torch.compile(model_or_fn, backend=backend)(*args, **kwargs)
    finally:
        _site_recorder.reset(token)
        if is_module:
            model_or_fn.train(was_training)
        torch._dynamo.reset()
    return report

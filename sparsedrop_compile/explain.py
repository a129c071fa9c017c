"""``explain``: what the backend found in a model and what it did with each dropout."""
from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.utils import counters

from sparsedrop_compile import report as _report
from sparsedrop_compile.backend import sparsedrop
from sparsedrop_compile.config import SparseDropConfig
from sparsedrop_compile.coverage import merge, record_dropouts
from sparsedrop_compile.distributed import piece_of, whole_graph_pass
from sparsedrop_compile.report import ExplainReport

log = logging.getLogger("sparsedrop_compile")


def explain(model_or_fn: torch.nn.Module | Callable, *args: Any, options: dict | SparseDropConfig | None = None,
            inner: str = "eager", **kwargs: Any) -> ExplainReport:
    """Compile ``model_or_fn`` with the sparsedrop backend, run one forward in train mode, report.

    The rewritten graphs run with ``inner`` ("eager" by default, whatever ``options`` say): which
    sites are rewritten does not depend on the compiler that runs the graph afterwards, and eager
    keeps explain fast. Dynamo's caches are reset first (as ``torch._dynamo.explain`` does) so
    every graph is compiled and seen. The forward is then replayed eagerly from the same RNG
    state and buffers to find every dropout it executes: a graph that ran for several layers gets
    a row per layer, and a dropout that ran outside every compiled graph gets a row that says so.
    """
    config = SparseDropConfig.from_options(options).replace(inner=inner)
    is_module = isinstance(model_or_fn, torch.nn.Module)
    was_training = model_or_fn.training if is_module else None
    result = ExplainReport()
    runs: collections.Counter = collections.Counter()

    def backend(gm, example_inputs, **kw):
        piece = piece_of(gm)  # a DDPOptimizer piece of a graph rewritten whole: (its index, holds its first op)
        index = result.graphs if piece is None else piece[0]  # the index run_passes gives this graph
        compiled = sparsedrop(gm, example_inputs, options=config)
        if whole_graph_pass() or (piece is not None and not piece[1]):
            return compiled  # a graph's runs are counted once: in its (first) piece

        def run(*graph_args):
            runs[index] += 1
            return compiled(*graph_args)

        return run

    backend._sparsedrop_backend = True  # under DDP, the hook rewrites the whole graph through it too

    torch._dynamo.reset()
    breaks_before = dict(counters["graph_break"])
    try:
        if is_module:
            model_or_fn.train()
        start = _State(model_or_fn)
        with _report.recording(result):
            torch.compile(model_or_fn, backend=backend)(*args, **kwargs)
        breaks = [reason.strip().splitlines()[0][:160] for reason, n in counters["graph_break"].items() if n > breaks_before.get(reason, 0)]
        end = _State(model_or_fn)
        start.restore()
        try:
            calls = record_dropouts(model_or_fn, args, kwargs)
        except Exception as error:  # noqa: BLE001 - a model that only runs compiled: report what was compiled
            log.warning("sparsedrop explain: the eager replay failed (%s); dropouts outside compiled graphs are not listed", error)
        else:
            result.sites = merge(result.sites, runs, calls, breaks)
        finally:
            end.restore()
    finally:
        if is_module:
            model_or_fn.train(was_training)
        torch._dynamo.reset()
    return result


class _State:
    """RNG states and module buffers (e.g. BatchNorm statistics), to replay a forward from them."""

    def __init__(self, model_or_fn):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.buffers = {}
        if isinstance(model_or_fn, torch.nn.Module):
            self.buffers = {id(b): (b, b.detach().clone()) for b in model_or_fn.buffers()}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        with torch.no_grad(), contextlib.suppress(RuntimeError):
            for buffer, value in self.buffers.values():
                buffer.copy_(value)

"""Which dropouts a forward really executes, so ``explain`` can list every one of them.

The backend only sees the graphs Dynamo compiles. A dropout can run outside them (code Dynamo runs
eagerly: ``torch.compiler.disable``, a skipped frame, the call at a graph break), and one graph can
run several times in one forward (a frame compiled once and reused by every layer of its class).
``record_dropouts`` replays the forward eagerly under a torch-function mode that notes each
dropout call with its module path (the innermost module of the model on the Python stack) and
source line; ``merge`` matches those calls to the compiled sites, counting each graph's runs.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sparsedrop_compile.report import Site

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIRS = (_TORCH_DIR, os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Call:
    """One dropout executed by the eager replay."""

    function: str
    module_path: str
    source: str  # "file.py:123" of the user code line that made the call
    p: float | None


def _dropout_p(func, args, kwargs) -> tuple[str, float | None] | None:
    """(name, p) if this call is a dropout the passes look for, else None."""
    def arg(i, name, default):
        return args[i] if len(args) > i else kwargs.get(name, default)

    if func in (F.dropout, torch.dropout):
        return func.__name__, arg(1, "p", 0.5)
    if func is F.scaled_dot_product_attention:
        p = arg(4, "dropout_p", 0.0)
        return ("scaled_dot_product_attention", p) if p else None
    if func is F.multi_head_attention_forward:
        p, training = arg(10, "dropout_p", 0.0), arg(13, "training", True)
        return ("multi_head_attention_forward", p) if p and training else None
    return None


class _Recorder(TorchFunctionMode):
    def __init__(self, paths: dict[int, str]):
        super().__init__()
        self.paths = paths
        self.calls: list[Call] = []
        self.depth = 0  # inside a recorded call: its own inner dropout (MHA's SDPA) is not another site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = _dropout_p(func, args, kwargs) if self.depth == 0 else None
        if found is None:
            return func(*args, **kwargs)
        path, source = self._where()
        self.calls.append(Call(found[0], path, source, None if found[1] is None else float(found[1])))
        self.depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.depth -= 1

    def _where(self) -> tuple[str, str]:
        path, source = None, ""
        frame = sys._getframe(2)
        while frame is not None and (path is None or not source):
            if not source and not frame.f_code.co_filename.startswith(_OWN_DIRS):
                source = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
            owner = frame.f_locals.get("self") if path is None else None
            if owner is not None and id(owner) in self.paths:
                path = self.paths[id(owner)]
            frame = frame.f_back
        return path or "", source


def record_dropouts(model_or_fn, args, kwargs) -> list[Call]:
    """Run the forward eagerly once and return its dropout calls, in order."""
    paths = {id(m): name for name, m in model_or_fn.named_modules()} if isinstance(model_or_fn, torch.nn.Module) else {}
    recorder = _Recorder(paths)
    with recorder:
        model_or_fn(*args, **kwargs)
    return recorder.calls


def _source(site: Site) -> str:
    return site.location.rsplit("(", 1)[-1].rstrip(")") if site.location.endswith(")") else ""


def _fit(site: Site, call: Call, repeat: bool) -> tuple[int, int] | None:
    """How well a run of a site fits a call, lower is closer: (same source line 0 / site without
    one 1, same module path 0 / a suffix of it 1 (the graph's frame root is a submodule) / either
    has no path 2, e.g. explain of a function, where no module tree names the modules / another
    path 3, only for a repeated run: a graph compiled for one layer and run again for the next,
    named after the first); None if the source lines or the paths differ."""
    source = _source(site)
    if source and source != call.source:
        return None
    if site.module_path == call.module_path:
        path = 0
    elif site.module_path and call.module_path.endswith("." + site.module_path):
        path = 1
    elif not site.module_path or not call.module_path:
        path = 2
    elif repeat and source:
        path = 3
    else:
        return None
    if not source and (path == 2 or not site.module_path):
        return None  # neither a line nor a path to go by
    return (0 if source else 1, path)


def merge(sites: list[Site], runs: dict[int, int], calls: list[Call], graph_breaks: list[str]) -> list[Site]:
    """Every compiled site once per run of its graph, and every recorded call that matches no site
    run as a site of its own: it ran outside any compiled graph.

    Calls are matched in order to free site runs with the same source line, the closest module
    path first. Where a graph's paths are relative to a submodule and it ran fewer times than
    calls fit it, the earliest calls take its runs.
    """
    free = [(site, run) for site in sites for run in range(max(runs.get(site.graph, 1), 1))]
    copies: dict[int, list[Site]] = {}
    outside: list[Site] = []
    for call in calls:
        fits = [(fit, i) for i, (site, run) in enumerate(free) if (fit := _fit(site, call, run > 0)) is not None]
        match = free[min(fits)[1]] if fits else None
        if match is None:
            outside.append(_outside_site(call, graph_breaks))
            continue
        free.remove(match)
        site, run = match
        if run > 0:  # the same graph again, e.g. the next layer of the class: its own row
            where = f"{call.module_path or '<top>'} ({call.source})"
            copies.setdefault(id(site), []).append(dataclasses.replace(copy.copy(site), module_path=call.module_path, location=where))
    out: list[Site] = []
    for site in sites:
        out.append(site)
        out.extend(copies.get(id(site), []))
    return out + outside


def _outside_site(call: Call, graph_breaks: list[str]) -> Site:
    why = "; ".join(graph_breaks[:3]) if graph_breaks else "no graph break was logged (torch.compiler.disable, or a skipped frame)"
    reason = f"ran outside any compiled graph: Dynamo ran this {call.function} call eagerly; graph breaks in this forward: {why}"
    where = f"{call.module_path or '<top>'} ({call.source})" if call.source else call.module_path or "<top>"
    return Site(None, "", where, call.module_path, call.p, "none", [], False, reason)

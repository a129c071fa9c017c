"""What every pass needs from an FX graph: node metadata, provenance, site records, new nodes."""
from __future__ import annotations

import fnmatch
import math
import re
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from sparsedrop_compile.report import Site

from ._names import module_path  # noqa: F401  (re-exported: the passes import it from here)


def meta_val(node: Any):
    """The fake value Dynamo recorded for a node (or the constant itself)."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def source_line(node: fx.Node) -> str:
    """'file.py:123' of the user code line that made the node (last frame of its stack trace)."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if not frames:
        return ""
    path, line = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"


def location(node: fx.Node) -> str:
    path, src = module_path(node), source_line(node)
    return f"{path or '<top>'} ({src})" if src else (path or node.name)


def describe_consumer(kind: str, node: fx.Node) -> str:
    path = module_path(node)
    return f"{kind} {path}" if path else f"{kind} {node.name}"


def excluded(patterns: Iterable[str], filter_fn: Callable | None, site: Site, paths: Iterable[str]) -> str | None:
    """The reason a site is excluded by the user's options, or None."""
    names = [p for p in (site.module_path, *paths) if p]
    for pattern in patterns:
        if pattern.startswith("kind:"):
            if fnmatch.fnmatchcase(site.kind, pattern[5:]):
                return f"excluded by option exclude={pattern!r}"
        elif any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return f"excluded by option exclude={pattern!r}"
    if filter_fn is not None and not filter_fn(site):
        return "excluded by option filter_fn"
    return None


def known_equal(a, b) -> bool:
    """a == b for ints or SymInts, without adding guards; unknown counts as not equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def shape_of(node: Any):
    val = meta_val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def const_number(value: Any) -> float | None:
    """A Python number baked into the graph (not a bool, not symbolic)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def scalar_hint(value: Any) -> float | None:
    """The current value of a constant or symbolic float/int node, for reports and thresholds."""
    number = const_number(value)
    if number is not None:
        return number
    val = meta_val(value)
    if isinstance(val, (torch.SymFloat, torch.SymInt)):
        hint = val.node.hint
        return None if hint is None else float(hint)
    return None


class GraphEditor:
    """Inserts nodes and keeps ``example_value`` metadata valid by running them on fake values."""

    def __init__(self, gm: fx.GraphModule, fake_mode=None):
        self.gm = gm
        self.graph = gm.graph
        self.fake_mode = _find_fake_mode(gm) or fake_mode

    def call(self, target, args: tuple, kwargs: dict | None = None, *, before: fx.Node, like: fx.Node, op: str = "call_function") -> fx.Node:
        kwargs = kwargs or {}
        with self.graph.inserting_before(before):
            node = self.graph.create_node(op, target, args, kwargs)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "seq_nr", "from_node"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        self._propagate(node)
        return node

    def _propagate(self, node: fx.Node) -> None:
        if self.fake_mode is None:
            return
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), meta_val)
        with self.fake_mode:
            if node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                value = node.target(*args, **kwargs)
        node.meta["example_value"] = value

    def erase_if_unused(self, nodes: Iterable[fx.Node]) -> None:
        """Erase the given nodes (in reverse order) once nothing uses them."""
        for node in reversed(list(dict.fromkeys(nodes))):
            if node.graph is self.graph and not node.users:
                self.graph.erase_node(node)


def _find_fake_mode(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        val = meta_val(node)
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    return None


def size_hint(value: Any) -> int | None:
    """An int, or the current value of a SymInt (the sizes it was traced with); None if unbacked."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        return None if hint is None else int(hint)
    return None


def whole_drop_refusal(p: float, blocks: int | None, bound: float, unit: str, option: str, whole: str = "activation") -> str | None:
    """Why a site with ``blocks`` mask blocks over its whole activation must stay element-wise, or None.

    Dropping every block at once zeroes the whole activation (e.g. a classifier head's input for
    the whole batch); element-wise dropout practically never does that, so it must stay rare.
    """
    if blocks is None:
        return f"the number of {unit}s is unknown (data-dependent size), so p**k cannot be bounded; left element-wise"
    chance = p ** blocks  # each block is dropped independently with probability p
    if chance <= bound * (1 + 1e-9):  # so that 0.1**6 counts as 1e-6
        return None
    need = max(blocks + 1, math.ceil(math.log(bound) / math.log(p) - 1e-9)) if p > 0 else blocks
    return (
        f"too few blocks: the whole {whole} is k={blocks} {unit}(s), so at p={p:g} all are dropped at once with "
        f"probability p**k={chance:.2g} > max_drop_all={bound:g}; left element-wise. A smaller {option} "
        f"(k >= {need} at this p) or a larger max_drop_all lets it be rewritten"
    )


def attention_tiles_refusal(site, config, q_shape, k_shape) -> str | None:
    """Every (batch, head) tile of an attention dropped at once zeroes its output: keep that rare.
    ``q_shape`` / ``k_shape`` in SDPA's layout (*batch, heads, L, E) / (*batch, heads, S, E), as
    size hints (None where unknown); sets ``site.blocks`` to the tile count. Tiles that a mask
    hides entirely still count (the mask is data, unknown here)."""
    from sparsedrop_compile.kernels.flash_attention import attention_keep_shape

    if any(n is None for n in (*q_shape, *k_shape)):
        site.blocks = None
    else:
        site.blocks = math.prod(attention_keep_shape(q_shape, k_shape, config.attention_block))
    bq, bk = config.attention_block
    return whole_drop_refusal(site.p, site.blocks, config.max_drop_all, f"{bq}x{bk} tile", "attention_block", "attention matrix")

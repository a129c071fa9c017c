"""Which nodes of an FX graph write to which tensors, and which tensors alias each other.

A fused op reads its operands where it stands in the graph. When a rewrite moves a read (the
dropout -> matmul pass reads the dropout's input x where the matmul is, not where the dropout
was), any in-place write in between to that tensor or to anything sharing its memory changes
the result. This module finds such writes.

Aliasing comes from the storages of the fake values Dynamo records (``example_value``): a view
shares its base's storage, and so do graph inputs that alias each other. A node without a fake
value counts as aliasing everything.

A node writes when it is (conservatively):
- a method or function whose name ends in a single ``_`` (``mul_``, ``torch.relu_``,
  ``F.relu_``, ``torch._foreach_add_``), an in-place dunder (``__iadd__``, ``__setitem__``) or an
  ``operator`` in-place function (``iadd``, ``setitem``, ...): its first argument;
- a call with ``inplace=True`` (``F.relu``, ``F.dropout``, ``F.hardtanh``, ...): its input;
- a call with ``out=``: the out tensor(s);
- an OpOverload whose schema marks an argument as written (``Tensor(a!)``);
- a higher-order op, unless each of its subgraphs provably writes none of its own inputs, and any
  ``call_module``: every tensor it receives (modules are not looked into).

The attention pass needs none of this: SDPA's q, k and v are read where SDPA is, both before and
after the rewrite, and SDPA saves them for backward just as the fused op does.
"""
from __future__ import annotations

import functools
import inspect
import operator
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

UNKNOWN = None  # "could be any storage"

INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem, operator.delitem,
}
INPLACE_DUNDERS = {f"__{op.__name__}__" for op in INPLACE_OPERATORS}


@dataclass
class Write:
    node: fx.Node  # the node that writes
    target: Any  # what it writes: an fx.Node, a list of them, or something else
    op: str  # how, for reasons: "mul_", "relu(inplace=True)", "add(out=...)", ...
    certain: bool = True  # False: a module or higher-order op that may write what it receives

    @property
    def verb(self) -> str:
        return "is mutated in place by" if self.certain else "may be mutated in place by"


def storages(node: Any):
    """The storages a value's tensors live in (a frozenset), or UNKNOWN."""
    if isinstance(node, (list, tuple)):
        parts = [storages(n) for n in node]
        return UNKNOWN if any(p is UNKNOWN for p in parts) else frozenset().union(*parts)
    if not isinstance(node, fx.Node):
        return frozenset()
    if "example_value" not in node.meta and "val" not in node.meta:
        return UNKNOWN
    return _value_storages(node.meta.get("example_value", node.meta.get("val")))


def _value_storages(value):
    if isinstance(value, torch.Tensor):
        try:
            return frozenset([StorageWeakRef(value.untyped_storage())])
        except (RuntimeError, NotImplementedError):  # sparse / nested tensors have no plain storage
            return UNKNOWN
    if isinstance(value, (list, tuple)):
        parts = [_value_storages(v) for v in value]
        return UNKNOWN if any(p is UNKNOWN for p in parts) else frozenset().union(*parts)
    return frozenset()


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def _signature(target):
    try:
        return _cached_signature(target)
    except TypeError:  # unhashable target
        return _cached_signature.__wrapped__(target)


@functools.lru_cache(maxsize=None)
def _cached_signature(target):
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a Python signature
        return None


def _first_input(node: fx.Node):
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()), None)


def writes(node: fx.Node, gm: fx.GraphModule | None = None) -> list[Write]:
    """Everything ``node`` may write in place (see the module docstring)."""
    out: list[Write] = []
    if node.op == "call_module":
        return [Write(node, a, f"module call {node.target}", certain=False) for a in _nodes(node)]
    if node.op == "call_method":
        name = node.target
        if _is_inplace_name(name) or name in INPLACE_DUNDERS:
            out.append(Write(node, _first_input(node), name))
        if "out" in node.kwargs:
            out.append(Write(node, node.kwargs["out"], f"{name}(out=...)"))
        return out
    if node.op != "call_function":
        return out
    target = node.target
    name = _name(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        if _subgraphs_write_inputs(node, gm):
            return [Write(node, a, f"higher-order op {name}", certain=False) for a in _nodes(node)]
        return out
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return [Write(node, a, name) for a in _schema_writes(node)]
    if target in INPLACE_OPERATORS or _is_inplace_name(name) or name in INPLACE_DUNDERS:
        out.append(Write(node, _first_input(node), name))
    inplace = node.kwargs.get("inplace", False)
    sig = _signature(target) if "inplace" not in node.kwargs else None
    if sig is not None and "inplace" in sig.parameters:
        try:
            inplace = sig.bind(*node.args, **node.kwargs).arguments.get("inplace", False)
        except TypeError:
            inplace = True  # cannot tell: assume the worst
    if inplace is not False and inplace is not None:
        out.append(Write(node, _first_input(node), f"{name}(inplace=True)"))
    if node.kwargs.get("out") is not None:
        out.append(Write(node, node.kwargs["out"], f"{name}(out=...)"))
    return out


def _nodes(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return [n for n in found if n.op != "get_attr"]


def _schema_writes(node: fx.Node) -> list:
    target = node.target
    overloads = [target] if isinstance(target, torch._ops.OpOverload) else [getattr(target, o) for o in target.overloads()]
    written = []
    for overload in overloads:
        for i, arg in enumerate(overload._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                if i < len(node.args) and not arg.kwarg_only:
                    written.append(node.args[i])
                elif arg.name in node.kwargs:
                    written.append(node.kwargs[arg.name])
    return written


def _subgraphs_write_inputs(node: fx.Node, gm: fx.GraphModule | None) -> bool:
    """Whether a higher-order op may write a tensor it receives: True unless every subgraph it
    runs is found and writes none of its own placeholders (or their aliases)."""
    subgraphs = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
    if gm is None or not subgraphs:
        return True
    for attr in subgraphs:
        sub = getattr(gm, attr.target, None)
        if not isinstance(sub, fx.GraphModule):
            return True
        inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if MutationIndex(sub).first_write(inputs) is not None:
            return True
    return False


def _overlaps(a, b) -> bool:
    return a is UNKNOWN or b is UNKNOWN or bool(a & b)


class MutationIndex:
    """The writing nodes of one graph, in order, for "is X written between A and B?" queries.

    Which nodes write is fixed when the index is built; what they write is read from their
    current arguments at query time, so rewrites made since (new nodes, replaced uses) count.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.position: dict[fx.Node, int] = {}
        self.writers: list[fx.Node] = []
        for i, node in enumerate(gm.graph.nodes):
            self.position[node] = i
            if writes(node, gm):
                self.writers.append(node)

    def first_write(self, nodes: Iterable[fx.Node], after: fx.Node | None = None, before: fx.Node | None = None) -> Write | None:
        """The first write strictly between ``after`` and ``before`` (graph start / end when None)
        to a tensor that shares memory with any of ``nodes``."""
        watched = storages(list(nodes))
        self._number(after, before)
        lo = self.position[after] if after is not None else -1
        hi = self.position[before] if before is not None else len(self.position)
        for node in self.writers:
            if not lo < self.position[node] < hi:
                continue
            for w in writes(node, self.gm):
                if _overlaps(storages(w.target), watched):
                    return w
        return None


    def comes_before(self, a: fx.Node, b: fx.Node) -> bool:
        self._number(a, b)
        return self.position[a] < self.position[b]

    def _number(self, *nodes) -> None:
        if any(n is not None and n not in self.position for n in nodes):  # nodes were inserted since
            self.position = {n: i for i, n in enumerate(self.gm.graph.nodes)}
            self.writers = [n for n in self.writers if n in self.position]

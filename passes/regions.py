"""Regions Dynamo puts in higher-order-op subgraphs, walked so the passes see every dropout.

Dynamo records ``torch.utils.checkpoint`` (and HF's gradient checkpointing) as
``tag_activation_checkpoint(wrap_body_0, *args)`` with the body a ``get_attr`` GraphModule, and
``wrap`` likewise. AOTAutograd inlines both bodies into the joint graph, so rewriting inside them
is the same rewrite as outside (the checkpoint's recomputation replays the keep sampling from the
same RNG state; tests/test_regions.py checks masks and gradients). Bodies of other higher-order
ops (cond, while_loop, autograd.Function, invoke_subgraph, ...) are not proven safe: their
dropouts are listed with the reason and left as they are.

A dropout outside a region whose only use is as the region's argument (BERT's embedding dropout
feeding layer 0's q, k, v under gradient checkpointing) is moved into the body first, so the pass
sees it next to its matmuls: dropout-then-region equals region-with-dropout-first, and inside the
region the checkpoint replays its RNG for the recomputation like any other random op.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from sparsedrop_compile.config import SparseDropConfig
from sparsedrop_compile.report import Site

from ._graph import const_number, meta_val
from ._mutation import MutationIndex, storages
from .dropout_matmul import feeds_a_matmul, parse_dropout

# Higher-order ops whose bodies AOTAutograd traces inline: rewriting inside them is safe.
REWRITABLE = {"tag_activation_checkpoint": "activation checkpoint", "wrap": "wrap"}


def hop_name(node: fx.Node) -> str | None:
    if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
        return node.target.name()
    return None


def subgraphs(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, fx.GraphModule]]:
    """(attribute name, body) of each GraphModule a higher-order op node takes as an argument."""
    found: list[tuple[str, fx.GraphModule]] = []

    def visit(arg):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            body = getattr(gm, arg.target, None)
            if isinstance(body, fx.GraphModule) and all(body is not b for _, b in found):
                found.append((arg.target, body))
        return arg

    fx.node.map_arg((node.args, node.kwargs), visit)
    return found


def rewrite_regions(gm: fx.GraphModule, config: SparseDropConfig, rewrite: Callable[[fx.GraphModule, SparseDropConfig], list[Site]],
                    region: str | None = None, prefix: str = "", change: bool = True) -> list[tuple[tuple, Site]]:
    """Run ``rewrite`` on gm and, recursively, on every higher-order-op body inside it.

    Returns (program-order key, site) pairs; a body's sites sort at the position of the op that
    calls it. Bodies that are not REWRITABLE are only looked at (``change=False``): ``rewrite``
    runs with every candidate excluded, and the sites get the reason.
    """
    kept_out = hoist_dropouts(gm) if change else {}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    by_name = {node.name: node for node in gm.graph.nodes}
    hops = [(node, hop_name(node)) for node in gm.graph.nodes if hop_name(node)]
    out = []
    for site in rewrite(gm, config):
        if not site.rewritten and site.node in kept_out:
            site.reason = kept_out[site.node]
        key = order[by_name[site.node]] if site.node in by_name else len(order)
        site.node, site.region = prefix + site.node, site.region or region
        out.append(((key,), site))
    seen: set[int] = set()
    for node, name in hops:
        for attr, body in subgraphs(gm, node):
            if id(body) in seen:
                continue
            seen.add(id(body))
            label = REWRITABLE.get(name, f"{name} body")
            inner_region = label if region is None else f"{region} > {label}"
            if name in REWRITABLE:
                inner = rewrite_regions(body, config, rewrite, inner_region, f"{prefix}{attr}.", change)
            else:
                inner = _look_only(body, config, rewrite, name, inner_region, f"{prefix}{attr}.")
            out.extend(((order[node], *key), site) for key, site in inner)
    return out


def _look_only(body: fx.GraphModule, config: SparseDropConfig, rewrite, name: str, region: str, prefix: str):
    """The sites of a body the passes must not change: every candidate excluded, with the reason."""
    reason = (f"inside the body of higher-order op {name}: rewriting there is not proven safe (only "
              f"{' and '.join(REWRITABLE)} bodies are); left as it is")
    sites = rewrite_regions(body, config.replace(exclude=(), filter_fn=lambda site: False), rewrite, region, prefix, change=False)
    blocked = "excluded by option filter_fn"
    for _, site in sites:
        if site.rewritten:  # cannot happen: every candidate was excluded
            raise AssertionError(f"sparsedrop: a site inside a {name} body was rewritten")
        # A reason may hold both sides' (input; output): the stand-in filter's part means "would be rewritten".
        parts = [r for r in (site.reason or "").split("; ") if r]
        rest = "; ".join(r for r in parts if r != blocked)
        if not parts or blocked in parts:
            site.reason = reason + (f"; {rest}" if rest else "")
        else:
            site.reason = f"{rest} (and it is inside the body of higher-order op {name})"
    return sites


def hoist_dropouts(gm: fx.GraphModule) -> dict[str, str]:
    """Move each dropout whose only use is one argument of a REWRITABLE region into its body,
    where that argument reaches a matmul the pass can fuse. Returns, by dropout node name, why a
    dropout that would have been moved was left outside."""
    kept_out: dict[str, str] = {}
    mutations = MutationIndex(gm)
    for node in list(gm.graph.nodes):
        d = parse_dropout(node)
        if d is None or d.training is not True or d.inplace is not False or const_number(d.p) is None:
            continue
        (hop, *others) = list(node.users) or [None]
        if others or hop is None or REWRITABLE.get(hop_name(hop) or "") is None or node in hop.kwargs.values():
            continue
        slots = [i for i, a in enumerate(hop.args) if a is node]
        body_attr = hop.args[0]
        if len(slots) != 1 or not (isinstance(body_attr, fx.Node) and body_attr.op == "get_attr") or len(body_attr.users) != 1:
            continue  # several slots, or a body shared with another call: leave it outside
        body = getattr(gm, body_attr.target)
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        if slots[0] - 1 >= len(placeholders) or not feeds_a_matmul(placeholders[slots[0] - 1]):
            continue
        why = _hoist_refusal(d, hop, mutations)
        if why is not None:
            kept_out[node.name] = f"its matmul consumers are inside the {REWRITABLE[hop_name(hop)]} region, but {why}; left outside"
            continue
        _move_into(gm, d, hop, body, placeholders[slots[0] - 1])
    return kept_out


def _hoist_refusal(d, hop: fx.Node, mutations: MutationIndex) -> str | None:
    """Why the dropout cannot read x at the region's call instead of where it stands."""
    w = mutations.first_write([d.x], after=d.node)
    if w is not None:
        return f"its input {d.x.name} {w.verb} {w.op} (node {w.node.name}) after it"
    x_memory = storages([d.x])
    for arg in hop.args[1:]:
        if arg is not d.node and isinstance(arg, fx.Node):
            other = storages([arg])
            if x_memory is None or other is None or x_memory & other:
                return f"another argument of the region ({arg.name}) may share memory with its input {d.x.name}"
    return None


def _move_into(gm: fx.GraphModule, d, hop: fx.Node, body: fx.GraphModule, ph: fx.Node) -> None:
    node = d.node
    first = next(n for n in body.graph.nodes if n.op != "placeholder")
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: ph if a is d.x else a)
    with body.graph.inserting_before(first):
        inner = body.graph.create_node("call_function", node.target, args, kwargs, name=node.name)
    inner.meta.update(node.meta)
    ph.replace_all_uses_with(inner, delete_user_cb=lambda user: user is not inner)
    ph.meta["example_value"] = meta_val(d.x)
    hop.args = tuple(d.x if a is node else a for a in hop.args)
    gm.graph.erase_node(node)
    body.recompile()
    gm.recompile()

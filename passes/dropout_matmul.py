"""Pattern family: ``F.dropout(x, p, training=True)`` whose output is a matmul's activation operand.

Matched consumers (reached through casts, leading-dim views, ``contiguous`` and multiplication or
division by a Python number):

    linear(d, W, b)            -> sparsedrop::linear(x, W, b)
    addmm(b, d, W) / mm(d, W)  -> sparsedrop::linear(x, W.t(), b)      (GPT-2's Conv1D)
    matmul(d, B) / d @ B / bmm -> sparsedrop::matmul(x, B)             (e.g. attention P @ V)
    einsum(eq, d, B)           -> either of the above, where eq provably is one (see _einsum.py)

The rewrite is exactly "block dropout, then the original graph": the dropout node becomes a
materialised block dropout of x (``apply_block_keep``) that every user keeps reading, and each
matched consumer is then replaced by the fused op on x with the same keep-flags. Where all users
were fused, the materialised tensor is dead and erased. Anything that cannot be shown safe keeps
the original ops and is recorded with a reason.

The fused op reads x where the matmul is and saves it for backward, so a consumer is fused only
when nothing writes in place to the dropout output, the steps on the way, or anything sharing
their memory, between the dropout and that consumer; and a site is refused outright when
anything writes to x's memory anywhere after the dropout (before the consumer the fused op would
read the new values; after it, the x saved for backward would have changed, which autograd
refuses, eager or compiled). See _mutation.py.
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from sparsedrop_compile.config import SparseDropConfig
from sparsedrop_compile.kernels.block_mask import dropout_scale, keep_shape
from sparsedrop_compile.mask_ops import materialise, sample_keep

from sparsedrop_compile.report import Site

from ._einsum import EinsumMatmul, einsum_as_matmul, is_einsum
from .compute_choice import dense_reason
from ._graph import GraphEditor, const_number, describe_consumer, excluded, known_equal, location, meta_val, module_path, scalar_hint, shape_of, size_hint, whole_drop_refusal
from ._mutation import MutationIndex, Write

log = logging.getLogger("sparsedrop_compile")

DROPOUT_TARGETS = (F.dropout, torch.dropout)
CAST_METHODS = ("to", "type_as", "float", "half", "bfloat16", "double", "type")
VIEW_METHODS = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous")
VIEW_FUNCTIONS = (torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten)
MUL_FUNCTIONS = (operator.mul, torch.mul)
DIV_FUNCTIONS = (operator.truediv, torch.div)
LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)
MATMUL_FUNCTIONS = (torch.matmul, operator.matmul)
INPUT_SITE = "sparsedrop_input_site"  # node meta of a fused op: the name of the dropout it fused


@dataclass
class Dropout:
    node: fx.Node
    x: fx.Node
    p: object  # a float, or the fx.Node of a symbolic float
    p_value: float | None
    training: object
    inplace: object


@dataclass
class Step:
    """One transparent op between the dropout and its consumer."""

    node: fx.Node
    kind: str  # "cast" | "view" | "scale"
    factor: float = 1.0
    trailing: int = 2  # trailing dims the step leaves unchanged (0, 1 or 2)


@dataclass
class Consumer:
    node: fx.Node
    kind: str  # "linear" | "addmm" | "mm" | "matmul" | "bmm" | "einsum" | "unfused"
    path: list[Step] = field(default_factory=list)
    reason: str | None = None
    einsum: EinsumMatmul | None = None  # what an einsum consumer computes

    @property
    def batched(self) -> bool:
        return self.kind in ("matmul", "bmm") or (self.einsum is not None and self.einsum.kind == "matmul")

    @property
    def factor(self) -> float:
        return path_factor(self.path)


def path_factor(path: list[Step]) -> float:
    """The product of the constants the steps multiply by."""
    out = 1.0
    for step in path:
        out *= step.factor
    return out


# --------------------------------------------------------------------------- matching
def parse_dropout(node: fx.Node) -> Dropout | None:
    if node.op != "call_function" or node.target not in DROPOUT_TARGETS:
        return None
    names = ("input", "p", "training", "inplace") if node.target is F.dropout else ("input", "p", "train")
    defaults = {"p": 0.5, "training": True, "inplace": False}
    values = dict(defaults)
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    if "train" in values:
        values["training"] = values.pop("train")
    x = values["input"]
    if not isinstance(x, fx.Node):
        return None
    p = values["p"]
    return Dropout(node, x, p, scalar_hint(p), values["training"], values["inplace"])


def _step(user: fx.Node, source: fx.Node) -> Step | None:
    """``user`` as a transparent step applied to ``source``, or None."""
    args = user.args
    if not args or args[0] is not source:
        # mul/div with the number first: c * d
        if user.op == "call_function" and user.target in MUL_FUNCTIONS and len(args) == 2 and args[1] is source:
            c = const_number(args[0])
            return None if c is None else Step(user, "scale", c)
        return None
    if any(a is source for a in list(args[1:]) + list(user.kwargs.values())):
        return None
    src, out = meta_val(source), meta_val(user)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    if user.op == "call_method" and user.target in CAST_METHODS:
        if out.device != src.device or not out.is_floating_point() or tuple(out.shape) != tuple(src.shape):
            return None
        return Step(user, "cast")
    if (user.op == "call_method" and user.target in VIEW_METHODS) or (user.op == "call_function" and user.target in VIEW_FUNCTIONS):
        trailing = 0
        for t in (1, 2):
            if src.dim() >= t and out.dim() >= t and all(known_equal(a, b) for a, b in zip(src.shape[-t:], out.shape[-t:])):
                trailing = t
        return Step(user, "view", trailing=trailing) if trailing else None
    is_mul = (user.op == "call_function" and user.target in MUL_FUNCTIONS) or (user.op == "call_method" and user.target == "mul")
    is_div = (user.op == "call_function" and user.target in DIV_FUNCTIONS) or (user.op == "call_method" and user.target == "div")
    if (is_mul or is_div) and len(args) == 2 and not user.kwargs:
        c = const_number(args[1])
        if c is None or (is_div and c == 0):
            return None
        if tuple(out.shape) != tuple(src.shape) or out.dtype != src.dtype:
            return None
        return Step(user, "scale", c if is_mul else 1.0 / c)
    return None


def _consumer_kind(user: fx.Node, source: fx.Node) -> tuple[str | None, str | None]:
    """(kind, None) if ``source`` is ``user``'s activation operand; (None, reason) if it is a
    matmul that cannot be fused; (None, None) if ``user`` is no matmul at all."""
    t, args, kwargs = user.target, user.args, user.kwargs
    if user.op == "call_function" and t in LINEAR_FUNCTIONS:
        inp = args[0] if args else kwargs.get("input")
        if inp is not source:
            return None, "dropout output is linear's weight or bias, not its input"
        return "linear", None
    if (user.op == "call_function" and t is torch.addmm) or (user.op == "call_method" and t == "addmm"):
        if len(args) < 3 or args[1] is not source or args[0] is source or args[2] is source:
            return None, "dropout output is not addmm's mat1 alone"
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3:
            return None, "addmm with beta or alpha other than 1"
        return "addmm", None
    kinds = {torch.mm: "mm", torch.bmm: "bmm", torch.matmul: "matmul", operator.matmul: "matmul"}
    methods = {"mm": "mm", "bmm": "bmm", "matmul": "matmul", "__matmul__": "matmul"}
    kind = kinds.get(t) if user.op == "call_function" else methods.get(t) if user.op == "call_method" else None
    if kind is None:
        return None, None
    if len(args) != 2 or kwargs:
        return None, f"{kind} with unexpected arguments"
    if args[0] is not source or args[1] is source:
        return None, f"dropout output is {kind}'s right operand, not its activation (left) operand"
    return kind, None


def _check_consumer(c: Consumer) -> str | None:
    """Why the fused op could not reproduce this consumer exactly, or None."""
    node, args = c.node, c.node.args
    need = 2 if c.batched else 1
    for step in c.path:
        if step.kind == "view" and step.trailing < need:
            return f"a view on the way to {c.kind} changes the operand's last {need} dim(s)"
    if c.kind == "einsum":
        return None  # shapes checked with the equation
    act = shape_of(node.args[1] if c.kind == "addmm" else (args[0] if args else node.kwargs.get("input")))
    if act is None:
        return "no shape metadata on the matmul's operands"
    if c.kind == "linear":
        weight = args[1] if len(args) > 1 else node.kwargs.get("weight")
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        w, b = shape_of(weight), shape_of(bias) if isinstance(bias, fx.Node) else None
        if w is None or len(w) != 2:
            return "linear weight is not a 2-D tensor"
        if bias is not None and (b is None or len(b) != 1):
            return "linear bias is not a 1-D tensor"
    elif c.kind in ("addmm", "mm"):
        other = shape_of(args[2] if c.kind == "addmm" else args[1])
        if len(act) != 2 or other is None or len(other) != 2:
            return f"{c.kind} operands are not 2-D"
        if c.kind == "addmm":
            b = shape_of(args[0])
            if b is None or len(b) != 1:
                return "addmm bias is not a 1-D vector (a 2-D bias is not fused)"
    else:
        other = shape_of(args[1])
        if len(act) < 2 or other is None or len(other) < 2:
            return f"{c.kind} with a 1-D operand"
    return None


def _find_consumers(d: Dropout) -> tuple[list[Consumer], list[str]]:
    """Matmul consumers reachable through transparent steps, and descriptions of other users."""
    consumers: list[Consumer] = []
    others: list[str] = []

    def walk(node: fx.Node, path: list[Step]) -> None:
        for user in node.users:
            if is_einsum(user):
                form, reason = einsum_as_matmul(user, node)
                consumers.append(Consumer(user, "einsum", list(path), reason, form))
                continue
            kind, reason = _consumer_kind(user, node)
            if kind is not None:
                consumers.append(Consumer(user, kind, list(path)))
                continue
            if reason is not None:
                consumers.append(Consumer(user, "unfused", list(path), reason))
                continue
            step = _step(user, node)
            if step is not None:
                walk(user, path + [step])
            else:
                others.append(user.op == "output" and "graph output" or _user_name(user))

    walk(d.node, [])
    return consumers, others


def _user_name(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return str(name)


# --------------------------------------------------------------------------- rewriting
def _same_layout(x_shape, a: Consumer, b: Consumer) -> bool:
    """Both consumers lay the mask over x the same way: same kind of view, or one matrix only."""
    if a.batched == b.batched:
        return True
    return len(x_shape) >= 2 and known_equal(math.prod(x_shape[:-2]), 1)


def replay_path(editor: GraphEditor, x: fx.Node, path: list[Step], before: fx.Node) -> fx.Node:
    """Apply the casts and views of ``path`` to x (views as reshape: x may be non-contiguous);
    scale steps are left to the fused op's scale."""
    cur = x
    for step in path:
        if step.kind == "scale":
            continue
        node = step.node
        if node.op == "call_method" and node.target == "contiguous":
            continue
        target = "reshape" if node.op == "call_method" and node.target == "view" else node.target
        cur = editor.call(target, (cur, *node.args[1:]), dict(node.kwargs), before=before, like=node, op=node.op)
    return cur


def scale_arg(editor: GraphEditor, d: Dropout, factor: float, before: fx.Node):
    if isinstance(d.p, fx.Node):
        return editor.call(dropout_scale, (d.p, factor), before=before, like=d.node)
    return dropout_scale(float(d.p), factor)


def _fused_node(editor: GraphEditor, c: Consumer, x_in: fx.Node, keep: fx.Node, scale, config: SparseDropConfig) -> fx.Node:
    br, bc = config.block_size
    node, args, kwargs = c.node, c.node.args, c.node.kwargs
    tail = (keep, scale, br, bc, config.kernel)
    if c.einsum is not None:
        other = c.einsum.other
        if c.einsum.kind == "linear":
            weight = editor.call(torch.t, (other,), before=node, like=node) if c.einsum.transpose else other
            return editor.call(torch.ops.sparsedrop.linear.default, (x_in, weight, None, *tail), before=node, like=node)
        if c.einsum.transpose:
            other = editor.call(torch.transpose, (other, -2, -1), before=node, like=node)
        return editor.call(torch.ops.sparsedrop.matmul.default, (x_in, other, *tail), before=node, like=node)
    if c.kind == "linear":
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        fused_args = (x_in, weight, bias, *tail)
        target = torch.ops.sparsedrop.linear.default
    elif c.kind in ("addmm", "mm"):
        w = args[2] if c.kind == "addmm" else args[1]
        bias = args[0] if c.kind == "addmm" else None
        w_t = editor.call(torch.t, (w,), before=node, like=node)
        fused_args = (x_in, w_t, bias, *tail)
        target = torch.ops.sparsedrop.linear.default
    else:
        fused_args = (x_in, args[1], *tail)
        target = torch.ops.sparsedrop.matmul.default
    return editor.call(target, fused_args, before=node, like=node)


def rewrite_dropout_matmul(gm: fx.GraphModule, config: SparseDropConfig, graph_index: int = 0, fake_mode=None) -> list[Site]:
    """Rewrite every provably safe dropout -> matmul site of ``gm`` in place; return all sites."""
    editor = GraphEditor(gm, fake_mode)
    mutations = MutationIndex(gm)
    sites: list[Site] = []
    for node in list(gm.graph.nodes):
        d = parse_dropout(node)
        if d is None:
            continue
        site = Site(graph_index, node.name, location(node), module_path(node), d.p_value, "none")
        sites.append(site)
        consumers, others = _find_consumers(d)
        site.consumers = [describe_consumer(c.kind, c.node) for c in consumers] + others
        site.kind = next((c.kind for c in consumers if c.reason is None), "none")
        site.reason = _site_refusal(d, consumers, others, config, site, mutations)
        site.kind = next((c.kind for c in consumers if c.reason is None), site.kind)
        if site.reason is not None:
            _count("refused")
            continue
        _rewrite_site(editor, d, [c for c in consumers if c.reason is None], config, site)
        # Matmul users left on the materialised dropout say why (the site is still rewritten).
        left = [f"{c.node.name} not fused: {c.reason}" for c in consumers if c.reason is not None]
        site.reason = "; ".join(([site.reason] if site.reason else []) + left) or None
    if any(s.rewritten for s in sites):
        gm.graph.lint()
        gm.recompile()
    return sites


def dropout_refusal(d: Dropout, config: SparseDropConfig) -> str | None:
    """Why this dropout is no candidate on either side of a matmul (eval, p, min_p, ...), or None."""
    if d.training is not True:
        return "training=False: dropout is the identity" if d.training is False else "training flag is not a constant"
    if d.inplace is not False:
        return "inplace dropout: rewriting it would change an aliased tensor"
    if d.p_value is None:
        return "p is neither a constant nor a symbolic float with a value"
    if d.p_value == 0:
        return "p == 0: nothing is dropped"
    if not 0 < d.p_value < 1:
        return f"p={d.p_value:g} is outside (0, 1)"
    if d.p_value < config.min_p:
        return f"p={d.p_value:g} < min_p={config.min_p:g}"
    x_val = meta_val(d.x)
    if not isinstance(x_val, torch.Tensor) or not x_val.is_floating_point():
        return "dropout input has no floating-point tensor metadata"
    return None


def _site_refusal(d: Dropout, consumers: list[Consumer], others: list[str], config: SparseDropConfig, site: Site,
                  mutations: MutationIndex) -> str | None:
    refusal = dropout_refusal(d, config)
    if refusal is not None:
        return refusal
    x_val = meta_val(d.x)
    for c in consumers:
        if c.reason is None:
            c.reason = _check_consumer(c)
    if not any(c.reason is None for c in consumers):
        return _no_consumer_reason(consumers, others)
    refusal = _mutation_refusal(d, [c for c in consumers if c.reason is None], mutations)
    if refusal is not None:
        return refusal
    fusable = [c for c in consumers if c.reason is None]
    if not fusable:  # every matmul sees a mutated dropout output
        return _no_consumer_reason(consumers, others)
    # The mask takes the first fusable consumer's layout (see _rewrite_site); count its blocks.
    site.blocks = block_count(x_val.shape, config.block_size, fusable[0].batched)
    br, bc = config.block_size
    too_few = whole_drop_refusal(d.p_value, site.blocks, config.max_drop_all, f"{br}x{bc} block", "block_size")
    return too_few or excluded(config.exclude, config.filter_fn, site, [module_path(c.node) for c in fusable])


def block_count(shape, block: tuple[int, int], batched: bool) -> int | None:
    """Mask blocks over the whole activation, at the sizes the graph was traced with."""
    hints = [size_hint(s) for s in shape]
    if any(h is None for h in hints):
        return None
    return math.prod(keep_shape(hints, block, batched))


def _no_consumer_reason(consumers: list[Consumer], others: list[str]) -> str:
    """Why no user can be fused, naming the users as they are."""
    reasons = sorted({c.reason for c in consumers if c.reason})
    names = ", ".join(dict.fromkeys(others))
    if not reasons:
        return f"no matmul consumer: users are {names}" if names else "no matmul consumer: the dropout output is unused"
    return "; ".join(reasons) + (f"; other users: {names}" if names else "")


def _mutation_refusal(d: Dropout, fusable: list[Consumer], mutations: MutationIndex) -> str | None:
    """Refuse the site if x's memory is written after the dropout; mark each consumer whose
    dropout output (or path) is written before it. See the module docstring."""
    w = mutations.first_write([d.x], after=d.node)
    if w is not None:
        who = _written(w, {d.x: f"the dropout input {d.x.name}"}, f"shares memory with the dropout input {d.x.name}")
        hit = next((c for c in fusable if mutations.comes_before(w.node, c.node)), None)
        where = (f"between the dropout and {hit.kind}" if hit is not None
                 else "after the dropout and its matmul (the fused op would save x for backward, which needs x as it was)")
        return f"{who} {w.verb} {w.op} (node {w.node.name}) {where}"
    for c in fusable:
        path = [step.node for step in c.path]
        w = mutations.first_write([d.node, *path], after=d.node, before=c.node)
        if w is not None:
            names = {d.node: "the dropout output", **{n: f"{n.name} (on the way to {c.kind})" for n in path}}
            who = _written(w, names, "shares memory with the dropout output")
            c.reason = f"{who} {w.verb} {w.op} (node {w.node.name}) between the dropout and {c.kind}"
    return None


def _written(w: Write, names: dict, relation: str) -> str:
    if isinstance(w.target, fx.Node):
        return names.get(w.target) or f"{w.target.name} ({relation})"
    return f"an operand (may {relation.replace('shares', 'share')})"


def _rewrite_site(editor: GraphEditor, d: Dropout, fusable: list[Consumer], config: SparseDropConfig, site: Site) -> None:
    x_shape = tuple(meta_val(d.x).shape)
    layout = fusable[0]
    same = [c for c in fusable if _same_layout(x_shape, layout, c)]
    for c in fusable:
        if c not in same:
            c.reason = "views the activation with another block layout than the first consumer; reads the materialised mask"
    br, bc = config.block_size
    keep = editor.call(sample_keep, (d.x, d.p, br, bc, layout.batched), before=d.node, like=d.node)
    scale0 = scale_arg(editor, d, 1.0, d.node)
    dropped = editor.call(materialise, (d.x, keep, scale0, br, bc, layout.batched), before=d.node, like=d.node)
    d.node.replace_all_uses_with(dropped)
    editor.graph.erase_node(d.node)
    site.rewritten, site.side, site.block_size = True, "input", config.block_size
    out = meta_val(layout.node)
    dense = dense_reason(out.numel(), x_shape[-1], d.p_value, out.device.type == "cuda", config) if isinstance(out, torch.Tensor) else None
    if dense is not None:  # the matmuls read the materialised block dropout (compute_choice.py)
        site.compute, site.reason = "dense", dense
        _count("dense_input_side")
        return
    site.compute = "sparse"
    chain_nodes: list[fx.Node] = []
    for c in same:
        x_in = replay_path(editor, d.x, c.path, c.node)
        scale = scale_arg(editor, d, c.factor, c.node)
        fused = _fused_node(editor, c, x_in, keep, scale, config)
        fused.meta[INPUT_SITE] = d.node.name  # the output side may fuse this matmul's output too
        c.node.replace_all_uses_with(fused)
        editor.graph.erase_node(c.node)
        chain_nodes.extend(step.node for step in c.path)
        _count(f"{c.kind}_fused")
    editor.erase_if_unused([dropped, *chain_nodes])
    log.debug("sparsedrop: fused %s (p=%s) into %d consumer(s)", site.location, site.p, len(same))


def _count(name: str) -> None:
    counters["sparsedrop"][name] += 1


def feeds_a_matmul(node: fx.Node) -> bool:
    """Whether ``node``'s value reaches a matmul the pass could fuse, as its activation operand
    (used to decide whether a dropout is worth moving next to its consumers)."""
    stand_in = Dropout(node, node, 0.5, 0.5, True, False)
    consumers, _ = _find_consumers(stand_in)
    return any(c.reason is None and _check_consumer(c) is None for c in consumers)

"""Pattern family: ``F.dropout(y, p, training=True)`` whose input y is a matmul's output (residual
dropout: BERT's ``dropout(dense(x))``, GPT-2's ``resid_dropout(c_proj(x))``, T5's ``dropout(o(...))``).

Matched producers (reached back from the dropout through casts, views that keep the last dim, or
the last two for a batched matmul, ``contiguous`` and multiplication or division by a Python
number):

    linear(x, W, b)            -> sparsedrop::linear_out(x, W, b)
    addmm(b, x, W) / mm(x, W)  -> sparsedrop::linear_out(x, W.t(), b)
    matmul(a, B) / a @ B / bmm -> sparsedrop::matmul_out(a, B)
    sparsedrop::linear / ::matmul, i.e. a matmul whose input dropout the input-side pass
    (dropout_matmul.py, which runs first) already fused: the same ops with that op's keep as
    ``keep_in``, so the matmul skips dropped blocks on both sides (T5's dropout -> wo -> dropout)

The mask lies over y viewed as (rows, N) for linear (all leading dims are rows), per matrix for a
batched matmul. The fused op computes only y's kept tiles, bias included and scaled by 1/(1-p)
(times the constants on the way), and zeros elsewhere: exactly ``dropout(y)`` with block flags.
Every user of the dropout's output reads that one tensor.

Safety: the fused op stands where the matmul stood and reads x, W and b there, and saves x and
W for backward as the matmul did, so writes to them act on both graphs alike. What changes is y,
which no longer exists in full: a site is refused when y, or a step on the way to the dropout,
has any other user (they need y in full), which includes anything writing it in place; such a
write is named in the reason. The dropout's output is a fresh tensor in both graphs and the op
saves nothing of it, so writes to it after the dropout are safe.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from sparsedrop_compile.config import SparseDropConfig
from sparsedrop_compile.mask_ops import materialise, sample_output_keep
from sparsedrop_compile.report import Site

from ._graph import (
    GraphEditor,
    describe_consumer,
    excluded,
    location,
    meta_val,
    module_path,
    shape_of,
    whole_drop_refusal,
)
from ._mutation import MutationIndex
from .compute_choice import dense_reason
from .dropout_matmul import (
    INPUT_SITE,
    LINEAR_FUNCTIONS,
    VIEW_FUNCTIONS,
    VIEW_METHODS,
    Dropout,
    Step,
    _step,
    _user_name,
    block_count,
    dropout_refusal,
    parse_dropout,
    path_factor,
    replay_path,
    scale_arg,
)

log = logging.getLogger("sparsedrop_compile")

_MATMULS = {torch.mm: "mm", torch.bmm: "bmm", torch.matmul: "matmul", operator.matmul: "matmul"}
_MATMUL_METHODS = {"mm": "mm", "bmm": "bmm", "matmul": "matmul", "__matmul__": "matmul"}
NO_PRODUCER = "no matmul producer"


@dataclass
class Producer:
    node: fx.Node
    kind: str  # "linear" | "addmm" | "mm" | "matmul" | "bmm"
    path: list[Step] = field(default_factory=list)  # steps from the matmul's output to the dropout
    fused_input: bool = False  # the input-side pass already made it sparsedrop::linear / ::matmul

    @property
    def batched(self) -> bool:
        return self.kind in ("matmul", "bmm")

    @property
    def factor(self) -> float:
        return path_factor(self.path)


# --------------------------------------------------------------------------- matching
def _producer_kind(node: fx.Node) -> tuple[str | None, bool]:
    """(kind, fused by the input side) if ``node`` is a matmul whose output the pass can block-drop."""
    t = node.target
    if node.op == "call_function":
        if t is torch.ops.sparsedrop.linear.default:
            return "linear", True
        if t is torch.ops.sparsedrop.matmul.default:
            return "matmul", True
        if t in LINEAR_FUNCTIONS:
            return "linear", False
        if t is torch.addmm:
            return "addmm", False
        return _MATMULS.get(t), False
    if node.op == "call_method":
        return ("addmm" if t == "addmm" else _MATMUL_METHODS.get(t)), False
    return None, False


def _find_producer(d: Dropout) -> tuple[Producer | None, str | None]:
    """The matmul the dropout's input comes from, through transparent steps, or why there is none."""
    path: list[Step] = []
    node = d.x
    while True:
        kind, fused = _producer_kind(node)
        if kind is not None:
            return Producer(node, kind, path, fused), None
        sources = [a for a in node.args[:2] if isinstance(a, fx.Node)] if node.op in ("call_function", "call_method") else []
        step = next(((s, src) for src in sources if (s := _step(node, src)) is not None), None)
        if step is None and _is_view(node) and sources:
            step = (Step(node, "view", trailing=0), sources[0])  # refused with the reason in _check_producer
        if step is None:
            what = "a graph input" if node.op == "placeholder" else "a parameter or buffer" if node.op == "get_attr" else _user_name(node)
            return None, f"{NO_PRODUCER}: its input comes from {what}"
        path.insert(0, step[0])
        node = step[1]


def _is_view(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in VIEW_METHODS) or (node.op == "call_function" and node.target in VIEW_FUNCTIONS)


def _check_producer(pr: Producer) -> str | None:
    """Why the output-side op could not reproduce this matmul exactly, or None."""
    need = 2 if pr.batched else 1
    for step in pr.path:
        if step.kind == "view" and step.trailing < need:
            return f"a view between {pr.kind} and the dropout changes the output's last {need} dim(s)"
    args, kwargs = pr.node.args, pr.node.kwargs
    if pr.fused_input:
        return None  # the input-side pass checked its operands
    if pr.kind == "linear":
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if shape_of(weight) is None or len(shape_of(weight)) != 2:
            return "linear weight is not a 2-D tensor"
        if bias is not None and (shape_of(bias) is None or len(shape_of(bias)) != 1):
            return "linear bias is not a 1-D tensor"
        return None
    if pr.kind == "addmm":
        if len(args) != 3 or kwargs:
            return "addmm with beta, alpha or other extra arguments"
        if shape_of(args[0]) is None or len(shape_of(args[0])) != 1:
            return "addmm bias is not a 1-D vector (a 2-D bias is not fused)"
    elif len(args) != 2 or kwargs:
        return f"{pr.kind} with unexpected arguments"
    shapes = [shape_of(a) for a in args[-2:]]
    low = 2 if pr.kind in ("addmm", "mm") else None
    if any(s is None or len(s) < 2 or (low is not None and len(s) != low) for s in shapes):
        return f"{pr.kind} operands are not " + ("2-D" if low else "at least 2-D")
    return None


def _chain_refusal(d: Dropout, pr: Producer, mutations: MutationIndex) -> str | None:
    """y (and each step after it) must have no user but the next step: they would need y in full."""
    chain = [pr.node, *(s.node for s in pr.path)]
    w = mutations.first_write(chain, after=pr.node, before=d.node)
    if w is not None:
        who = w.target.name if isinstance(w.target, fx.Node) else "an operand"
        return f"{who} (on the way from {pr.kind} to the dropout) {w.verb} {w.op} (node {w.node.name}); the dropout must see the matmul's output"
    for node, nxt in zip(chain, chain[1:] + [d.node]):
        others = [u for u in node.users if u is not nxt]
        if others:
            names = ", ".join(dict.fromkeys("graph output" if u.op == "output" else _user_name(u) for u in others))
            what = "the matmul output" if node is pr.node else f"{node.name} (on the way to the dropout)"
            return f"{what} has other users ({names}) that need it in full"
    return None


# --------------------------------------------------------------------------- the pass
def rewrite_matmul_dropout(gm: fx.GraphModule, config: SparseDropConfig, graph_index: int = 0, fake_mode=None,
                           sites: list[Site] | None = None) -> list[Site]:
    """Rewrite every provably safe matmul -> dropout site of ``gm`` in place.

    ``sites`` are the input-side pass's rows for this graph: a dropout it left is looked at here
    and its row completed (a refusal then gives both sides' reasons); a row is added for a
    dropout it did not list. Returns all rows.
    """
    sites = list(sites or [])
    by_node = {s.node: s for s in sites}
    editor = GraphEditor(gm, fake_mode)
    mutations = MutationIndex(gm)
    changed = False
    for node in list(gm.graph.nodes):
        d = parse_dropout(node)
        if d is None:
            continue
        site = by_node.get(node.name)
        if site is None:
            site = Site(graph_index, node.name, location(node), module_path(node), d.p_value, "none")
            sites.append(site)
        if site.rewritten:
            continue
        pr, reason = _site_refusal(d, config, site, mutations)
        if reason is not None:
            # A dropout that feeds a matmul (kind set by the input side) and has none before it: the
            # input side's reason says it all.
            if not (reason.startswith(NO_PRODUCER) and site.kind != "none"):
                site.reason = _both_reasons(site.reason, reason)
            counters["sparsedrop"]["refused_output_side"] += 1
            continue
        _rewrite(editor, d, pr, config, site, by_node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return sites


def _both_reasons(input_side: str | None, output_side: str) -> str:
    if not input_side or input_side == output_side:
        return output_side
    return f"{input_side}; {output_side}"


def _site_refusal(d: Dropout, config: SparseDropConfig, site: Site, mutations: MutationIndex) -> tuple[Producer | None, str | None]:
    refusal = dropout_refusal(d, config)
    if refusal is not None:
        return None, refusal
    if not config.output_side:
        return None, "output side off (option output_side=False)"
    pr, refusal = _find_producer(d)
    if pr is None:
        return None, refusal
    refusal = _check_producer(pr) or _chain_refusal(d, pr, mutations)
    if refusal is not None:
        return None, refusal
    if isinstance(d.p, fx.Node) and not mutations.comes_before(d.p, pr.node):
        return None, f"p (node {d.p.name}) is computed after {pr.kind}, where the mask would be drawn"
    y = meta_val(pr.node)
    if not isinstance(y, torch.Tensor):
        return None, "no shape metadata on the matmul's output"
    site.blocks = block_count(y.shape, config.block_size, pr.batched)
    br, bc = config.block_size
    too_few = whole_drop_refusal(d.p_value, site.blocks, config.max_drop_all, f"{br}x{bc} block", "block_size", "matmul output")
    if too_few is not None:
        return None, too_few
    # filter_fn sees the row as it would be if rewritten.
    kind, producer, side = site.kind, site.producer, site.side
    site.kind, site.producer, site.side = pr.kind, describe_consumer(pr.kind, pr.node), "both" if pr.fused_input else "output"
    refusal = excluded(config.exclude, config.filter_fn, site, [module_path(pr.node)])
    if refusal is not None:
        site.kind, site.producer, site.side = kind, producer, side
        return None, refusal
    return pr, None


def _rewrite(editor: GraphEditor, d: Dropout, pr: Producer, config: SparseDropConfig, site: Site, by_node: dict) -> None:
    node, args, kwargs = pr.node, pr.node.args, pr.node.kwargs
    br, bc = config.block_size
    scale = scale_arg(editor, d, pr.factor, node)
    if pr.fused_input:
        # sparsedrop::linear(x, W, b, keep, scale, ...) / ::matmul(a, B, keep, scale, ...): keep it as keep_in.
        lhs, other, bias = args[0], args[1], args[2] if pr.kind == "linear" else None
        keep_in, scale_in = (args[3], args[4]) if pr.kind == "linear" else (args[2], args[3])
    else:
        keep_in, scale_in = None, 1.0
        if pr.kind == "linear":
            lhs = args[0] if args else kwargs["input"]
            other = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
        elif pr.kind in ("addmm", "mm"):
            lhs, w = (args[1], args[2]) if pr.kind == "addmm" else (args[0], args[1])
            bias = args[0] if pr.kind == "addmm" else None
            other = editor.call(torch.t, (w,), before=node, like=node)
        else:
            lhs, other, bias = args[0], args[1], None
    batched = pr.kind in ("matmul", "bmm")
    keep = editor.call(sample_output_keep, (lhs, other, d.p, br, bc, batched), before=node, like=d.node)
    site.rewritten, site.reason, site.block_size = True, None, config.block_size
    y, x = meta_val(node), meta_val(lhs)
    dense = (dense_reason(y.numel(), x.shape[-1], d.p_value, y.device.type == "cuda", config)
             if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else None)
    if dense is not None:  # the same flags over y, on the matmul's own output (compute_choice.py)
        site.compute, site.reason, site.side = "dense", dense, "output"  # not "both": y is computed in full
        produced = editor.call(materialise, (node, keep, scale, br, bc, batched), before=d.node, like=node)
        counters["sparsedrop"]["dense_output_side"] += 1
    else:
        site.compute = "sparse"
        if batched:
            fused_args = (lhs, other, keep, scale, br, bc, config.kernel, keep_in, scale_in)
            produced = editor.call(torch.ops.sparsedrop.matmul_out.default, fused_args, before=node, like=node)
        else:
            fused_args = (lhs, other, bias, keep, scale, br, bc, config.kernel, keep_in, scale_in)
            produced = editor.call(torch.ops.sparsedrop.linear_out.default, fused_args, before=node, like=node)
        counters["sparsedrop"][f"{pr.kind}_out_fused"] += 1
        if pr.fused_input:
            counters["sparsedrop"]["both_sides_fused"] += 1
            input_site = by_node.get(node.meta.get(INPUT_SITE))
            if input_site is not None:
                input_site.side = "both"
    out = replay_path(editor, produced, pr.path, d.node)
    d.node.replace_all_uses_with(out)
    editor.graph.erase_node(d.node)
    editor.erase_if_unused([node, *(s.node for s in pr.path)])  # the matmul stays where it feeds materialise
    log.debug("sparsedrop: fused %s (p=%s) into the output of %s", site.location, site.p, site.producer)

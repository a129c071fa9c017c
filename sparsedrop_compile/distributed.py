"""The backend under DistributedDataParallel and FSDP2: what each engine hands the backend, and why.

DDP. ``torch.compile(DDP(model))`` graph-breaks in DDP's own forward (its logger, and
``_inside_ddp_forward``, which Dynamo skips), then compiles the wrapped module's forward as a
frame of its own, inside ``_inside_ddp_forward``. There Dynamo's DDPOptimizer
(``torch._dynamo.config.optimize_ddp``, on by default, on any device and process-group backend)
takes the whole graph, cuts it at DDP's gradient-bucket boundaries (so all-reduces overlap the
backward) and hands the backend one piece at a time. A bucket fills at a node that reads a
parameter, so the cut falls right before such a node: between a dropout and its ``linear`` is
where it lands whenever that weight fills a bucket. The backend, seeing only a piece, would find
the dropout's output leaving the graph and its matmul in the next piece.

``install_ddp_hook`` wraps ``DDPOptimizer.compile_fn`` so that, when the backend it splits for is
this one, the passes run on the whole graph first; the split then cuts the rewritten graph (the
fused ops read the weights as the matmuls did, so the buckets are the same) and the pieces are
compiled without running the passes again. Other backends are left exactly as they were. If the
hook is not active, a split site is listed with the reason (``split_reason``).

FSDP2. ``fully_shard`` runs its pre- and post-forward hooks outside Dynamo (they are
``torch._dynamo.disable``d), so each unit's forward is compiled as graphs of its own. A dropout and
its matmul in one unit are rewritten; a dropout whose output leaves its unit (the next unit's or
the parent's matmul reads it) cannot be, and is listed with the unit's name (``split_reason``).
"""
from __future__ import annotations

import contextvars
import functools
import logging
from typing import Any

import torch
from torch import fx

log = logging.getLogger("sparsedrop_compile")

# Set while the hook calls the backend on the whole graph: the backend then only rewrites.
_whole_graph: contextvars.ContextVar = contextvars.ContextVar("sparsedrop_ddp_whole_graph", default=False)

# node.meta key: the graph this node is in was rewritten whole before DDPOptimizer split it. The
# value is the graph's index (report numbering). split_module copies node metadata to the pieces.
MARK = "sparsedrop_rewritten_before_split"
FIRST = "sparsedrop_first_node"

DDP_PIECE = "DDPOptimizer intentional graph-break"  # the compile reason DDPOptimizer gives its pieces


def whole_graph_pass() -> bool:
    """True while the DDP hook has the backend rewrite the whole graph (and compile nothing)."""
    return _whole_graph.get()


def mark_rewritten(gm: fx.GraphModule, index: int) -> None:
    """Mark every node of a graph the passes ran on whole, so its pieces are recognised."""
    first = True
    for node in gm.graph.nodes:
        node.meta[MARK] = index
        if first and node.op not in ("placeholder", "output"):
            node.meta[FIRST] = True
            first = False


def piece_of(gm: fx.GraphModule) -> tuple[int, bool] | None:
    """(index of the whole graph, whether this piece holds its first op) if gm is a piece of a
    graph the passes already rewrote (or that graph itself, unsplit), else None."""
    index = None
    first = False
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if MARK in node.meta:
            index = node.meta[MARK]
            first = first or node.meta.get(FIRST, False)
    return None if index is None else (index, first)


def is_sparsedrop_backend(fn: Any) -> bool:
    """Whether a compiler fn (as Dynamo wraps it: WrapBackendDebug, torch.compile's options
    wrapper; or functools.partial, functools.wraps) is this package's backend or one that calls it
    (explain's)."""
    seen: set[int] = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        if getattr(fn, "_sparsedrop_backend", False):
            return True
        fn = (getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
              or (fn.func if isinstance(fn, functools.partial) else None) or getattr(fn, "__wrapped__", None))
    return False


def install_ddp_hook() -> bool:
    """Wrap ``DDPOptimizer.compile_fn`` (once) so this backend rewrites the whole graph before the
    split. Returns whether the hook is active."""
    try:
        from torch._dynamo.backends.distributed import DDPOptimizer
    except ImportError:  # a torch built without distributed support: no DDPOptimizer to meet
        return False
    original = getattr(DDPOptimizer, "compile_fn", None)
    if original is None:
        log.warning("sparsedrop: torch's DDPOptimizer has no compile_fn; under DDP, sites cut by its bucket "
                    "splits are left element-wise (listed with the reason)")
        return False
    if getattr(original, "_sparsedrop_hook", False):
        return True

    @functools.wraps(original)
    def compile_fn(self, gm: fx.GraphModule, example_inputs, **configs):
        backend = getattr(self, "backend_compile_fn", None)
        if is_sparsedrop_backend(backend) and piece_of(gm) is None:
            token = _whole_graph.set(True)
            try:
                backend(gm, example_inputs, **configs)  # rewrites gm in place, compiles nothing
            finally:
                _whole_graph.reset(token)
        return original(self, gm, example_inputs, **configs)

    compile_fn._sparsedrop_hook = True
    DDPOptimizer.compile_fn = compile_fn
    return True


def hook_active() -> bool:
    try:
        from torch._dynamo.backends.distributed import DDPOptimizer
    except ImportError:
        return False
    return getattr(getattr(DDPOptimizer, "compile_fn", None), "_sparsedrop_hook", False)


def fsdp_units(root: torch.nn.Module | None) -> list[str]:
    """Names (in root.named_modules()) of the FSDP2 units in root, '' for root itself."""
    if root is None:
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [name for name, module in root.named_modules() if isinstance(module, FSDPModule)]


def split_reason(gm: fx.GraphModule, module_path: str, units: list[str]) -> str:
    """Why a dropout whose output leaves this graph (a graph output) has no matmul here to fuse
    with: the engine or graph break that ended the graph, and what to do."""
    why = getattr(gm, "compile_subgraph_reason", None)
    text = getattr(why, "reason", "") or ""
    if DDP_PIECE in text:
        return ("Dynamo's DDPOptimizer (torch._dynamo.config.optimize_ddp) cut the DDP model's graph at a gradient-bucket "
                "boundary right after this dropout, so its matmul is in the next piece; sparsedrop's DDP hook, which "
                "rewrites the whole graph before the cut, was not active"
                + (" (it acts for the sparsedrop backend, also through functools.wraps or functools.partial, not for "
                   "other wrappers of it)" if hook_active() else " (torch's DDPOptimizer.compile_fn was not found)")
                + ". torch._dynamo.config.optimize_ddp = False keeps the graph whole")
    broke = getattr(why, "graph_break", False)
    unit = _unit_of(module_path, units)
    engine = "FSDP2 runs its hooks outside Dynamo, so each fully_shard unit's forward is compiled as graphs of its own"
    todo = "fully_shard a module that holds both the dropout and its matmul (e.g. the transformer block, not a Linear)"
    # FSDP2's hooks are torch._dynamo.disable'd: a graph ends at the break before a call into a
    # unit, or where a unit's forward returns.
    if unit is not None and broke and "`disable`" in text:
        return (f"the graph ends at a call into an FSDP2 unit ({engine}); a matmul there cannot be fused with this "
                f"dropout (in unit {unit or '<root>'}): {todo}")
    if unit is not None and not broke:
        return (f"this graph, part of FSDP2 unit {unit or '<root>'}'s forward ({engine}), returns the dropout's output; "
                f"a matmul in another unit cannot be fused with it: {todo}")
    if broke:
        first = text.strip().splitlines()[0][:160] if text.strip() else "unknown reason"
        return f"the graph ends at a graph break ({first}); a matmul after the break is in another graph and cannot be fused"
    return "the compiled function returns it; a matmul that reads it later is in another graph and cannot be fused"


def _unit_of(path: str, units: list[str]) -> str | None:
    """The innermost FSDP2 unit whose subtree holds the module at ``path``."""
    inside = [u for u in units if u == "" or path == u or path.startswith(u + ".")]
    return max(inside, key=len) if inside else None

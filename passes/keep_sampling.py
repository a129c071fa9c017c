"""After the rewrites: draw the keep flags of a graph's sites in one launch, not one per site.

Each rewritten site samples its keep flags where its dropout was (``mask_ops.sample_keep``,
``sample_output_keep``, ``sample_tile_keep``: ``torch.rand(keep shape) >= p``). Inductor makes a
kernel of each draw, one launch per site and step; at a fine-tuning batch a step is bound by the
host's launches, so BERT-base's 37 sites spent 37 launches on flags of a few hundred bytes each.

Here the static-shape draws of one graph with the same p and device become one node,
``draw_keeps``: a single ``torch.rand(total) >= p`` (one kernel) whose consecutive slices,
viewed as each site's keep shape, are the sites' flags (views, no copies). It stands where the
first of them stood. The flags are the same draws as the separate ones in graph order (a
uniform draw of n1 + n2 values is the draw of n1 then of n2 on the CPU generator; on CUDA and
under Inductor a different, equally random stream). Draws with symbolic sizes keep their own
node: slicing at symbolic offsets would guard on them. A checkpointed region's body is a graph
of its own, so its recomputation replays its own draw.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict

import torch
import torch.fx as fx
from torch import Tensor

from sparsedrop_compile.kernels.block_mask import keep_shape, padded
from sparsedrop_compile.kernels.flash_attention import attention_keep_shape
from sparsedrop_compile.mask_ops import sample_keep, sample_output_keep, sample_tile_keep
from sparsedrop_compile.ops import matmul_output_shape

from ._graph import GraphEditor, meta_val


def draw_keeps(shapes: tuple[tuple[int, ...], ...], p: float, device: torch.device) -> tuple[Tensor, ...]:
    """The keep flags of several sites from one draw: consecutive slices of ``rand(total) >= p``."""
    sizes = [math.prod(shape) for shape in shapes]
    flags = torch.rand(sum(sizes), device=device) >= p
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flags[start:start + size].view(shape))
        start += size
    return tuple(out)


# The samplers the passes insert, and how many tensor arguments each takes first.
_SAMPLERS = {sample_keep: 1, sample_output_keep: 2, sample_tile_keep: 2}


def _draw_spec(node: fx.Node) -> tuple[tuple[int, ...], float, torch.device] | None:
    """(keep shape, p, device) of a sampling node whose tensors' sizes are all plain ints, else None."""
    n_tensors = _SAMPLERS.get(node.target) if node.op == "call_function" else None
    if n_tensors is None:
        return None
    values = [meta_val(a) for a in node.args]
    tensors, rest = values[:n_tensors], values[n_tensors:]
    if not all(isinstance(t, Tensor) and all(type(n) is int for n in t.shape) for t in tensors):
        return None  # symbolic sizes: slicing the shared draw at their offsets would guard
    p = rest[0]
    if type(p) is not float:
        return None
    if node.target is sample_keep:
        (x,), (_, br, bc, batched) = tensors, rest
        shape = keep_shape(x.shape, (br, bc), batched)
    elif node.target is sample_output_keep:
        (x, other), (_, br, bc, batched) = tensors, rest
        shape = keep_shape(matmul_output_shape(x.shape, other.shape, batched), (br, bc), batched)
    else:
        (x, k), (_, bq, bk) = tensors, rest
        shape = attention_keep_shape(x.shape, k.shape, (bq, bk))
    return tuple(int(n) for n in padded(shape)), p, x.device


def draw_keeps_together(gm: fx.GraphModule, fake_mode=None) -> tuple[int, int]:
    """Merge the graph's static-shape keep draws per (p, device): (draws merged, draws they became)."""
    groups: dict[tuple, list[tuple[fx.Node, tuple[int, ...]]]] = defaultdict(list)
    for node in gm.graph.nodes:
        spec = _draw_spec(node)
        if spec is not None:
            shape, p, device = spec
            groups[(p, device)].append((node, shape))
    editor = GraphEditor(gm, fake_mode)
    merged = draws = 0
    for (p, device), members in groups.items():
        if len(members) < 2:
            continue
        first = members[0][0]
        combined = editor.call(draw_keeps, (tuple(shape for _, shape in members), p, device), before=first, like=first)
        items = [editor.call(operator.getitem, (combined, i), before=first, like=node) for i, (node, _) in enumerate(members)]
        for item, (node, _) in zip(items, members):
            node.replace_all_uses_with(item)
            gm.graph.erase_node(node)
        merged += len(members)
        draws += 1
    if merged:
        gm.recompile()
    return merged, draws

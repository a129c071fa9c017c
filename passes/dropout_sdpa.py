"""Pattern family: dropout inside fused attention.

``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=p > 0, is_causal, scale, enable_gqa)``
-> ``sparsedrop::attention`` with per-tile keep-flags: each (query block x key block) tile of the
attention probabilities is kept (scaled by 1/(1-p)) or dropped whole; the flash-attention kernel
skips the P@V work of dropped tiles. Variants the kernel does not cover stay on SDPA.

In-place writes need no check here (unlike dropout -> matmul, see _mutation.py): the fused op
reads q, k, v and the mask where SDPA stood (the keep sampling before it reads only shapes), and
saves them for backward as SDPA's own kernels do, so a write before or after acts on both alike.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import guard_int

from sparsedrop_compile.config import SparseDropConfig
from sparsedrop_compile.kernels.flash_attention import HEAD_DIM_RULE, supported_head_dim
from sparsedrop_compile.report import Site

from ._graph import GraphEditor, attention_tiles_refusal, excluded, location, meta_val, module_path, scalar_hint, shape_of, size_hint

log = logging.getLogger("sparsedrop_compile")

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _sdpa_args(node: fx.Node) -> dict | None:
    if node.op != "call_function" or node.target not in SDPA_TARGETS:
        return None
    values = dict(SDPA_DEFAULTS)
    values.update(zip(SDPA_ARGS, node.args))
    values.update(node.kwargs)
    return values


def static_head_dim(d):
    """The head dim as an int. Under dynamic=True it is a SymInt: one whose value is a head dim the
    kernel covers (``supported_head_dim``) is specialised (a guard on it; the kernel is compiled
    per head dim anyway)."""
    if isinstance(d, torch.SymInt) and supported_head_dim(d.node.hint):
        return guard_int(d)
    return d if isinstance(d, int) else None


def _refusal(node: fx.Node, a: dict, config: SparseDropConfig) -> str | None:
    p = scalar_hint(a["dropout_p"])
    if p is None:
        return "dropout_p is not a constant"
    if p == 0:
        return "dropout_p == 0: no dropout (eval, or attention dropout off)"
    if not 0 < p < 1:
        return f"dropout_p={p:g} is outside (0, 1)"
    if p < config.min_p:
        return f"p={p:g} < min_p={config.min_p:g}"
    if not config.attention:
        return "attention rewriting is off (option attention=False)"
    if not hasattr(torch.ops.sparsedrop, "attention"):
        return "the sparsedrop::attention op is not registered in this install"
    for name in ("is_causal", "enable_gqa"):
        if not isinstance(a[name], bool):
            return f"{name} is not a constant"
    if a["scale"] is not None and scalar_hint(a["scale"]) is None:
        return "scale is not a number"
    q, k, v = (shape_of(a[n]) for n in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return "no shape metadata on q, k, v"
    if not (len(q) == len(k) == len(v) == 4):
        return f"q, k, v must be 4-D (batch, heads, seq, dim); got {len(q)}-D"
    q_d, k_d, v_d = (static_head_dim(t[-1]) for t in (q, k, v))
    if not (supported_head_dim(q_d) and k_d == q_d and v_d == q_d):
        return (f"head dims q={q[-1]}, k={k[-1]}, v={v[-1]}: tile-dropout attention takes head dims that are "
                f"{HEAD_DIM_RULE}, the same for q, k and v; left on SDPA")
    mask = a["attn_mask"]
    if mask is not None:
        m = shape_of(mask)
        if m is None or len(m) not in (2, 3, 4):
            return "attn_mask is not a 2-, 3- or 4-D tensor"
    out = meta_val(node)
    if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type == "cuda":
        return "float32 attention: the Triton kernel is fp16/bf16 (use autocast); left on SDPA"
    return None


def _too_few_tiles(a: dict, config: SparseDropConfig, site: Site) -> str | None:
    q, k = ([size_hint(s) for s in shape_of(a[n])] for n in ("query", "key"))
    return attention_tiles_refusal(site, config, q, k)


def rewrite_dropout_sdpa(gm: fx.GraphModule, config: SparseDropConfig, graph_index: int = 0, fake_mode=None) -> list[Site]:
    editor = GraphEditor(gm, fake_mode)
    sites: list[Site] = []
    for node in list(gm.graph.nodes):
        a = _sdpa_args(node)
        if a is None:
            continue
        p = scalar_hint(a["dropout_p"])
        if p == 0 and a["dropout_p"] is not None and not isinstance(a["dropout_p"], fx.Node):
            continue  # attention without dropout is no dropout site
        site = Site(graph_index, node.name, location(node), module_path(node), p, "attention", ["P @ V inside SDPA"])
        sites.append(site)
        site.reason = _refusal(node, a, config) or _too_few_tiles(a, config, site) or excluded(config.exclude, config.filter_fn, site, [])
        if site.reason is not None:
            counters["sparsedrop"]["refused"] += 1
            continue
        _rewrite(editor, node, a, config)
        site.rewritten = True
        site.block_size = config.attention_block
        counters["sparsedrop"]["attention_fused"] += 1
    if any(s.rewritten for s in sites):
        gm.graph.lint()
        gm.recompile()
    return sites


def _rewrite(editor: GraphEditor, node: fx.Node, a: dict, config: SparseDropConfig) -> None:
    from sparsedrop_compile.mask_ops import sample_tile_keep

    bq, bk = config.attention_block
    q, k, v = a["query"], a["key"], a["value"]
    keep = editor.call(sample_tile_keep, (q, k, a["dropout_p"], bq, bk), before=node, like=node)
    args = (q, k, v, a["attn_mask"], keep, a["dropout_p"], a["is_causal"], a["scale"], a["enable_gqa"], bq, bk, config.attention_mode, config.kernel)
    fused = editor.call(torch.ops.sparsedrop.attention.default, args, before=node, like=node)
    node.replace_all_uses_with(fused)
    editor.graph.erase_node(node)

"""Pattern family: the attention dropout inside ``nn.MultiheadAttention`` (and so inside
``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``).

Dynamo records ``F.multi_head_attention_forward(...)`` as one opaque node. With
``need_weights=False`` torch computes it as in-projection -> head split -> mask merge ->
``scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)`` -> out-projection.
``mha_forward`` below is that computation step by step, with torch's own helpers for the
in-projection and mask canonicalisation, and the SDPA call replaced by ``sparsedrop::attention``
with tile keep-flags when training with p > 0 (plain SDPA otherwise). The node is replaced by a call
to it where that is shown equal (tests/test_mha.py); the variants it does not reproduce
(need_weights=True, bias_k/bias_v, add_zero_attn, static_k/v, head dims the kernel does not cover)
keep the original node and are listed with the reason.
"""
from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from sparsedrop_compile.config import SparseDropConfig
from sparsedrop_compile.kernels.flash_attention import HEAD_DIM_RULE, supported_head_dim
from sparsedrop_compile.mask_ops import sample_tile_keep
from sparsedrop_compile.report import Site

from ._graph import GraphEditor, attention_tiles_refusal, excluded, location, meta_val, module_path, scalar_hint, size_hint

MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_HELPERS = ("_canonical_mask", "_none_or_dtype", "_in_projection_packed", "_in_projection")


def mha_forward(query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias, dropout_p, out_proj_weight,
                out_proj_bias, training, key_padding_mask, attn_mask, is_causal, use_separate_proj_weight,
                q_proj_weight, k_proj_weight, v_proj_weight, block_q, block_k, mode, kernel):
    """``F.multi_head_attention_forward(..., need_weights=False)`` without bias_k/v, add_zero_attn and
    static_k/v, with tile-dropout attention. Returns (output, None) as torch does."""
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, _ = query.shape
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("multi_head_attention_forward: is_causal=True needs attn_mask (as torch requires)")
    if is_causal and key_padding_mask is None:
        attn_mask = None  # SDPA takes the causal hint itself
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
    head_dim = embed_dim // num_heads
    if use_separate_proj_weight:
        b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight, b_q, b_k, b_v)
    else:
        q, k, v = F._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    src_len = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    p = dropout_p if training else 0.0
    if p > 0:
        keep = sample_tile_keep(q, k, p, block_q, block_k)
        out = torch.ops.sparsedrop.attention(q, k, v, attn_mask, keep, p, is_causal, None, False, block_q, block_k, mode, kernel)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal)
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, -1)
    return (out if batched else out.squeeze(1)), None


def _bound(node: fx.Node) -> dict | None:
    if node.op != "call_function" or node.target is not F.multi_head_attention_forward:
        return None
    try:
        bound = MHA_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _refusal(node: fx.Node, a: dict, config: SparseDropConfig) -> str | None:
    p = scalar_hint(a["dropout_p"])
    if a["training"] is not True:
        return "training=False: no attention dropout" if a["training"] is False else "training flag is not a constant"
    if p is None or isinstance(a["dropout_p"], fx.Node):
        return "dropout_p is not a constant"
    if not 0 < p < 1:
        return f"dropout_p={p:g} is outside (0, 1)"
    if p < config.min_p:
        return f"p={p:g} < min_p={config.min_p:g}"
    if not config.attention:
        return "attention rewriting is off (option attention=False)"
    if a["need_weights"] is not False:
        return ("need_weights=True: torch computes the averaged attention weights with element dropout outside SDPA; "
                "pass need_weights=False to the module call to have it rewritten")
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[name] is not None:
            return f"{name} is set: the tile-dropout decomposition does not reproduce it"
    if a["add_zero_attn"] is not False:
        return "add_zero_attn=True: the tile-dropout decomposition does not reproduce it"
    for name in ("is_causal", "use_separate_proj_weight"):
        if not isinstance(a[name], bool):
            return f"{name} is not a constant"
    if not all(hasattr(F, h) for h in _HELPERS):
        return "this torch lacks the multi_head_attention_forward helpers the decomposition calls"
    query, embed, heads = meta_val(a["query"]), a["embed_dim_to_check"], a["num_heads"]
    if not isinstance(query, torch.Tensor) or not isinstance(embed, int) or not isinstance(heads, int) or heads <= 0:
        return "no shape metadata on query, or embed_dim / num_heads are not constants"
    if embed % heads or not supported_head_dim(embed // heads):
        return (f"head dim {embed}/{heads} = {embed / heads:g}: tile-dropout attention takes head dims that are "
                f"{HEAD_DIM_RULE}; left as it is (torch's multi_head_attention_forward)")
    out = meta_val(node)
    out = out[0] if isinstance(out, (tuple, list)) and out else out
    if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type == "cuda":
        # The output's dtype, not the query's: under autocast the query is fp32, the attention not.
        return "float32 attention: the Triton kernel is fp16/bf16 (use autocast); left as it is"
    return None


def _too_few_tiles(a: dict, config: SparseDropConfig, site: Site) -> str | None:
    """The rule of the other attention sites; MHA's query is (L, N, E) or, unbatched, (L, E)."""
    query, key = meta_val(a["query"]), meta_val(a["key"])
    heads = a["num_heads"]
    sizes = [size_hint(n) for n in (*query.shape, *key.shape)]
    batch = sizes[1] if query.dim() == 3 else 1
    q = (batch, heads, sizes[0], 1)
    k = (batch, heads, sizes[query.dim()], 1)
    return attention_tiles_refusal(site, config, q, k)


def rewrite_dropout_mha(gm: fx.GraphModule, config: SparseDropConfig, graph_index: int = 0, fake_mode=None) -> list[Site]:
    editor = GraphEditor(gm, fake_mode)
    sites: list[Site] = []
    for node in list(gm.graph.nodes):
        a = _bound(node)
        if a is None or (a["training"] is False or scalar_hint(a["dropout_p"]) == 0):
            continue  # attention without dropout is no dropout site
        site = Site(graph_index, node.name, location(node), module_path(node), scalar_hint(a["dropout_p"]), "attention",
                    ["P @ V inside multi_head_attention_forward"])
        sites.append(site)
        site.reason = _refusal(node, a, config) or _too_few_tiles(a, config, site) or excluded(config.exclude, config.filter_fn, site, [])
        if site.reason is not None:
            counters["sparsedrop"]["refused"] += 1
            continue
        bq, bk = config.attention_block
        args = (a["query"], a["key"], a["value"], a["embed_dim_to_check"], a["num_heads"], a["in_proj_weight"],
                a["in_proj_bias"], a["dropout_p"], a["out_proj_weight"], a["out_proj_bias"], True, a["key_padding_mask"],
                a["attn_mask"], a["is_causal"], a["use_separate_proj_weight"], a["q_proj_weight"], a["k_proj_weight"],
                a["v_proj_weight"], bq, bk, config.attention_mode, config.kernel)
        fused = editor.call(mha_forward, args, before=node, like=node)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        site.rewritten = True
        site.block_size = config.attention_block
        counters["sparsedrop"]["attention_fused"] += 1
    if any(s.rewritten for s in sites):
        gm.graph.lint()
        gm.recompile()
    return sites

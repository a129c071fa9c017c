"""nn.MultiheadAttention's dropout: the decomposition equals torch's, the compiled modules equal
the reference with the same keep tiles, and explain lists each site (rewritten or why not)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sparsedrop_compile as sd
from sparsedrop_compile.kernels import flash_attention as fa
from sparsedrop_compile.kernels.block_mask import apply_block_keep, sample_block_keep
from sparsedrop_compile.passes.dropout_mha import mha_forward

E, H = 128, 2  # head dim 64: a size the tile-dropout kernel covers
TILE = (16, 16)
OPTS = {"attention_block": TILE, "block_size": 16, "inner": "aot_eager"}
TOL = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- (a) the decomposition
def _case(name, gen):
    """(module, query, key, value, call kwargs) for one option of multi_head_attention_forward."""
    L, S, N = 13, 21, 3
    kdim = vdim = None
    if name == "separate_proj":
        kdim, vdim = 48, 40
    mha = nn.MultiheadAttention(E, H, bias=name != "no_bias", kdim=kdim, vdim=vdim)
    q = torch.randn(L, N, E, generator=gen)
    k = torch.randn(S, N, kdim or E, generator=gen)
    v = torch.randn(S, N, vdim or E, generator=gen)
    kw = {}
    if name == "self":
        k = v = q
    if name == "unbatched":
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    if name in ("kpm_bool", "kpm_and_mask"):
        kpm = torch.rand(N, S, generator=gen) > 0.7
        kpm[:, 0] = False
        kw["key_padding_mask"] = kpm
    if name == "kpm_float":
        kw["key_padding_mask"] = torch.randn(N, S, generator=gen)
    if name in ("mask_2d_bool", "kpm_and_mask"):
        mask = torch.rand(L, S, generator=gen) > 0.7
        mask[:, 0] = False
        kw["attn_mask"] = mask if name == "mask_2d_bool" else torch.randn(L, S, generator=gen)
    if name == "mask_3d_float":
        kw["attn_mask"] = torch.randn(N * H, L, S, generator=gen)
    if name.startswith("causal"):
        q = k = v = q
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L)
        kw["is_causal"] = True
        if name == "causal_kpm":
            kw["key_padding_mask"] = torch.zeros(N, L, dtype=torch.bool)
    return mha, q, k, v, kw


def _torch_args(mha, q, k, v, kw, training):
    return dict(query=q, key=k, value=v, embed_dim_to_check=E, num_heads=H, in_proj_weight=mha.in_proj_weight,
                in_proj_bias=mha.in_proj_bias, bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.3,
                out_proj_weight=mha.out_proj.weight, out_proj_bias=mha.out_proj.bias, training=training,
                key_padding_mask=kw.get("key_padding_mask"), need_weights=False, attn_mask=kw.get("attn_mask"),
                use_separate_proj_weight=not mha._qkv_same_embed_dim, q_proj_weight=mha.q_proj_weight,
                k_proj_weight=mha.k_proj_weight, v_proj_weight=mha.v_proj_weight, is_causal=kw.get("is_causal", False))


CASES = ["self", "cross", "unbatched", "no_bias", "separate_proj", "kpm_bool", "kpm_float", "mask_2d_bool",
         "mask_3d_float", "kpm_and_mask", "causal", "causal_kpm"]


@pytest.mark.parametrize("name", CASES)
def test_decomposition_equals_torch_without_dropout(name):
    mha, q, k, v, kw = _case(name, torch.Generator().manual_seed(0))
    a = _torch_args(mha, q, k, v, kw, training=False)
    expected, none = F.multi_head_attention_forward(**a)
    got, none2 = mha_forward(a["query"], a["key"], a["value"], E, H, a["in_proj_weight"], a["in_proj_bias"], 0.3,
                             a["out_proj_weight"], a["out_proj_bias"], False, a["key_padding_mask"], a["attn_mask"],
                             a["is_causal"], a["use_separate_proj_weight"], a["q_proj_weight"], a["k_proj_weight"],
                             a["v_proj_weight"], *TILE, "post_softmax", "auto")
    assert none is None and none2 is None
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- (b) compiled vs reference
def _reference_patches(monkeypatch, tile=TILE, block=16):
    """Eager stand-ins: SDPA with tile dropout by the reference math, dropout as block dropout;
    each samples its keep flags the way the compiled graph does, in the same order."""
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        keep = fa.sample_attention_keep(q, k, dropout_p, *tile)
        return fa.reference_attention(q, k, v, attn_mask, keep, dropout_p, is_causal, scale, enable_gqa, tile)

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        keep = sample_block_keep(x, p, block, block, False)
        return apply_block_keep(x, keep, 1 / (1 - p), block, block, False)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(F, "dropout", dropout)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _encoder(norm_first=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 96, dropout=0.2, batch_first=True, norm_first=norm_first).train()
    layer.dropout1.p = layer.dropout2.p = 0.0  # residual dropouts stay element-wise with another RNG: off here
    return layer


def _run(module, inputs, kwargs, seed, owner=None):
    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    torch.manual_seed(seed)
    out = module(*leaves, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)).sum().backward()
    owner = owner or module
    grads = [t.grad for t in leaves if t.is_floating_point()] + [p.grad for p in owner.parameters()]
    owner.zero_grad(set_to_none=True)
    return [out] + grads


@pytest.mark.parametrize("variant", ["plain", "key_padding_mask", "causal", "norm_first", "bf16_autocast"])
def test_compiled_encoder_layer_equals_reference_with_the_same_tiles(variant, monkeypatch):
    layer = _encoder(norm_first=variant == "norm_first")
    x = torch.randn(3, 40, E)
    kwargs = {}
    if variant == "key_padding_mask":
        kwargs["src_key_padding_mask"] = torch.arange(40).expand(3, 40) >= torch.tensor([[40], [31], [17]])
    if variant == "causal":
        kwargs = {"src_mask": nn.Transformer.generate_square_subsequent_mask(40), "is_causal": True}
    compiled = torch.compile(layer, backend="sparsedrop", options=OPTS)
    bf16 = variant == "bf16_autocast"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        got = _run(compiled, [x], kwargs, seed=3)
        assert counters["sparsedrop"]["attention_fused"] == 1 and counters["sparsedrop"]["linear_fused"] == 1
        _reference_patches(monkeypatch)
        expected = _run(layer, [x], kwargs, seed=3)
    if not bf16:
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **TOL)
        return
    # bf16: against a float64 oracle (same tiles), no worse than twice eager bf16's error.
    wide = _run(copy.deepcopy(layer).double(), [x.double()], kwargs, seed=3)
    for g, e, w in zip(got, expected, wide):
        assert g.dtype == e.dtype
        err, eager_err = _rel(g, w), _rel(e, w)
        assert err < 5e-2 and err <= 2 * eager_err + 1e-3, (err, eager_err, g.shape)


def test_compiled_mha_need_weights_false_equals_reference(monkeypatch):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dropout=0.25, batch_first=True, kdim=40, vdim=48).train()
    q, k, v = torch.randn(2, 37, E), torch.randn(2, 29, 40), torch.randn(2, 29, 48)
    call = lambda q, k, v: mha(q, k, v, need_weights=False)  # noqa: E731
    got = _run(torch.compile(call, backend="sparsedrop", options=OPTS), [q, k, v], {}, seed=5, owner=mha)
    assert counters["sparsedrop"]["attention_fused"] == 1
    _reference_patches(monkeypatch)
    for g, e in zip(got, _run(call, [q, k, v], {}, seed=5, owner=mha)):
        torch.testing.assert_close(g, e, **TOL)


# --------------------------------------------------------------------------- (c) explain
def test_explain_lists_mha_sites_rewritten_or_refused():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dropout=0.1, batch_first=True)
    narrow = nn.MultiheadAttention(36, 3, dropout=0.1, batch_first=True)  # head dim 12: not a multiple of 8

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.narrow = mha, nn.MultiheadAttention(E, H, dropout=0.1, batch_first=True), narrow

        def forward(self, x):
            y = self.a(x, x, x, need_weights=False)[0]
            z = self.b(y, y, y)[0]  # need_weights defaults to True
            return z, self.narrow(x[..., :36], x[..., :36], x[..., :36], need_weights=False)[0]

    report = sd.explain(Net(), torch.randn(2, 24, E), options=OPTS)
    assert [(s.module_path, s.kind, s.rewritten) for s in report.sites] == [
        ("a", "attention", True), ("b", "attention", False), ("narrow", "attention", False)], str(report)
    assert report.sites[1].reason.startswith("need_weights=True")
    assert "head dim 36/3 = 12" in report.sites[2].reason and "multiples of 8 up to 256" in report.sites[2].reason
    assert all(s.consumers == ["P @ V inside multi_head_attention_forward"] for s in report.sites)


@pytest.mark.parametrize("embed,heads,rewritten", [(160, 2, True), (96, 3, True), (32, 4, True), (48, 4, False),
                                                   (520, 2, False)])
def test_mha_head_dims_follow_the_kernels_rule(embed, heads, rewritten):
    """Head dims 80, 32 and 8 are rewritten (multiples of 8 up to 256, as for SDPA sites), 12 and
    260 are left as they are, with the reason."""
    mha = nn.MultiheadAttention(embed, heads, dropout=0.1, batch_first=True)
    (site,) = sd.explain(lambda x: mha(x, x, x, need_weights=False)[0], torch.randn(2, 24, embed), options=OPTS).sites
    assert site.rewritten == rewritten, site.row()
    if not rewritten:
        assert f"head dim {embed}/{heads} = {embed // heads}" in site.reason
        assert "multiples of 8 up to 256" in site.reason and "left as it is" in site.reason


def test_eval_mode_mha_is_no_site_and_unchanged():
    torch.manual_seed(0)
    layer = _encoder().eval()
    x = torch.randn(2, 24, E)
    compiled = torch.compile(layer, backend="sparsedrop", options=OPTS)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), **TOL)
    assert counters["sparsedrop"]["attention_fused"] == 0


@pytest.mark.gpu
def test_encoder_layer_on_gpu_with_triton_attention_equals_reference(monkeypatch):
    """CUDA under fp16 autocast: the Triton tile-dropout attention and block-sparse linear against
    the reference math with the same tiles (aot_eager draws them from the CUDA generator in
    program order, as the eager reference does); errors of fp16 size."""
    layer = _encoder().cuda()
    x = torch.randn(4, 256, E, device="cuda")
    options = {"attention_block": (64, 128), "block_size": 64, "inner": "aot_eager"}
    compiled = torch.compile(layer, backend="sparsedrop", options=options)
    with torch.autocast("cuda", dtype=torch.float16):
        got = _run(compiled, [x], {}, seed=3)
        assert counters["sparsedrop"]["attention_fused"] == 1
        _reference_patches(monkeypatch, tile=(64, 128), block=64)  # the kernels' default tile
        expected = _run(layer, [x], {}, seed=3)
    for g, e in zip(got, expected):
        assert _rel(g, e) < 1e-2, (_rel(g, e), g.shape)

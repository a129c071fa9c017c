"""A site is block-dropped only when dropping all k blocks of its whole activation at once is rare:
p**k <= max_drop_all (1e-6 by default); otherwise it keeps element-wise dropout, with a reason."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sparsedrop_compile as sd


def _head(p=0.3, features=64):
    """A classifier head: dropout on pooled features, then a linear layer (as in timm models)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Dropout(p), nn.Linear(features, 10)).train()


def _fused():
    return sum(v for k, v in counters["sparsedrop"].items() if k.endswith("_fused"))


def test_small_classifier_head_at_default_block_stays_element_wise():
    model, x = _head(), torch.randn(16, 64)
    report = sd.explain(model, x)
    (site,) = report.sites
    assert not site.rewritten and site.blocks == 1
    for part in ("too few blocks", "k=1", "p=0.3", "p**k=0.3", "max_drop_all=1e-06", "smaller block_size", "k >= 12"):
        assert part in site.reason, site.reason
    assert "too few blocks" in str(report)

    # Left as it was: the compiled model draws the same element-wise mask as eager.
    compiled = torch.compile(model, backend="sparsedrop", options={"inner": "eager"})
    outs = []
    for seed in range(200):
        torch.manual_seed(seed)
        got = compiled(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(got, model(x), rtol=0, atol=0)
        outs.append(got)
    assert _fused() == 0
    # Block dropout at block 128 zeroed the whole batch's input in ~30 % of calls (loss = ln(10));
    # element-wise dropout of 1024 values practically never does.
    bias_only = model[1].bias.expand(16, 10)
    assert not any(torch.allclose(o, bias_only) for o in outs)


def test_enough_blocks_is_rewritten_and_counts_them():
    report = sd.explain(_head(), torch.randn(16, 64), options={"block_size": 8})
    (site,) = report.sites
    assert site.rewritten and site.reason is None
    assert site.blocks == 2 * 8  # 16 rows / 8 x 64 cols / 8


@pytest.mark.parametrize("p,cols,rewritten", [(0.5, 19 * 8, False), (0.5, 20 * 8, True), (0.1, 5 * 8, False), (0.1, 6 * 8, True)])
def test_threshold_is_p_to_the_k_at_most_max_drop_all(p, cols, rewritten):
    # 0.5**19 = 1.9e-6 > 1e-6 >= 0.5**20; 0.1**5 = 1e-5 > 1e-6 >= 0.1**6 (allowing for rounding)
    model = nn.Sequential(nn.Dropout(p), nn.Linear(cols, 4)).train()
    (site,) = sd.explain(model, torch.randn(8, cols), options={"block_size": 8}).sites
    assert site.blocks == cols // 8
    assert site.rewritten == rewritten, site.reason


def test_max_drop_all_option_is_respected():
    (site,) = sd.explain(_head(), torch.randn(16, 64), options={"max_drop_all": 0.5}).sites
    assert site.rewritten  # 0.3**1 <= 0.5
    (site,) = sd.explain(_head(), torch.randn(16, 64), options={"block_size": 8, "max_drop_all": 1e-12}).sites
    assert not site.rewritten and "max_drop_all=1e-12" in site.reason and "k=16" in site.reason


@pytest.mark.parametrize("bad", [0, -1e-6, 1.5, "1e-6", True, None])
def test_max_drop_all_is_validated(bad):
    with pytest.raises(ValueError, match=r"max_drop_all=.*expected a probability in \(0, 1\]"):
        sd.SparseDropConfig.from_options({"max_drop_all": bad})
    assert sd.SparseDropConfig.from_options({"max_drop_all": 1}).max_drop_all == 1


def test_batched_matmul_counts_the_blocks_of_every_matrix():
    fn = lambda x: torch.matmul(F.dropout(x, 0.5, True), x.transpose(-1, -2))  # noqa: E731
    (site,) = sd.explain(fn, torch.randn(2, 3, 20, 32), options={"block_size": 8}).sites
    assert site.rewritten and site.blocks == 2 * 3 * 3 * 4  # 6 matrices of 3 x 4 blocks (20 rows: 3 ragged blocks)
    (site,) = sd.explain(fn, torch.randn(2, 3, 8, 8), options={"block_size": 8}).sites
    assert not site.rewritten and site.blocks == 6 and "k=6" in site.reason  # 0.5**6 = 0.016


def test_attention_counts_every_batch_and_head_tile():
    q = torch.randn(2, 2, 16, 64)
    fn = lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)  # noqa: E731
    (site,) = sd.explain(fn, q).sites  # default tile (64, 128): one tile per (batch, head)
    assert not site.rewritten and site.blocks == 4
    assert "attention_block" in site.reason and "p**k=0.0001" in site.reason
    (site,) = sd.explain(fn, q, options={"attention_block": (8, 8)}).sites
    assert site.rewritten and site.blocks == 2 * 2 * 2 * 2


def test_dynamic_shapes_decide_from_the_sizes_that_compiled_the_graph():
    w = torch.randn(24, 32)
    fn = lambda x: F.linear(F.dropout(x, 0.3, True), w)  # noqa: E731
    compiled = torch.compile(fn, backend="sparsedrop", options={"block_size": 8, "inner": "eager"}, dynamic=True)
    compiled(torch.randn(64, 32))  # 8 x 4 blocks: rewritten
    compiled(torch.randn(16, 32))  # 2 x 4 blocks; the same graph serves it (the rule adds no guard)
    assert counters["sparsedrop"]["linear_fused"] == 1 and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="sparsedrop", options={"block_size": 8, "inner": "eager"}, dynamic=True)
    compiled(torch.randn(16, 32))  # 0.3**8 = 6.6e-5: left element-wise, and so for later larger calls
    compiled(torch.randn(64, 32))
    assert counters["sparsedrop"]["linear_fused"] == 0 and counters["stats"]["unique_graphs"] == 1

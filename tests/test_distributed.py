"""The backend under DDP and FSDP2: two processes with the gloo backend on the CPU.

One ``torch.multiprocessing.spawn`` of two ranks runs every distributed case once (a module
fixture); the tests read what each rank saved. Each rank trains on its own shard with its own seed
(``SEED + rank``); the reference is this process running the same compiled model on each shard
with that shard's seed, then averaging the gradients: the rewrite must happen in the distributed
run exactly as in one process (same sites, same masks, so the same loss and gradients).

Cases:
- ``Net`` under DDP with 1 MB buckets: Dynamo's DDPOptimizer cuts the graph right before each
  ``fc2`` (its weight fills a bucket), i.e. between every dropout and its linear; the backend's DDP
  hook rewrites the whole graph before the cut. Without the hook the cut sites must be listed with
  the reason. ``explain`` of the DDP model lists every site as rewritten.
- ``Net`` under FSDP2, ``fully_shard`` per block, then the root; and per Linear, where every pair is
  cut at a unit boundary and listed with the reason.
- A tiny HF BERT trained for three AdamW steps under DDP and under FSDP2 (per layer): the losses
  equal the single-process emulation of the same shards, seeds and averaged gradients.
- ``Net`` under DDP with Inductor: sites rewritten, finite losses, the same on both ranks.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

WORLD = 2
SEED = 100  # rank r draws its masks from SEED + r; the weights come from seed 0 on every rank
P = 0.3
OPTS = {"block_size": 32, "inner": "aot_eager"}
BERT_OPTS = {"block_size": 16, "attention_block": (16, 16), "inner": "aot_eager"}
HF_STEPS = 3
RANK_TIMEOUT_S = 180


class Block(nn.Module):
    """Pre-LN MLP block: the dropout feeds fc2 inside the block; the output dropout drops fc2's output
    on its way to the residual add (so fc2 is fused on both sides)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.drop = nn.Dropout(P)
        self.fc2 = nn.Linear(4 * width, width)
        self.out_drop = nn.Dropout(P)

    def forward(self, x):
        return x + self.out_drop(self.fc2(self.drop(F.gelu(self.fc1(self.norm(x))))))


class Net(nn.Module):
    """Two blocks and a head. At width 256 each fc is 1 MB of fp32 weights: with 1 MB DDP buckets
    DDPOptimizer cuts the graph right before every fc2, between the dropout and its linear."""

    def __init__(self, width: int = 256, blocks: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, 16)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def net_shard(rank: int) -> torch.Tensor:
    return torch.randn(4, 32, 256, generator=torch.Generator().manual_seed(1000 + rank))


def net_loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def make_bert():
    from sparsedrop_compile.models import build_model

    torch.manual_seed(0)
    return build_model("bert", "tiny").train()


def bert_shard(model, rank: int, step: int) -> dict:
    from sparsedrop_compile.models import example_batch

    return example_batch(getattr(model, "module", model), batch=2, seq=64, seed=10 * step + rank)  # DDP: its module's config


# --------------------------------------------------------------------------- the two ranks
def _rows(report) -> list[tuple]:
    return [(s.location, s.kind, s.rewritten, s.reason) for s in report.sites]


def _grads(model) -> dict:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if isinstance(grad, DTensor):
            grad = grad.full_tensor()
        out[name.removeprefix("module.")] = grad.detach().clone()
    return out


def _net_step(model, rank: int, options: dict) -> dict:
    """One forward and backward of ``model`` (a wrapped Net) compiled with ``options``, recording the sites."""
    import sparsedrop_compile as sd
    from sparsedrop_compile import report
    from sparsedrop_compile.distributed import whole_graph_pass

    pieces = []

    def backend(gm, example_inputs, **kw):  # counts the graphs the backend compiles (DDPOptimizer's pieces)
        if not whole_graph_pass():
            pieces.append(len(gm.graph.nodes))
        return sd.sparsedrop(gm, example_inputs, **kw)

    backend._sparsedrop_backend = True
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, options=options)
    torch.manual_seed(SEED + rank)
    record = report.ExplainReport()
    with report.recording(record):
        loss = net_loss(compiled(net_shard(rank)))
    loss.backward()
    out = {"loss": loss.detach(), "grads": _grads(model), "sites": _rows(record), "pieces": len(pieces)}
    model.zero_grad(set_to_none=True)
    return out


def _hf_train(model, rank: int) -> dict:
    from sparsedrop_compile import report

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsedrop", options=BERT_OPTS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(SEED + rank)
    record = report.ExplainReport()
    losses = []
    for step in range(HF_STEPS):
        with report.recording(record) if step == 0 else contextlib.nullcontext():
            loss = compiled(**bert_shard(model, rank, step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "sites": _rows(record)}


def _worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch._dynamo.backends.distributed import DDPOptimizer
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sparsedrop_compile as sd
    from sparsedrop_compile.models import transformer_blocks

    warnings.filterwarnings("ignore", message=".*returned a view tensor")  # FSDP2, about in-place ops these models do not do
    # A collective that waits past the timeout raises, so a rank stuck on the other fails the test, not CI.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=RANK_TIMEOUT_S))
    results = {}
    try:
        results["ddp"] = _net_step(DDP(make_net(), bucket_cap_mb=1), rank, OPTS)

        hooked = DDPOptimizer.compile_fn
        DDPOptimizer.compile_fn = hooked.__wrapped__  # torch's own: the pieces reach the backend unrewritten
        try:
            results["ddp_no_hook"] = _net_step(DDP(make_net(), bucket_cap_mb=1), rank, OPTS)
        finally:
            DDPOptimizer.compile_fn = hooked

        torch.manual_seed(SEED + rank)
        results["ddp_explain"] = _rows(sd.explain(DDP(make_net(), bucket_cap_mb=1), net_shard(rank), options=OPTS))

        net = make_net()
        for block in net.blocks:
            fully_shard(block)
        fully_shard(net)
        results["fsdp"] = _net_step(net, rank, OPTS)

        net = make_net()
        for block in net.blocks:
            fully_shard(block.fc1)
            fully_shard(block.fc2)
        fully_shard(net)
        results["fsdp_per_linear"] = _net_step(net, rank, OPTS)

        results["ddp_bert"] = _hf_train(DDP(make_bert()), rank)
        bert = make_bert()
        for layer in transformer_blocks(bert):
            fully_shard(layer)
        fully_shard(bert)
        results["fsdp_bert"] = _hf_train(bert, rank)

        results["ddp_inductor"] = _net_step(DDP(make_net(), bucket_cap_mb=1), rank, {**OPTS, "inner": "inductor"})
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("distributed")
    context = mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 3 * RANK_TIMEOUT_S
    while not context.join(timeout=5):  # raises with a rank's traceback if one failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} gloo ranks did not finish in {3 * RANK_TIMEOUT_S} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# --------------------------------------------------------------------------- references
def _reference_net_step(options: dict = OPTS) -> tuple[list[torch.Tensor], dict]:
    """This process, no engine: the compiled Net on each rank's shard with that rank's seed; mean gradients."""
    import sparsedrop_compile  # noqa: F401

    model = make_net()
    compiled = torch.compile(model, backend="sparsedrop", options=options)
    losses, grads = [], []
    for rank in range(WORLD):
        torch.manual_seed(SEED + rank)
        loss = net_loss(compiled(net_shard(rank)))
        loss.backward()
        losses.append(loss.detach())
        grads.append(_grads(model))
        model.zero_grad(set_to_none=True)
    return losses, {name: sum(g[name] for g in grads) / WORLD for name in grads[0]}


def _reference_bert(options: dict) -> list[list[float]]:
    """Three AdamW steps on the mean gradient of the ranks' shards, each shard drawing from its own RNG stream."""
    model = make_bert()
    compiled = torch.compile(model, backend="sparsedrop", options=options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    states = []
    for rank in range(WORLD):
        torch.manual_seed(SEED + rank)
        states.append(torch.get_rng_state())
    losses: list[list[float]] = [[] for _ in range(WORLD)]
    for step in range(HF_STEPS):
        grads = []
        for rank in range(WORLD):
            torch.set_rng_state(states[rank])
            loss = compiled(**bert_shard(model, rank, step)).loss
            loss.backward()
            states[rank] = torch.get_rng_state()
            losses[rank].append(loss.item())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            model.zero_grad(set_to_none=True)
        for name, param in model.named_parameters():
            param.grad = sum(g[name] for g in grads) / WORLD
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def _assert_same_step(ranks: list[dict], case: str) -> None:
    losses, grads = _reference_net_step()
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result[case]["loss"], losses[rank])
        assert result[case]["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(result[case]["grads"][name], grad, msg=lambda m, n=name, r=rank: f"{case} rank {r} {n}: {m}")


def _rewritten(rows) -> list[str]:
    return [location.split(" ")[0] for location, _, rewritten, _ in rows if rewritten]


# Net's sites: each block's dropout into fc2 (input side) and its dropout of fc2's output (output side)
NET_SITES = [f"blocks.{i}.{name}" for i in (0, 1) for name in ("drop", "out_drop")]
NET_SITES_DDP = [f"module.{site}" for site in NET_SITES]


# --------------------------------------------------------------------------- tests
def test_ddp_rewrites_the_pairs_ddpoptimizer_cuts(ranks):
    ddp = ranks[0]["ddp"]
    assert ddp["pieces"] >= 3, "1 MB buckets should make DDPOptimizer cut the graph before each fc2"
    assert _rewritten(ddp["sites"]) == NET_SITES_DDP
    assert ranks[1]["ddp"]["sites"] == ddp["sites"]  # nothing in the report differs between ranks


def test_ddp_step_equals_the_shards_in_one_process(ranks):
    _assert_same_step(ranks, "ddp")


def test_ddp_without_the_hook_lists_the_cut_sites_with_the_reason(ranks):
    rows = ranks[0]["ddp_no_hook"]["sites"]
    cut = [r for r in rows if r[0].startswith(("module.blocks.0.drop ", "module.blocks.1.drop "))]
    assert len(cut) == 2 and not any(rewritten for _, _, rewritten, _ in cut)
    for _, _, _, reason in cut:
        assert "DDPOptimizer" in reason and "gradient-bucket boundary" in reason and "optimize_ddp = False" in reason
    assert ranks[1]["ddp_no_hook"]["sites"] == rows


def test_explain_of_a_ddp_model_lists_the_sites_rewritten(ranks):
    rows = ranks[0]["ddp_explain"]
    assert _rewritten(rows) == NET_SITES_DDP  # the output dropouts too (fc2's output, both sides)
    assert len(rows) == 4
    assert ranks[1]["ddp_explain"] == rows


def test_fsdp2_per_block_rewrites_inside_the_blocks(ranks):
    rows = ranks[0]["fsdp"]["sites"]
    assert _rewritten(rows) == NET_SITES
    assert ranks[1]["fsdp"]["sites"] == rows


def test_fsdp2_step_equals_the_shards_in_one_process(ranks):
    _assert_same_step(ranks, "fsdp")


def test_fsdp2_per_linear_lists_the_pairs_it_cuts(ranks):
    rows = ranks[0]["fsdp_per_linear"]["sites"]
    cut = [r for r in rows if r[0].startswith("blocks.0.drop ")]
    assert cut and not any(rewritten for _, _, rewritten, _ in rows)
    assert "the graph ends at a call into an FSDP2 unit" in cut[0][3] and "fully_shard a module that holds both" in cut[0][3]
    assert ranks[1]["fsdp_per_linear"]["sites"] == rows


def test_hf_bert_trains_under_ddp_and_fsdp2_like_one_process(ranks):
    # Under FSDP2 the embedding dropout is cut from layer 0 (a unit of its own): element-wise there, so in its reference too.
    references = {"ddp_bert": _reference_bert(BERT_OPTS), "fsdp_bert": _reference_bert({**BERT_OPTS, "exclude": ["bert.embeddings.*"]})}
    for case, reference in references.items():
        for rank, result in enumerate(ranks):
            losses = result[case]["losses"]
            assert all(torch.isfinite(torch.tensor(losses)))
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[rank]), msg=lambda m, c=case, r=rank: f"{c} rank {r}: {m}")
        assert ranks[1][case]["sites"] == ranks[0][case]["sites"]
    ddp_rows, fsdp_rows = ranks[0]["ddp_bert"]["sites"], ranks[0]["fsdp_bert"]["sites"]
    # DDP: one graph; the embedding dropout -> layer 0's q, k, v, both layers' attention and (output
    # side) both layers' dropouts of the attention output and FFN output projections
    layer_sites = ["attention.self", "attention.output.dropout", "output.dropout"]
    assert _rewritten(ddp_rows) == ["module.bert.embeddings.dropout",
                                    *(f"module.bert.encoder.layer.{i}.{site}" for i in (0, 1) for site in layer_sites)]
    # FSDP2: a graph per unit; layer 1 runs layer 0's graph (recorded once), all of whose sites are rewritten
    assert _rewritten(fsdp_rows) == [f"bert.encoder.layer.0.{site}" for site in layer_sites]
    embedding = [r for r in fsdp_rows if r[0].startswith("bert.embeddings.dropout ")]
    assert embedding and not embedding[0][2] and "FSDP2 unit" in embedding[0][3]


def test_ddp_with_inductor(ranks):
    for rank, result in enumerate(ranks):
        step = result["ddp_inductor"]
        assert _rewritten(step["sites"]) == NET_SITES_DDP
        assert torch.isfinite(step["loss"])
        assert all(torch.isfinite(g).all() for g in step["grads"].values())
    for name, grad in ranks[0]["ddp_inductor"]["grads"].items():
        torch.testing.assert_close(ranks[1]["ddp_inductor"]["grads"][name], grad)

"""Does block dropout still regularise? The seed report's Table 1, through the backend (issue 14).

Question: when ``torch.compile(backend="sparsedrop")`` turns every "dropout -> matmul" of a model
into block dropout, does the model generalise as well as with element-wise dropout, at which p,
and (for the GPT) how long does it take to get there?

Tasks (all offline; nothing is downloaded):

    digits-mlp  sklearn's bundled digits (1,797 8x8 images), a fixed stratified 70/30 split
                (1,257 train, 540 validation). MLP 64 -> h -> h -> 10, ReLU, and a dropout before
                every linear (the report's "Dropout + Dense" for each layer, the input layer too).
    digits-vit  the same split. ViT with 2x2 patches (16 tokens), pre-LayerNorm blocks; a dropout
                before the qkv, attention-output, both MLP and the head linears, and attention
                dropout inside scaled_dot_product_attention. The patch embedding (4 pixels in)
                has no dropout: a block wider than 4 columns would drop whole patches.
    gpt         a character-level (byte-level, vocabulary 256) GPT on the Python standard
                library's own top-level ``*.py`` files (sysconfig's "stdlib" path), split *by file*
                (crc32 of the file name decides train or validation, and the order), cut to a fixed
                byte budget. The corpus depends on the Python version, which every row records.
                Pre-LN decoder, causal attention; dropout before the same linears as the ViT (LM
                head included) plus attention dropout. No embedding or residual dropout: those feed
                adds, which no matmul can skip, and they would stay element-wise in the block arm
                (the both arm adds residual dropout on the out and fc2 linears' outputs, which
                the backend's output side fuses into those linears).

Arms (ARMS below; each p in --ps, default 0.1 ... 0.7; --arms default: none, element, block):

    none     p = 0: the model without dropout, compiled with the baseline compiler
    element  element-wise dropout, ``torch.compile(backend=<baseline>)``
    block    ``torch.compile(backend="sparsedrop", options={"block_size": ..., "attention_block": ...})``:
             the dropouts above, each before a linear, become input-side block dropout. These
             models have no dropout of a matmul's output, so the backend's output side (on by
             default) finds nothing here: explain's table says "yes (input)" for every linear.
    both     block dropout on both sides of the linears: the block arm's model plus a second
             dropout (same p) directly on the output of every linear that has a dropout before
             it, except the classifier / LM head (dropped logits are no regulariser, and the
             digits heads' 10 columns hold too few blocks: 8 at the ViT's 8 x 16). In order:
               digits-mlp  dropout -> linear -> dropout -> ReLU, for the two hidden layers;
                           the head: dropout -> linear
               transformer qkv: dropout -> linear -> dropout -> split into heads (q, k, v tiles)
               blocks      out: dropout -> linear -> dropout -> residual add (residual dropout)
                           fc1: dropout -> linear -> dropout -> GELU
                           fc2: dropout -> linear -> dropout -> residual add (residual dropout)
             attention dropout and the heads as in the block arm; the ViT's patch embedding still
             has none. Compiled as the block arm with output_side=True (the backend's default,
             set explicitly), the same block_size on both sides: each linear becomes one op with
             both masks (explain: "yes (both)" on both of its rows). Where an output dropout is
             followed by the next linear's input dropout (MLP hidden layers, fc1 -> GELU -> fc2),
             that activation is dropped twice by independent masks on the same block grid: for
             the MLP (ReLU commutes with a non-negative mask) that is one block dropout at
             1 - (1 - p)**2 there, e.g. 0.19 at p = 0.1. Not in the default --arms: the GPU
             budget below is for three arms (this one adds a third to the runs).

The baseline compiler is Inductor on CUDA, and "aot_eager" on CPU (Inductor's C++ compile is slow
on a small CPU); sparsedrop's inner compiler is the same. --compiler overrides both. On CUDA both
arms run under CUDA graphs (Inductor's mode "reduce-overhead", --mode): the block arm's host time
is about 0.9 ms per rewritten linear site (results/host_overhead_nvidia-h200.csv), ~18 ms per step
for the 4-layer GPT, so without graphs a step is host-bound unless it holds ~20 ms of GPU work,
and at that size only ~200 steps per run fit the budget: too few to overfit. With graphs the host
only replays, and the GPT below is GPU-bound at a few ms per step (host_ms shows it). A job whose
compile or training fails under CUDA graphs runs again without them ("note" column).

Block sizes (rows x columns of the matmul's activation; for linears all leading dims are rows):

    task        size  activations (rows x K)               block     attention tile     blocks per activation
    digits-mlp  gpu   64 x 64 (input), 64 x 256             8 x 8     -                  64, 256
    digits-vit  gpu   1024 x 128/512 (64 images x 16 tok.)  8 x 16    4 x 4 (S = 16)     1024 / 4096 (head 64)
    gpt         gpu   8192 x 1024/4096 (32 x 256 tokens)    128 x 128 64 x 64 (S = 256)  512 / 2048 (16 per head)
    (tiny / small use smaller models with the blocks in SIZES; every CSV row names its blocks)

    The both arm's output dropouts use the same blocks over the linears' outputs (rows x N):
    digits-mlp 64 x 256 (both hidden layers): 256 blocks; digits-vit 1024 x 384 / 128 / 512 / 128
    (qkv, out, fc1, fc2): 3072 / 1024 / 4096 / 1024; gpt 8192 x 3072 / 1024 / 4096 / 1024:
    1536 / 512 / 2048 / 512.

Every block size keeps each activation at >= 39 blocks, so the backend's whole-activation rule
(p**k <= max_drop_all = 1e-6, k blocks) leaves every site block-dropped up to p = 0.7: no site of
the block or both arm silently stays element-wise (explain's table per task shows it). The digits
blocks are smaller than the Triton kernels' 16, so on CUDA the digits tasks run the backend's
PyTorch reference (same semantics; these models are tiny, their speed is not the question).

Training: fixed step budgets (no early stopping, so every run costs the same and the GPU budget
is predictable), evaluation every --eval-every steps on the whole validation set with the eager
module in eval mode (the same code for every arm). A run's result is its best evaluation
(accuracy for digits, loss for the GPT), as the report's "best checkpoint". AdamW (fused on
CUDA), bf16 autocast on CUDA; the GPT with weight decay 0.1, linear warm-up and gradient
clipping at 1.0. At --size gpu: MLP 1,200 steps of 64 (61 epochs), ViT 1,000 steps of 64 (51
epochs), GPT (4 layers x 1024, 16 heads, the report's) 800 steps of 32 x 256 bytes (25 passes over
256 KiB of training text; validation on 64 KiB). A seed fixes the initial weights, the batch order
and the dropout draws, so arms with the same seed start from the same weights on the same batches.

Timing: ``train_s`` is the training time up to each evaluation (evaluations and the compile
excluded; the GPU is synchronised at each evaluation), ``median_step_ms`` the median step from
CUDA events, ``host_ms`` the host's time to enqueue one step after a synchronisation (every 10th
step): where host_ms is close to median_step_ms the step is host-bound, not GPU-bound.
Time-to-quality (GPT): per seed, the block arm's train_s at its best p until its validation loss
first reaches the element arm's best loss (at the element arm's best p, same seed), divided by the
element arm's train_s to that loss.

Jobs and --parallel N: one job per (task, arm, p) runs all its seeds in one process (one
compile; the weights are re-initialised in place per seed). With N >= 2 the GPT jobs go to two
processes (one compiles while the other trains) and train with the GPU to themselves (an
exclusive file lock, so their step times are clean; the first sparsedrop compile in each also
tunes the kernels under it); the digits jobs run in the other N - 2 processes and train, two at a
time, whenever no GPT run is training. Compiles are not locked. Digits step times are therefore
measured beside another process ("workers" column).

Budget on one H200 (estimated, not yet measured): the GPT's 45 runs train ~190-225 s (~5-6 ms a
step), the first block-arm compile in each GPT process tunes the kernels (~40 s, GPU held), the
digits' 150 runs train ~70 s, start-up and explain ~40 s, compiles mostly overlap: ~6 min.
--budget-s 420 starts no job after 7 minutes, so the whole call ends within about 8.

Sizes: "gpu" is the study; "tiny" is a CPU smoke test of the whole pipeline (a few steps, one
seed: its numbers mean nothing); "small" keeps the digits models at fewer ViT steps and shrinks
the GPT, for a look on a GPU or a fast CPU (the ViT takes minutes per run on a 2-core CPU).

    python benchmarks/regularisation.py --size gpu --parallel 4 --budget-s 420      # one H200
    python benchmarks/regularisation.py --task digits-mlp --size tiny --device cpu  # CPU smoke
    python benchmarks/regularisation.py --task digits-mlp --size gpu --device cpu --arms both
    sparsedrop bench regularisation --size gpu --parallel 4

Writes to --out (default benchmarks/results), <stem> = regularisation_<device> (plus _<size>
when --size is not gpu): <stem>.csv (one row per run), <stem>_curves.csv (one row per
evaluation), <stem>.png (best validation metric against p, mean +- std per arm), <stem>.md (the
Table-1-style summary) and <stem>_sites_<task>.txt (explain() of each task's block arm; the both
arm's in <stem>_sites_<task>_both.txt). Rows of tasks not run this time are kept, so the tasks
can run in separate calls.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import os
import platform
import shutil
import statistics
import sys
import sysconfig
import tempfile
import textwrap
import time
import traceback
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch._dynamo.utils import counters

import sparsedrop_compile as sd
from sparsedrop_compile import harness
from sparsedrop_compile.harness import bf16_autocast, train_step

TASKS = ("digits-mlp", "digits-vit", "gpt")
CLASSIFICATION = ("digits-mlp", "digits-vit")
TIMED_TASKS = ("gpt",)  # GPU-bound: trained with the GPU to themselves under --parallel
DEFAULT_PS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
HOST_SAMPLE_EVERY = 10  # every n-th step is enqueued after a synchronisation to time the host alone
SKIP_STEPS = 5  # first steps of a run left out of the median step time (allocator, tuners settle)


# --------------------------------------------------------------------------- arms
@dataclass(frozen=True)
class Arm:
    """How one arm builds and compiles its model. ``sparsedrop_extra`` is merged into the
    backend's options; ``output_dropout`` adds a dropout on the output of every linear that has
    one before it, the head excepted (see the docstring's "both")."""

    name: str
    uses_p: bool  # False: runs at p = 0 only
    backend: str  # "baseline" (Inductor or aot_eager, see --compiler) or "sparsedrop"
    sparsedrop_extra: tuple = ()
    label: str = ""
    output_dropout: bool = False


ARMS = {
    "none": Arm("none", uses_p=False, backend="baseline", label="no dropout"),
    "element": Arm("element", uses_p=True, backend="baseline", label="element dropout"),
    "block": Arm("block", uses_p=True, backend="sparsedrop", label="block dropout (sparsedrop)"),
    "both": Arm("both", uses_p=True, backend="sparsedrop", sparsedrop_extra=(("output_side", True),),
                label="block dropout, both sides (sparsedrop)", output_dropout=True),
}
DEFAULT_ARMS = ("none", "element", "block")  # "both" on request: the GPU budget is for these three


# --------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class TaskConfig:
    """One task at one size: model, batch, schedule and the blocks of the block arm."""

    steps: int
    eval_every: int
    batch: int
    lr: float
    block_size: tuple[int, int]
    seeds: int
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    mlp_ratio: int = 4
    seq: int = 0
    attention_block: tuple[int, int] = (64, 128)
    weight_decay: float = 0.0
    warmup: int = 0
    clip: float = 0.0
    train_bytes: int = 0
    val_bytes: int = 0
    eval_batch: int = 0  # GPT validation batch (0: the training batch)


SIZES: dict[str, dict[str, TaskConfig]] = {
    "digits-mlp": {
        "tiny": TaskConfig(steps=8, eval_every=4, batch=32, lr=1e-3, block_size=(4, 8), seeds=1, hidden=64),
        "small": TaskConfig(steps=1200, eval_every=40, batch=64, lr=1e-3, block_size=(8, 8), seeds=5, hidden=256),
        "gpu": TaskConfig(steps=1200, eval_every=40, batch=64, lr=1e-3, block_size=(8, 8), seeds=5, hidden=256),
    },
    "digits-vit": {
        "tiny": TaskConfig(steps=6, eval_every=3, batch=16, lr=1e-3, block_size=(4, 4), seeds=1, hidden=64, layers=1,
                           heads=1, mlp_ratio=2, attention_block=(4, 4)),
        "small": TaskConfig(steps=400, eval_every=40, batch=64, lr=1e-3, block_size=(8, 16), seeds=5, hidden=128,
                            layers=2, heads=2, attention_block=(4, 4)),
        "gpu": TaskConfig(steps=1000, eval_every=40, batch=64, lr=1e-3, block_size=(8, 16), seeds=5, hidden=128,
                          layers=2, heads=2, attention_block=(4, 4)),
    },
    "gpt": {
        # Head dim 64 everywhere (the backend rewrites attention for head dims that are multiples of 8 up to 256).
        "tiny": TaskConfig(steps=4, eval_every=2, batch=4, lr=1e-3, block_size=(8, 16), seeds=1, hidden=64, layers=1,
                           heads=1, mlp_ratio=2, seq=32, attention_block=(8, 8), weight_decay=0.1, warmup=2, clip=1.0,
                           train_bytes=16384, val_bytes=2048),
        "small": TaskConfig(steps=300, eval_every=30, batch=16, lr=1e-3, block_size=(32, 32), seeds=3, hidden=128,
                            layers=2, heads=2, seq=64, attention_block=(16, 16), weight_decay=0.1, warmup=20, clip=1.0,
                            train_bytes=131072, val_bytes=32768),
        # The report's 4 layers x 1024. 800 steps of 32 x 256 bytes are 25 passes over the 256 KiB
        # of training text, so the model overfits without dropout; ~2.5 TFLOP a step, GPU-bound
        # under CUDA graphs (see the docstring on host time).
        "gpu": TaskConfig(steps=800, eval_every=40, batch=32, eval_batch=128, lr=5e-4, block_size=(128, 128), seeds=3,
                          hidden=1024, layers=4, heads=16, seq=256, attention_block=(64, 64), weight_decay=0.1, warmup=40,
                          clip=1.0, train_bytes=262144, val_bytes=65536),
    },
}


# --------------------------------------------------------------------------- data
@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


@functools.lru_cache(maxsize=None)
def digits_data(device: str) -> Digits:
    """sklearn's bundled digits, pixels scaled to [0, 1], a fixed stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x / 16.0, y, test_size=0.3, stratify=y, random_state=0)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long, device=device)  # noqa: E731
    return Digits(as_x(x_tr), as_y(y_tr), as_x(x_va), as_y(y_va))


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 bytes
    val: torch.Tensor
    description: str


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """The stdlib's top-level *.py files (site-packages and test suites are in subfolders, left
    out), split by file: crc32 of the name puts a fifth in validation and fixes the order, so the
    split does not depend on which other files a distribution ships."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda f: (zlib.crc32(f.name.encode()), f.name))
    val = [f for f in files if zlib.crc32(f.name.encode()) % 5 == 0]
    train = [f for f in files if zlib.crc32(f.name.encode()) % 5 != 0]
    return train, val


def _take(files: list[Path], budget: int) -> tuple[bytes, int]:
    """The first ``budget`` bytes of the files in order, and how many files they come from."""
    out = bytearray()
    used = 0
    for f in files:
        if len(out) >= budget:
            break
        out += f.read_bytes()
        used += 1
    if len(out) < budget:
        raise RuntimeError(f"the stdlib's top-level *.py files ({sysconfig.get_paths()['stdlib']}) hold only "
                           f"{len(out)} bytes, fewer than the budget {budget}")
    return bytes(out[:budget]), used


@functools.lru_cache(maxsize=None)
def stdlib_corpus(train_bytes: int, val_bytes: int, device: str) -> Corpus:
    """The GPT's text: the first ``train_bytes`` / ``val_bytes`` of the train / validation files."""
    import hashlib

    train_files, val_files = stdlib_files()
    (train, n_train), (val, n_val) = _take(train_files, train_bytes), _take(val_files, val_bytes)
    digest = hashlib.sha256(train + val).hexdigest()[:12]
    desc = (f"python {platform.python_version()} stdlib top-level *.py: {train_bytes} train bytes from "
            f"{n_train} files, {val_bytes} val bytes from {n_val} other files, sha256 {digest}")
    as_t = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).to(device)  # noqa: E731
    return Corpus(as_t(train), as_t(val), desc)


def classification_batches(data: Digits, batch: int, steps: int, seed: int):
    """``steps`` training batches: a fresh permutation per epoch, only full batches (one shape,
    so nothing recompiles)."""
    gen = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    per_epoch = n // batch
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen).to(data.x_train.device)
        for i in range(min(per_epoch, steps - done)):
            idx = perm[i * batch:(i + 1) * batch]
            yield data.x_train[idx], data.y_train[idx]
        done += min(per_epoch, steps - done)


def text_batches(corpus: Corpus, batch: int, seq: int, steps: int, seed: int):
    """``steps`` batches of random windows of the training bytes (inputs, next-byte targets)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, corpus.train.numel() - seq - 1, (steps, batch), generator=gen).to(corpus.train.device)
    offsets = torch.arange(seq + 1, device=corpus.train.device)
    for step in range(steps):
        window = corpus.train[starts[step, :, None] + offsets].long()
        yield window[:, :-1], window[:, 1:]


def text_windows(data: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping validation windows covering the validation bytes once."""
    n = (data.numel() - 1) // seq
    starts = torch.arange(n, device=data.device) * seq
    window = data[starts[:, None] + torch.arange(seq + 1, device=data.device)].long()
    return window[:, :-1], window[:, 1:]


# --------------------------------------------------------------------------- models
class DropLinear(nn.Module):
    """Dropout + Dense, the report's unit: the dropout is the linear's input, so the backend can
    fuse the pair into one block-sparse matmul. With ``output_dropout`` (the both arm) a second
    dropout drops the linear's output directly, so the backend fuses all three into one op."""

    def __init__(self, d_in: int, d_out: int, p: float, output_dropout: bool = False):
        super().__init__()
        self.drop = nn.Dropout(p)
        self.linear = nn.Linear(d_in, d_out)
        self.out_drop = nn.Dropout(p) if output_dropout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(self.drop(x))
        return y if self.out_drop is None else self.out_drop(y)


class MLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with ReLU; every linear gets a dropout before it, and with
    ``output_dropout`` the two hidden linears one after it too (before the ReLU)."""

    def __init__(self, hidden: int, p: float, output_dropout: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([DropLinear(64, hidden, p, output_dropout), DropLinear(hidden, hidden, p, output_dropout),
                                     DropLinear(hidden, 10, p)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Block(nn.Module):
    """Pre-LN transformer block; dropout before qkv, out, fc1, fc2, and inside the attention;
    with ``output_dropout`` also on the output of each of the four linears."""

    def __init__(self, d: int, heads: int, mlp_ratio: int, p: float, causal: bool, output_dropout: bool = False):
        super().__init__()
        self.heads, self.p, self.causal = heads, p, causal
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = DropLinear(d, 3 * d, p, output_dropout)
        self.out = DropLinear(d, d, p, output_dropout)
        self.fc1 = DropLinear(d, mlp_ratio * d, p, output_dropout)
        self.fc2 = DropLinear(mlp_ratio * d, d, p, output_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=self.causal)
        x = x + self.out(a.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _init_transformer(module: nn.Module) -> None:
    """GPT-style init (normal 0.02, zero biases): PyTorch's default linear init is too large
    for these widths to train stably in a few hundred steps."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """ViT for 8x8 digits: 2x2 patches -> 16 tokens, learned positions, mean-pooled head."""

    def __init__(self, cfg: TaskConfig, p: float, output_dropout: bool = False):
        super().__init__()
        d = cfg.hidden
        self.embed = nn.Linear(4, d)  # no dropout: 4 pixels per patch, narrower than any block
        self.pos = nn.Parameter(torch.zeros(1, 16, d))
        self.blocks = nn.ModuleList([Block(d, cfg.heads, cfg.mlp_ratio, p, causal=False, output_dropout=output_dropout)
                                     for _ in range(cfg.layers)])
        self.ln = nn.LayerNorm(d)
        self.head = DropLinear(d, 10, p)
        _init_transformer(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        patches = x.view(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
        h = self.embed(patches) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h).mean(1))


class CharGPT(nn.Module):
    """Byte-level decoder-only transformer (vocabulary 256); returns logits (B, S, 256)."""

    def __init__(self, cfg: TaskConfig, p: float, output_dropout: bool = False):
        super().__init__()
        d = cfg.hidden
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(cfg.seq, d)
        self.blocks = nn.ModuleList([Block(d, cfg.heads, cfg.mlp_ratio, p, causal=True, output_dropout=output_dropout)
                                     for _ in range(cfg.layers)])
        self.ln = nn.LayerNorm(d)
        self.head = DropLinear(d, 256, p)
        _init_transformer(self)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def build_model(task: str, cfg: TaskConfig, p: float, output_dropout: bool = False) -> nn.Module:
    """The task's model; ``output_dropout`` (the both arm) adds dropouts, never weights, so every
    arm's initial weights for a seed are the same."""
    if task == "digits-mlp":
        return MLP(cfg.hidden, p, output_dropout)
    if task == "digits-vit":
        return ViT(cfg, p, output_dropout)
    return CharGPT(cfg, p, output_dropout)


def loss_of(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float().flatten(0, -2), y.flatten())


# --------------------------------------------------------------------------- context
@dataclass(frozen=True)
class Context:
    """What every job needs to know about this study (picklable: it goes to the workers)."""

    device: str
    size: str
    compiler: str
    mode: str  # Inductor's mode for both arms: "default" or "reduce-overhead" (CUDA graphs)
    seeds: dict  # task -> number of seeds
    steps: int | None
    eval_every: int | None
    workers: int
    deadline: float | None  # time.time() after which no job starts
    lock_dir: str | None  # --parallel: the GPU lock files
    info: dict  # device name and versions, written into every row
    block_size: tuple[int, int] | None = None  # --block-size: the linears' blocks instead of the size's


def task_config(task: str, ctx: Context) -> TaskConfig:
    cfg = SIZES[task][ctx.size]
    changes = {k: v for k, v in (("steps", ctx.steps), ("eval_every", ctx.eval_every), ("block_size", ctx.block_size)) if v}
    return dataclasses.replace(cfg, **changes)


def amp_device(device: str) -> str | None:
    """bf16 autocast on CUDA (as the report's 16-mixed); fp32 on CPU."""
    return device if device == "cuda" else None


def autocast(device: str):
    return bf16_autocast(amp_device(device))


def sparsedrop_options(cfg: TaskConfig, inner: str, mode: str = "default", extra: tuple = ()) -> dict:
    options = {"block_size": cfg.block_size, "attention_block": cfg.attention_block, "inner": inner, **dict(extra)}
    if mode != "default":
        options["mode"] = mode  # torch.compile refuses mode= beside options=: the backend takes it here
    return options


def compile_arm(arm: Arm, model: nn.Module, cfg: TaskConfig, compiler: str, mode: str):
    """The arm's compiled model; both arms get the same inner compiler and Inductor mode."""
    if arm.backend == "sparsedrop":
        return torch.compile(model, backend="sparsedrop", options=sparsedrop_options(cfg, compiler, mode, arm.sparsedrop_extra))
    return torch.compile(model, backend=compiler, **({"mode": mode} if mode != "default" else {}))


def begin_step(mode: str) -> None:
    """Under CUDA graphs, tell Inductor a new iteration starts: the last replay's outputs (loss,
    gradients) have been consumed and may be overwritten."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


@contextlib.contextmanager
def gpu_phase(ctx: Context, exclusive: bool):
    """Under --parallel: hold the GPU exclusively (timed tasks) or shared (the others) while
    training. Readers-writer lock from two flock files: the turnstile makes new shared holders
    wait behind a waiting exclusive one, so a GPT run is never starved by a stream of digits runs."""
    if ctx.lock_dir is None:
        yield
        return
    with open(os.path.join(ctx.lock_dir, "turnstile"), "a") as turnstile, open(os.path.join(ctx.lock_dir, "gpu"), "a") as gpu:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(gpu, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(gpu, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- one run
@torch.no_grad()
def evaluate(task: str, model: nn.Module, cfg: TaskConfig, ctx: Context) -> tuple[float, float | None]:
    """(validation loss, accuracy or None) of the eager module in eval mode: the same code for
    every arm, so no compiler difference enters the metric."""
    model.eval()
    try:
        with autocast(ctx.device):
            if task in CLASSIFICATION:
                data = digits_data(ctx.device)
                out = model(data.x_val).float()
                return F.cross_entropy(out, data.y_val).item(), (out.argmax(-1) == data.y_val).float().mean().item()
            corpus = stdlib_corpus(cfg.train_bytes, cfg.val_bytes, ctx.device)
            x, y = text_windows(corpus.val, cfg.seq)
            total = torch.zeros((), device=ctx.device)
            step = cfg.eval_batch or cfg.batch
            for i in range(0, x.shape[0], step):
                out = model(x[i:i + step])
                total += F.cross_entropy(out.float().flatten(0, 1), y[i:i + step].flatten(), reduction="sum")
            return total.item() / y.numel(), None
    finally:
        model.train()


def train_batches(task: str, cfg: TaskConfig, device: str, seed: int):
    if task in CLASSIFICATION:
        return classification_batches(digits_data(device), cfg.batch, cfg.steps, seed)
    return text_batches(stdlib_corpus(cfg.train_bytes, cfg.val_bytes, device), cfg.batch, cfg.seq, cfg.steps, seed)


def fresh_weights(task: str, cfg: TaskConfig, seed: int) -> dict:
    """The initial weights of ``seed`` (the same for every arm and p: dropout has no weights)."""
    torch.manual_seed(seed)
    return build_model(task, cfg, 0.0).state_dict()


def train_run(task: str, model: nn.Module, compiled, cfg: TaskConfig, ctx: Context, seed: int, mode: str) -> tuple[dict, list[dict]]:
    """Train from ``seed``'s initial weights for cfg.steps steps, evaluating every cfg.eval_every.

    Returns the run's summary fields and its evaluation curve."""
    device = ctx.device
    model.load_state_dict(fresh_weights(task, cfg, seed))  # in place: the compiled code stays valid
    torch.manual_seed(seed + 1000)  # the dropout draws of this seed
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99),
                            **({"fused": True} if device == "cuda" else {}))
    cuda = device == "cuda"
    events, host_ms, step_ms = [], [], []
    curve: list[dict] = []
    loss_sum, loss_count = torch.zeros((), device=device), 0
    train_s = 0.0
    run_start = seg_start = time.perf_counter()
    for step, (x, y) in enumerate(train_batches(task, cfg, device, seed), start=1):
        if cfg.warmup:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, step / cfg.warmup)
        sample_host = cuda and step % HOST_SAMPLE_EVERY == 0
        if sample_host:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        loss = train_step(lambda x=x, y=y: loss_of(task, compiled(x), y), opt, autocast=amp_device(device), clip=cfg.clip,
                          cudagraphs=mode == "reduce-overhead")
        loss_sum += loss
        loss_count += 1
        if cuda:
            end.record()
            events.append((step, start, end))
            if sample_host:
                host_ms.append((time.perf_counter() - t0) * 1e3)
        else:
            step_ms.append((step, (time.perf_counter() - t0) * 1e3))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            harness.sync(device)
            train_s += time.perf_counter() - seg_start
            train_loss = loss_sum.item() / loss_count
            val_loss, val_acc = evaluate(task, model, cfg, ctx)
            curve.append({"step": step, "train_s": round(train_s, 4), "wall_s": round(time.perf_counter() - run_start, 4),
                          "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5),
                          "val_acc": "" if val_acc is None else round(val_acc, 5)})
            loss_sum.zero_()
            loss_count = 0
            seg_start = time.perf_counter()
    if cuda:
        step_ms = [(s, a.elapsed_time(b)) for s, a, b in events]
    skip = min(SKIP_STEPS, cfg.steps // 2)
    times = [ms for s, ms in step_ms if s > skip]
    fields = {"steps": cfg.steps, "train_s": round(train_s, 3), "wall_s": round(time.perf_counter() - run_start, 3),
              "median_step_ms": round(statistics.median(times), 3),
              "host_ms": round(statistics.median(host_ms), 3) if host_ms else "",
              "final_train_loss": curve[-1]["train_loss"]}
    return fields, curve


def best_eval(task: str, curve: list[dict]) -> dict:
    """The best evaluation (highest accuracy, ties to the lower loss; for the GPT the lowest loss)."""
    if task in CLASSIFICATION:
        return max(curve, key=lambda c: (c["val_acc"], -c["val_loss"]))
    return min(curve, key=lambda c: c["val_loss"])


# --------------------------------------------------------------------------- one job
@dataclass(frozen=True)
class Job:
    task: str
    arm: str
    p: float


_TUNED: set = set()  # (task, backend) whose kernels this process has tuned (under the GPU lock)
WARMUP_CALLS = 3  # compile, then (under CUDA graphs) record, then one replay: none of it timed


def run_job(job: Job, ctx: Context) -> tuple[list[dict], list[dict]]:
    """Compile the job's model once, then train it from each seed. Returns (rows, curve rows);
    a failure becomes an error row instead of ending the study. Where CUDA graphs fail, the job
    runs again without them, and its rows say so."""
    seeds = list(range(ctx.seeds[job.task]))
    if ctx.deadline is not None and time.time() > ctx.deadline:
        return [{**job_fields(job, ctx, ctx.mode), "seed": s, "error": "skipped: --budget-s reached", "time_utc": now()} for s in seeds], []
    rows, curves = _attempt(job, ctx, ctx.mode)
    if ctx.mode != "default" and any(r.get("error") for r in rows):
        why = next(r["error"] for r in rows if r.get("error"))
        print(f"{job.task} {job.arm} p={job.p:g}: failed under mode={ctx.mode} ({why}); again with mode=default", flush=True)
        rows, curves = _attempt(job, ctx, "default")
        for r in rows:
            r["note"] = f"mode {ctx.mode} failed: {why}"[:300]
    return rows, curves


def job_fields(job: Job, ctx: Context, mode: str) -> dict:
    cfg = task_config(job.task, ctx)
    return {"task": job.task, "size": ctx.size, "arm": job.arm, "p": job.p, "workers": ctx.workers, "mode": mode,
            **ctx.info, **describe_config(job.task, cfg, ARMS[job.arm], ctx)}


def _attempt(job: Job, ctx: Context, mode: str) -> tuple[list[dict], list[dict]]:
    cfg = task_config(job.task, ctx)
    arm = ARMS[job.arm]
    seeds = list(range(ctx.seeds[job.task]))
    base = job_fields(job, ctx, mode)
    rows, curves = [], []
    timed = job.task in TIMED_TASKS
    torch._dynamo.reset()  # one compiled model per job: no cache entries pile up on shared code
    model = compiled = None
    skips_before = counters["inductor"]["cudagraph_skips"]  # the counters outlive dynamo.reset()
    try:
        model = build_model(job.task, cfg, job.p, arm.output_dropout).to(ctx.device).train()
        compiled = compile_arm(arm, model, cfg, ctx.compiler, mode)
        # Warm-up on one batch (no optimizer step; the weights are replaced per seed anyway):
        # compile forward and backward and, under CUDA graphs, record and replay them once. The
        # first sparsedrop compile of a timed task in a process also tunes the kernels: that one
        # holds the GPU, so other processes do not disturb the tuner's timings.
        x, y = next(iter(train_batches(job.task, cfg, ctx.device, seed=12345)))
        tune = timed and arm.backend == "sparsedrop" and (job.task, arm.backend) not in _TUNED
        with gpu_phase(ctx, exclusive=True) if tune else contextlib.nullcontext():
            t0 = time.perf_counter()
            for _ in range(WARMUP_CALLS if mode == "reduce-overhead" else 1):
                begin_step(mode)
                with autocast(ctx.device):
                    loss_of(job.task, compiled(x), y).backward()
                model.zero_grad(set_to_none=True)
            harness.sync(ctx.device)
            compile_s = round(time.perf_counter() - t0, 2)
        _TUNED.add((job.task, arm.backend))
    except Exception as err:  # noqa: BLE001  (recorded, the study goes on)
        return [{**base, "seed": s, "error": short_error(err), "time_utc": now()} for s in seeds], []
    skipped = counters["inductor"]["cudagraph_skips"] - skips_before
    if mode == "reduce-overhead" and skipped:
        # Inductor ran these graphs without CUDA graphs (its log says why): the step times then
        # include host time, which host_ms will show.
        base["note"] = f"Inductor skipped CUDA graphs for {skipped} graph(s)"
    for seed in seeds:
        row = {**base, "seed": seed, "compile_s": compile_s}
        try:
            with gpu_phase(ctx, exclusive=timed):
                fields, curve = train_run(job.task, model, compiled, cfg, ctx, seed, mode)
            best = best_eval(job.task, curve)
            row.update(fields)
            row.update(best_val_loss=best["val_loss"], best_val_acc=best["val_acc"], best_step=best["step"],
                       best_train_s=best["train_s"], best_wall_s=best["wall_s"],
                       eval_steps=";".join(str(c["step"]) for c in curve),
                       eval_train_s=";".join(str(c["train_s"]) for c in curve),
                       eval_wall_s=";".join(str(c["wall_s"]) for c in curve),
                       eval_val=";".join(str(c["val_acc"] if job.task in CLASSIFICATION else c["val_loss"]) for c in curve))
            curves += [{"task": job.task, "arm": job.arm, "p": job.p, "seed": seed, **c} for c in curve]
        except Exception as err:  # noqa: BLE001
            row["error"] = short_error(err)
        row["time_utc"] = now()
        rows.append(row)
    del compiled, model
    torch._dynamo.reset()
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
    return rows, curves


def describe_config(task: str, cfg: TaskConfig, arm: Arm, ctx: Context) -> dict:
    """The settings a row's numbers depend on."""
    if task == "digits-mlp":
        model = f"mlp 64-{cfg.hidden}-{cfg.hidden}-10"
    else:
        model = f"{'vit' if task == 'digits-vit' else 'gpt'} {cfg.layers}x{cfg.hidden} h{cfg.heads}" + (f" seq{cfg.seq}" if cfg.seq else "")
    if arm.output_dropout:
        model += " +output dropout"
    block = arm.backend == "sparsedrop"
    return {"model": model, "batch": cfg.batch, "lr": cfg.lr,
            "compiler": "sparsedrop" if block else ctx.compiler, "inner": ctx.compiler if block else "",
            "block_size": "x".join(map(str, cfg.block_size)) if block else "",
            "attention_block": "x".join(map(str, cfg.attention_block)) if block and task != "digits-mlp" else "",
            "corpus": stdlib_corpus(cfg.train_bytes, cfg.val_bytes, "cpu").description if task == "gpt" else "sklearn digits 1257/540"}


def short_error(err: BaseException) -> str:
    last = traceback.format_exception_only(type(err), err)[-1].strip()
    return last.replace("\n", " ")[:300]


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- explain / checks
def example_batch(task: str, cfg: TaskConfig, device: str):
    return next(iter(train_batches(task, cfg, device, seed=0)))


def explain_task(task: str, cfg: TaskConfig, p: float, device: str, arm: str = "block"):
    """sd.explain() of a sparsedrop arm (its model, its options): which dropouts became block
    dropout, on which side, which did not and why. The decisions do not depend on the kernels,
    so explain's one forward runs the PyTorch reference (no Triton compiles or tuning in the
    parent process)."""
    torch.manual_seed(0)
    model = build_model(task, cfg, p, ARMS[arm].output_dropout).to(device)
    x, _ = example_batch(task, cfg, device)
    options = {"block_size": cfg.block_size, "attention_block": cfg.attention_block, "kernel": "reference",
               **dict(ARMS[arm].sparsedrop_extra)}
    with autocast(device):
        return sd.explain(model, x, options=options)


def input_grad_blocks(arm: str, cfg: TaskConfig, p: float, device: str, compiler: str, mode: str, calls: int = 4) -> dict:
    """Evidence that the compiled MLP really drops blocks, in the study's own configuration
    (compiler, mode: under CUDA graphs the last calls are replays). The first dropout sits on the
    input x, so x's gradient is (dY W) * mask / (1 - p): exactly zero where the mask is. Zeros
    that fill whole block_size tiles, and no tile only in part, are block dropout; scattered zeros
    are element dropout. Returns, for the last call, the fraction of tiles all zero and the
    number only partly zero (most over all calls), and whether the last two calls dropped
    different tiles (new masks every step)."""
    torch.manual_seed(0)
    model = MLP(cfg.hidden, p).to(device).train()
    torch._dynamo.reset()
    compiled = compile_arm(ARMS[arm], model, cfg, compiler, mode)
    x, y = example_batch("digits-mlp", cfg, device)
    x = x.clone().requires_grad_(True)
    br, bc = cfg.block_size
    rows, cols = x.shape[0] // br * br, x.shape[1] // bc * bc
    patterns, partial = [], 0
    for _ in range(calls):
        begin_step(mode)
        x.grad = None
        with autocast(device):
            F.cross_entropy(compiled(x).float(), y).backward()
        zero = (x.grad == 0)[:rows, :cols].reshape(rows // br, br, cols // bc, bc)
        full, any_ = zero.all(3).all(1), zero.any(3).any(1)
        partial = max(partial, int((any_ & ~full).sum()))
        patterns.append(full.cpu())
    x.grad = None  # under CUDA graphs it lives in the graphs' memory pool, which reset() drops
    del compiled
    torch._dynamo.reset()
    return {"tiles": patterns[-1].numel(), "dropped_fraction": patterns[-1].float().mean().item(), "partial_tiles": partial,
            "masks_vary": not torch.equal(patterns[-1], patterns[-2])}


def unit_blocks(arm: str, cfg: TaskConfig, p: float, device: str, compiler: str, mode: str, calls: int = 4) -> dict:
    """Evidence for both sides of one fused op: the MLP's first unit with its output dropout
    (dropout -> linear -> dropout, as in the both arm), compiled as ``arm`` compiles (compiler,
    mode). Its output is (x W^T + b) * output mask / (1 - p), with x W^T + b nonzero almost surely,
    so the output's zeros are the output mask. With a dense upstream gradient g, x's gradient is
    ((g * output mask) W) * input mask / (1 - p)**2: zero on the input mask's tiles, and on whole
    row blocks whose output tiles were all dropped; nowhere else. (Through the whole both-arm MLP
    the input gradient also vanishes on single rows that no later mask or ReLU lets a gradient
    reach, so it is measured on this unit alone.) Returns, per side ("output", "input_grad"), the
    fields of input_grad_blocks over block_size tiles."""
    torch.manual_seed(0)
    unit = DropLinear(64, cfg.hidden, p, output_dropout=True).to(device).train()
    torch._dynamo.reset()
    compiled = compile_arm(ARMS[arm], unit, cfg, compiler, mode)
    x, _ = example_batch("digits-mlp", cfg, device)
    x = x.clone().requires_grad_(True)
    g = torch.randn(x.shape[0], cfg.hidden, generator=torch.Generator().manual_seed(0)).to(device)
    br, bc = cfg.block_size

    def tiles(zero: torch.Tensor) -> tuple[torch.Tensor, int]:
        rows, cols = zero.shape[0] // br * br, zero.shape[1] // bc * bc
        zero = zero[:rows, :cols].reshape(rows // br, br, cols // bc, bc)
        full, any_ = zero.all(3).all(1), zero.any(3).any(1)
        return full.cpu(), int((any_ & ~full).sum())

    patterns = {"output": [], "input_grad": []}
    partial = {"output": 0, "input_grad": 0}
    for _ in range(calls):  # with autograd on, as in training
        begin_step(mode)
        x.grad = None
        with autocast(device):
            out = compiled(x)
        zero_out = out.detach() == 0
        (out.float() * g).sum().backward()
        for side, zero in (("output", zero_out), ("input_grad", x.grad == 0)):
            full, part = tiles(zero)
            patterns[side].append(full)
            partial[side] = max(partial[side], part)
    x.grad = None  # under CUDA graphs it lives in the graphs' memory pool, which reset() drops
    del compiled, out
    torch._dynamo.reset()
    return {side: {"tiles": pats[-1].numel(), "dropped_fraction": pats[-1].float().mean().item(), "partial_tiles": partial[side],
                   "masks_vary": not torch.equal(pats[-1], pats[-2])} for side, pats in patterns.items()}


# --------------------------------------------------------------------------- results files
RUN_FIELDS = [
    "task", "size", "arm", "p", "seed", "best_val_acc", "best_val_loss", "best_step", "best_train_s", "best_wall_s",
    "steps", "final_train_loss", "train_s", "wall_s", "median_step_ms", "host_ms", "compile_s",
    "eval_steps", "eval_train_s", "eval_wall_s", "eval_val", "model", "batch", "lr", "compiler", "inner", "block_size",
    "attention_block", "mode", "sites_rewritten", "sites_total", "workers", "device", "device_name", "torch", "triton", "python",
    "corpus", "note", "error", "time_utc",
]
CURVE_FIELDS = ["task", "arm", "p", "seed", "step", "train_s", "wall_s", "train_loss", "val_loss", "val_acc"]
NUMBER_FIELDS = ("p", "seed", "best_val_acc", "best_val_loss", "best_step", "best_train_s", "best_wall_s", "steps",
                 "final_train_loss", "train_s", "wall_s", "median_step_ms", "host_ms", "compile_s", "batch", "lr",
                 "sites_rewritten", "sites_total", "workers", "step", "train_loss", "val_loss", "val_acc")


def read_csv(path: Path) -> list[dict]:
    rows = harness.read_csv(path)
    for row in rows:
        for k in NUMBER_FIELDS:
            if row.get(k) not in (None, ""):
                row[k] = float(row[k])
    return rows


def env_info(device: str) -> tuple[dict, str]:
    name = harness.device_name(device, cpu=f"cpu ({platform.machine()}, {os.cpu_count()} cores)")
    slug = harness.slug(name) if device == "cuda" else "cpu"
    return {"device": device, "device_name": name, **harness.versions("torch", "triton", "python")}, slug


# --------------------------------------------------------------------------- summary
def ok_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("error") and r.get("best_val_loss") not in (None, "")]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def primary(task: str, row: dict) -> float:
    """The quantity a run is judged by: validation accuracy (digits) or loss (GPT)."""
    return row["best_val_acc"] if task in CLASSIFICATION else row["best_val_loss"]


def group(rows: list[dict], task: str, arm: str, p: float | None = None) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for r in ok_rows(rows):
        if r["task"] == task and r["arm"] == arm and (p is None or r["p"] == p):
            out.setdefault(r["p"], []).append(r)
    return out


def best_p(rows: list[dict], task: str, arm: str) -> float | None:
    """The arm's p with the best mean primary metric over seeds."""
    groups = group(rows, task, arm)
    if not groups:
        return None
    sign = 1 if task in CLASSIFICATION else -1
    return max(groups, key=lambda p: sign * statistics.fmean(primary(task, r) for r in groups[p]))


def time_to_quality(rows: list[dict]) -> dict | None:
    """GPT, per seed: block arm (its best p) training time until its validation loss first
    reaches the element arm's best loss (its best p, same seed), over the element arm's time."""
    pe, pb = best_p(rows, "gpt", "element"), best_p(rows, "gpt", "block")
    if pe is None or pb is None:
        return None
    elem = {int(r["seed"]): r for r in group(rows, "gpt", "element", pe)[pe]}
    block = {int(r["seed"]): r for r in group(rows, "gpt", "block", pb)[pb]}
    ratios, times, missed = [], [], []
    for seed in sorted(set(elem) & set(block)):
        target, t_elem = elem[seed]["best_val_loss"], elem[seed]["best_train_s"]
        losses = [float(v) for v in block[seed]["eval_val"].split(";")]
        t_block = [float(v) for v in block[seed]["eval_train_s"].split(";")]
        hit = next((t for loss, t in zip(losses, t_block) if loss <= target), None)
        if hit is None:
            missed.append(seed)
        else:
            ratios.append(hit / t_elem)
            times.append((hit, t_elem))
    return {"p_element": pe, "p_block": pb, "ratios": ratios, "times": times, "missed": missed,
            "seeds": len(set(elem) & set(block))}


def fmt_mean_std(values: list[float], digits: int = 3, scale: float = 1.0) -> str:
    if not values:
        return "-"
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def summary_rows(rows: list[dict], arms: list[str]) -> list[dict]:
    """Table 1: per task and arm, its best p and the mean ± std at that p."""
    out = []
    for task in TASKS:
        for arm in arms:
            p = 0.0 if not ARMS[arm].uses_p else best_p(rows, task, arm)
            runs = group(rows, task, arm, p).get(p, []) if p is not None else []
            if not runs:
                continue
            out.append({
                "task": task, "arm": arm, "best_p": "-" if not ARMS[arm].uses_p else f"{p:g}", "n": len(runs),
                "val_acc": fmt_mean_std([r["best_val_acc"] for r in runs], 2, 100) if task in CLASSIFICATION else "-",
                "val_loss": fmt_mean_std([r["best_val_loss"] for r in runs], 3),
                "time_to_best_s": fmt_mean_std([r["best_train_s"] for r in runs], 1),
                "step_ms": fmt_mean_std([r["median_step_ms"] for r in runs], 2),
                "host_ms": fmt_mean_std([r["host_ms"] for r in runs if r.get("host_ms") not in (None, "")], 2),
            })
    return out


TABLE_COLUMNS = [("task", "task"), ("arm", "arm"), ("best_p", "best p"), ("n", "seeds"), ("val_acc", "val acc (%)"),
                 ("val_loss", "val loss"), ("time_to_best_s", "train s to best"), ("step_ms", "step ms"),
                 ("host_ms", "host ms")]


def text_table(table: list[dict]) -> str:
    cells = [[h for _, h in TABLE_COLUMNS]] + [[str(r[k]) for k, _ in TABLE_COLUMNS] for r in table]
    for i in range(len(cells) - 1, 1, -1):  # the task name once per block
        if cells[i][0] == cells[i - 1][0]:
            cells[i][0] = ""
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(table: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h in TABLE_COLUMNS) + " |"
    sep = "|" + "---|" * len(TABLE_COLUMNS)
    return "\n".join([head, sep] + ["| " + " | ".join(str(r[k]) for k, _ in TABLE_COLUMNS) + " |" for r in table])


def ttq_text(ttq: dict | None) -> str:
    if ttq is None:
        return "time-to-quality (gpt): needs element and block runs"
    head = (f"time-to-quality (gpt): block p={ttq['p_block']:g} to reach element p={ttq['p_element']:g}'s best "
            f"validation loss (per seed, training time without evaluations)")
    if not ttq["ratios"]:
        return head + f": not reached in any of {ttq['seeds']} seeds"
    m, s = mean_std(ttq["ratios"])
    detail = ", ".join(f"{b:.1f} s vs {e:.1f} s" for b, e in ttq["times"])
    missed = f"; not reached in seed(s) {ttq['missed']}" if ttq["missed"] else ""
    return head + f": ratio {m:.2f} ± {s:.2f} block/element over {len(ttq['ratios'])} of {ttq['seeds']} seeds ({detail}){missed}"


def step_time_text(rows: list[dict], task: str) -> str:
    """Median step time (ms, mean over seeds) of every arm at every p: the speed side of the study."""
    lines = [f"step time of {task} (ms, median step, mean over seeds; host ms = enqueue time of one step):"]
    for arm in ARMS:
        groups = group(rows, task, arm)
        if groups:
            parts = []
            for p in sorted(groups):
                step = statistics.fmean(r["median_step_ms"] for r in groups[p])
                hosts = [r["host_ms"] for r in groups[p] if r.get("host_ms") not in (None, "")]
                parts.append(f"p={p:g} {step:.2f}" + (f" (host {statistics.fmean(hosts):.2f})" if hosts else ""))
            lines.append(f"  {arm:8s} " + ", ".join(parts))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Best validation metric against p, mean ± std over seeds, one panel per task."""
    plt = harness.pyplot()
    if plt is None:
        return
    tasks = [t for t in TASKS if any(r["task"] == t for r in ok_rows(rows))]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        scale = 100 if task in CLASSIFICATION else 1
        for arm in ARMS:
            groups = group(rows, task, arm)
            if not groups:
                continue
            ps = sorted(groups)
            stats = [mean_std([primary(task, r) * scale for r in groups[p]]) for p in ps]
            means, stds = [m for m, _ in stats], [s for _, s in stats]
            if ARMS[arm].uses_p:
                ax.errorbar(ps, means, yerr=stds, marker="o", capsize=3, label=ARMS[arm].label)
            else:
                ax.axhline(means[0], color="gray", linestyle="--", label=f"{ARMS[arm].label} (p = 0)")
                ax.axhspan(means[0] - stds[0], means[0] + stds[0], color="gray", alpha=0.15)
        ax.set_title(task)
        ax.set_xlabel("dropout p")
        ax.set_ylabel("best val accuracy (%)" if task in CLASSIFICATION else "best val loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 75 * len(tasks))), fontsize=9)
    harness.save_figure(fig, path, dpi=120)


def write_summary(rows: list[dict], arms: list[str], stem: Path, title: str) -> str:
    table = summary_rows(rows, arms)
    ttq = time_to_quality(rows) if any(r["task"] == "gpt" for r in ok_rows(rows)) else None
    text = [title, text_table(table)]
    if any(r["task"] == "gpt" for r in ok_rows(rows)):
        text += [ttq_text(ttq), step_time_text(rows, "gpt")]
    errors = [r for r in rows if r.get("error")]
    if errors:
        text.append(f"{len(errors)} run(s) failed or were skipped: " + "; ".join(
            f"{r['task']} {r['arm']} p={r['p']} seed {r['seed']}: {r['error']}" for r in errors[:5]))
    md = [f"# Regularisation study: {title}", "", "Best p per arm (by mean over seeds), mean ± std at that p. "
          "Accuracy and loss from each run's best evaluation; time = training time to that evaluation.", "",
          markdown_table(table), ""]
    if any(r["task"] == "gpt" for r in ok_rows(rows)):
        md += [ttq_text(ttq), "", "```", step_time_text(rows, "gpt"), "```", ""]
    md += ["Dropout sites of each task's block-dropout arms (sparsedrop_compile.explain; tables in the _sites_ files):", ""]
    for task in TASKS:
        for arm in [a for a in ARMS if ARMS[a].backend == "sparsedrop"]:
            path = sites_path(stem, task, arm)
            if path.exists() and any(r["task"] == task for r in rows):
                head, count, *_ = path.read_text().splitlines() + ["", ""]
                md.append(f"- {head}: {count.removeprefix('sparsedrop: ')}")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    return "\n".join(text)


# --------------------------------------------------------------------------- the study
def plan_jobs(tasks: list[str], arms: list[str], ps: list[float]) -> list[Job]:
    """GPT first (its jobs are the long, serial lane), then the ViT, then the MLP; within a task
    the no-dropout run, then element and block side by side at each p, so a run cut short by the
    budget still has pairs to compare."""
    order = [t for t in ("gpt", "digits-vit", "digits-mlp") if t in tasks]
    jobs = []
    for task in order:
        jobs += [Job(task, a, 0.0) for a in arms if not ARMS[a].uses_p]
        jobs += [Job(task, a, p) for p in ps for a in arms if ARMS[a].uses_p]
    return jobs


_WORKER_CTX: Context | None = None


def _worker_init(ctx: Context, threads: int) -> None:
    import torch._inductor.config as inductor_config

    global _WORKER_CTX
    _WORKER_CTX = ctx
    inductor_config.compile_threads = threads  # the host's cores are shared by N workers
    # So are torch's intra-op threads: with each worker at the default (every core) the workers'
    # OpenMP threads outnumber the cores and spin against each other (a CPU run of two workers
    # took 20x longer per job than one worker).
    torch.set_num_threads(threads)


def _worker_run(job: Job):
    return job, *run_job(job, _WORKER_CTX)


def run_parallel(jobs: list[Job], ctx: Context, on_done) -> None:
    """Timed (GPT) jobs in up to two processes (one compiles while the other trains; more would
    only wait for the GPU), the other jobs in the remaining processes (see the docstring)."""
    import multiprocessing as mp

    spawn = mp.get_context("spawn")  # CUDA cannot be forked
    threads = max(1, (os.cpu_count() or 2) // ctx.workers)
    timed = [j for j in jobs if j.task in TIMED_TASKS]
    rest = [j for j in jobs if j.task not in TIMED_TASKS]
    n_timed = 0 if not timed else min(2, ctx.workers - 1) if rest else min(2, ctx.workers)
    pools, futures = [], {}
    for lane, n in ((timed, n_timed), (rest, ctx.workers - n_timed)):
        if lane:
            pool = ProcessPoolExecutor(max_workers=max(1, n), mp_context=spawn, initializer=_worker_init, initargs=(ctx, threads))
            pools.append(pool)
            futures.update({pool.submit(_worker_run, job): job for job in lane})
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                job = futures[fut]
                try:
                    _, rows, curves = fut.result()
                except Exception as err:  # a worker died (e.g. BrokenProcessPool): record, go on
                    rows = [{**job_fields(job, ctx, ctx.mode), "seed": s, "error": f"worker failed: {short_error(err)}",
                             "time_utc": now()} for s in range(ctx.seeds[job.task])]
                    curves = []
                on_done(job, rows, curves)
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="all", choices=(*TASKS, "all"))
    ap.add_argument("--size", default="gpu" if cuda else "tiny", choices=("tiny", "small", "gpu"))
    ap.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), help=f"of {', '.join(ARMS)} (default: {', '.join(DEFAULT_ARMS)})")
    ap.add_argument("--ps", nargs="+", type=float, default=list(DEFAULT_PS), help="dropout rates of the arms that use one (all but none)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per (task, arm, p); default 5 for digits, 3 for gpt (1 at --size tiny)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: the size's)")
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--block-size", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                    help="the block arms' blocks over the linears' activations, instead of the size's (every row names its blocks)")
    ap.add_argument("--compiler", default="auto", choices=("auto", "inductor", "aot_eager", "eager"),
                    help="baseline backend and sparsedrop's inner compiler; auto: inductor on CUDA, aot_eager on CPU")
    ap.add_argument("--mode", default="auto", choices=("auto", "default", "reduce-overhead"),
                    help="Inductor's mode for both arms; auto: reduce-overhead (CUDA graphs) with inductor on CUDA, else default")
    ap.add_argument("--parallel", type=int, default=1, help="worker processes (>= 2: the GPT lane plus digits workers)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no job after this many seconds (its rows say skipped)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    for arm in args.arms:
        if arm not in ARMS:
            ap.error(f"arm {arm!r}: expected one of {', '.join(ARMS)}")
    if args.block_size and min(args.block_size) < 1:
        ap.error(f"--block-size {args.block_size[0]} {args.block_size[1]}: expected two positive ints (rows, cols)")
    if any(not 0 < p < 1 for p in args.ps):
        ap.error("--ps: each p must be in (0, 1); the no-dropout arm is 'none'")
    if args.device == "cuda" and not cuda:
        ap.error("--device cuda: no CUDA device")
    if args.compiler == "auto":
        args.compiler = "inductor" if args.device == "cuda" else "aot_eager"
    if args.mode == "auto":
        args.mode = "reduce-overhead" if args.device == "cuda" and args.compiler == "inductor" else "default"
    if args.mode != "default" and (args.device != "cuda" or args.compiler != "inductor"):
        ap.error(f"--mode {args.mode}: CUDA graphs need --device cuda and --compiler inductor")
    return args


def both_sided_dropouts(task: str, cfg: TaskConfig) -> set[str]:
    """Module paths of the dropouts the both arm's model has on both sides of a linear (the
    DropLinears with an output dropout): explain must report each of them as "yes (both)"."""
    model = build_model(task, cfg, 0.1, output_dropout=True)
    return {f"{name}.{d}" for name, m in model.named_modules()
            if isinstance(m, DropLinear) and m.out_drop is not None for d in ("drop", "out_drop")}


def sites_path(stem: Path, task: str, arm: str) -> Path:
    """explain()'s table of one task's sparsedrop arm (the block arm's file keeps its old name)."""
    return Path(f"{stem}_sites_{task}.txt" if arm == "block" else f"{stem}_sites_{task}_{arm}.txt")


def explain_and_check(task: str, ctx: Context, p: float, stem: Path, arm: str = "block") -> tuple[int, int]:
    """Print and save which dropouts of the task become block dropout in a sparsedrop arm (and,
    for the MLP, that the compiled model's zeros really are whole blocks); warn about any left
    element-wise. Returns (sites rewritten, sites)."""
    cfg = task_config(task, ctx)
    report = explain_task(task, cfg, p, ctx.device, arm)
    attention = "" if task == "digits-mlp" else f", attention_block={cfg.attention_block}"
    arm_note = "" if arm == "block" else f", arm {arm}"
    text = f"{task} (size {ctx.size}{arm_note}, p={p:g}, block_size={cfg.block_size}{attention})\n{report}\n"
    if task == "digits-mlp" and arm == "both":
        # The element arm's compiler on the same unit, for contrast only (aot_eager: cheaper here).
        text += (f"layers.0 alone (dropout -> linear -> dropout) at p=0.5, zeros over {cfg.block_size[0]}x"
                 f"{cfg.block_size[1]} tiles, last of 4 calls:\n")
        for which, (compiler, mode) in {"element": ("aot_eager", "default"), "both": (ctx.compiler, ctx.mode)}.items():
            for side, c in unit_blocks(which, cfg, 0.5, ctx.device, compiler, mode).items():
                vary = f", {'new' if c['masks_vary'] else 'the same'} tiles from call to call" if which == "both" else ""
                text += (f"  {which} ({compiler}, mode {mode}), {side.replace('_', ' ')}: {c['dropped_fraction']:.0%} of "
                         f"{c['tiles']} tiles all zero, {c['partial_tiles']} partly zero{vary}\n")
    elif task == "digits-mlp":
        # The block arm as the study compiles it (kernels, compiler, CUDA graphs); the element
        # arm, for contrast only, on aot_eager (cheaper in this process).
        configs = {"element": ("aot_eager", "default"), "block": (ctx.compiler, ctx.mode)}
        text += f"input-gradient zeros at p=0.5 over {cfg.block_size[0]}x{cfg.block_size[1]} tiles, last of 4 calls:\n"
        for arm, (compiler, mode) in configs.items():
            c = input_grad_blocks(arm, cfg, 0.5, ctx.device, compiler, mode)
            vary = f", {'new' if c['masks_vary'] else 'the same'} tiles from call to call" if arm == "block" else ""
            text += (f"  {arm} ({compiler}, mode {mode}): {c['dropped_fraction']:.0%} of {c['tiles']} tiles all zero, "
                     f"{c['partial_tiles']} partly zero{vary}\n")
    sites_path(stem, task, arm).write_text(text)
    print(text, flush=True)
    if report.skipped:
        left = "; ".join(f"{s.location}: {s.reason}" for s in report.skipped)
        print(f"WARNING: {task}: {len(report.skipped)} dropout site(s) stay element-wise in the {arm} arm: {left}", flush=True)
    if ARMS[arm].output_dropout:
        expected = both_sided_dropouts(task, cfg)
        one_sided = [s for s in report.rewritten if s.module_path in expected and s.side != "both"]
        if one_sided:
            print(f"WARNING: {task}: {len(one_sided)} dropout(s) of the {arm} arm are block-dropped on one side only: "
                  + "; ".join(f"{s.location}: {s.side}" for s in one_sided), flush=True)
    return len(report.rewritten), len(report.sites)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    tasks = list(TASKS) if args.task == "all" else [args.task]
    info, slug = env_info(args.device)
    stem = args.out / (f"regularisation_{slug}" + ("" if args.size == "gpu" else f"_{args.size}"))
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = {t: args.seeds or SIZES[t][args.size].seeds for t in TASKS}
    lock_dir = tempfile.mkdtemp(prefix="sparsedrop-reg-") if args.parallel > 1 else None
    ctx = Context(args.device, args.size, args.compiler, args.mode, seeds, args.steps, args.eval_every, args.parallel,
                  t_start + args.budget_s if args.budget_s else None, lock_dir, info,
                  tuple(args.block_size) if args.block_size else None)
    title = (f"sparsedrop-compile regularisation, size {args.size}, {info['device_name']}, torch {info['torch']}, "
             f"triton {info['triton']}, python {info['python']}, compiler {args.compiler}, mode {args.mode}")
    print(title, flush=True)

    # The sites of each sparsedrop arm that runs (of the block arm when none does, as before).
    explained = [a for a in args.arms if ARMS[a].backend == "sparsedrop"] or ["block"]
    site_counts = {(task, arm): explain_and_check(task, ctx, args.ps[0], stem, arm) for task in tasks for arm in explained}

    csv_path, curve_path = Path(f"{stem}.csv"), Path(f"{stem}_curves.csv")
    # Rows of tasks not run now are kept, so tasks can run in separate calls.
    rows = [r for r in read_csv(csv_path) if r["task"] not in tasks]
    curves = [r for r in read_csv(curve_path) if r["task"] not in tasks]
    jobs = plan_jobs(tasks, args.arms, args.ps)
    n_runs = sum(seeds[j.task] for j in jobs)
    print(f"{len(jobs)} jobs, {n_runs} runs ({', '.join(f'{t}: {seeds[t]} seeds' for t in tasks)}), "
          f"{args.parallel} worker(s)" + (f", budget {args.budget_s:.0f} s" if args.budget_s else ""), flush=True)

    def on_done(job: Job, new_rows: list[dict], new_curves: list[dict]) -> None:
        for r in new_rows:
            if (job.task, job.arm) in site_counts:
                r["sites_rewritten"], r["sites_total"] = site_counts[job.task, job.arm]
        rows.extend(new_rows)
        curves.extend(new_curves)
        harness.write_csv(csv_path, rows, RUN_FIELDS)
        harness.write_csv(curve_path, curves, CURVE_FIELDS)
        good = [r for r in new_rows if not r.get("error")]
        if good:
            vals = [primary(job.task, r) * (100 if job.task in CLASSIFICATION else 1) for r in good]
            step = statistics.fmean(r["median_step_ms"] for r in good)
            print(f"[{time.time() - t_start:6.0f} s] {job.task:10s} {job.arm:7s} p={job.p:g}: best "
                  f"{'acc' if job.task in CLASSIFICATION else 'loss'} {fmt_mean_std(vals, 3)}, step {step:.2f} ms, "
                  f"compile {good[0].get('compile_s', '?')} s" + (f" ({good[0]['note']})" if good[0].get("note") else ""), flush=True)
        for r in new_rows:
            if r.get("error"):
                print(f"[{time.time() - t_start:6.0f} s] {job.task} {job.arm} p={job.p:g} seed {r['seed']}: {r['error']}", flush=True)

    if args.parallel > 1:
        run_parallel(jobs, ctx, on_done)
    else:
        for job in jobs:
            on_done(job, *run_job(job, ctx))

    plot(rows, Path(f"{stem}.png"), title)
    summary = write_summary(rows, args.arms, stem, title)
    if lock_dir:
        shutil.rmtree(lock_dir, ignore_errors=True)
    print("\n" + summary, flush=True)
    print(f"\nwrote {csv_path}, {curve_path}, {stem}.png, {stem}.md and {stem}_sites_<task>.txt "
          f"in {time.time() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

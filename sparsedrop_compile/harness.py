"""What the benchmarks, the CLI's demo and the tests that train share: one training step, the
timers, the environment columns of the results files, and CSV and plot writing.

Each script keeps its own settings (warm-up and repetition counts, columns, file names); this
module only holds the code they had in common. Importing it needs no GPU, Triton, transformers
or matplotlib: each is imported where it is used.
"""
from __future__ import annotations

import contextlib
import csv
import platform
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch


# --------------------------------------------------------------------------- training step
def bf16_autocast(device: str | None):
    """bf16 autocast on ``device`` ("cuda" or "cpu"); None: no autocast (a null context)."""
    if device is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def train_step(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, *, autocast: str | None = None,
               clip: float = 0.0, cudagraphs: bool = False) -> torch.Tensor:
    """One training step: ``loss_fn()`` (forward and loss) under bf16 autocast on the device
    ``autocast`` names (None: none), backward, gradient clipping to norm ``clip`` over the
    optimizer's parameters (0: none), the optimizer's step, and its zero_grad(set_to_none=True).

    ``cudagraphs``: the model was compiled with Inductor's CUDA graphs (mode="reduce-overhead");
    the step first tells Inductor a new iteration begins. The loss then lives in the graphs'
    memory pool, which the next replay overwrites: copy it to keep it past the next step.

    Returns the detached loss; nothing waits for the GPU.
    """
    if cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    with bf16_autocast(autocast):
        loss = loss_fn()
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def sync(device: str) -> None:
    """Wait for the GPU where ``device`` is "cuda"; nothing on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- timers
def do_bench(fn: Callable[[], object], *, warmup: int, rep: int) -> float:
    """Median ms of ``fn`` by ``triton.testing.do_bench`` (CUDA; warmup and rep in ms, as its own)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def capture_cuda_graph(fn: Callable[[], object], warmup_calls: int = 3) -> tuple[torch.cuda.CUDAGraph, object]:
    """Call ``fn`` ``warmup_calls`` times on a side stream (kernels compile and tune, the
    allocator settles), then capture one call: (the graph, that call's output, which lives in
    the graph's memory pool and is rewritten by every replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_calls(fn: Callable[[], object], n: int, device: str = "cuda") -> tuple[list[float], list]:
    """Call ``fn`` ``n`` times: (ms of each call, the calls' results). On CUDA each call is
    bracketed by CUDA events and the GPU is waited for once, at the end, so the calls queue back
    to back; elsewhere each call is timed by the wall clock."""
    outs = []
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            outs.append(fn())
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events], outs
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        outs.append(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return times, outs


# --------------------------------------------------------------------------- environment
def chosen(option: str, text: str, allowed: Iterable[str]) -> list[str]:
    """A benchmark's comma-separated choice (``--methods a,b``) from ``allowed``; exits naming
    the unknown ones and the valid choices."""
    allowed = tuple(allowed)
    picked = text.split(",")
    unknown = sorted(set(picked) - set(allowed))
    if unknown:
        raise SystemExit(f"{option}: unknown {unknown}; expected some of {allowed}")
    return picked


def device_name(device: str, cpu: str = "cpu") -> str:
    """The CUDA device's name where ``device`` is "cuda", else ``cpu`` (what the gpu column says)."""
    return torch.cuda.get_device_name() if device == "cuda" else cpu


def versions(*fields: str) -> dict[str, str]:
    """The versions the results files record, in the order asked: any of torch, triton,
    transformers, cuda (torch's CUDA) and python; "none" for one not installed."""
    def version(field: str) -> str:
        if field == "torch":
            return torch.__version__
        if field == "cuda":
            return torch.version.cuda or "none"
        if field == "python":
            return platform.python_version()
        if field not in ("triton", "transformers"):
            raise ValueError(f"versions: no field {field!r}")
        try:
            return __import__(field).__version__
        except ImportError:
            return "none"

    return {field: version(field) for field in fields}


def environment(device: str, fields: Iterable[str], cpu: str = "cpu") -> dict[str, str]:
    """The gpu column (``device_name``) followed by ``versions(*fields)``."""
    return {"gpu": device_name(device, cpu), **versions(*fields)}


def slug(name: str) -> str:
    """A device name as it appears in file names: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


# --------------------------------------------------------------------------- CSV and plots
def write_csv(path: str | Path, rows: list[dict], fields: Iterable[str] | None = None) -> None:
    """Write ``rows`` to ``path`` through a temporary file renamed over it, so a kill mid-write
    leaves the old file whole. ``fields``: the columns in order (other keys are left out);
    None: every key of the rows, in order of first appearance. Missing values are empty."""
    path = Path(path)
    if fields is None:
        fields = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of ``path`` as text ([] where there is no file); each script turns its numbers back."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def pyplot():
    """``matplotlib.pyplot`` drawing to files only (Agg), or None, said on stdout, where
    matplotlib is not installed (the bench extra brings it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return None
    return plt


def save_figure(fig, path: str | Path, dpi: int = 130) -> None:
    """Lay out, write and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)

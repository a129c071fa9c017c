"""``sparsedrop`` / ``python -m sparsedrop_compile``: demo, explain, bench."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsedrop_compile.harness import bf16_autocast, train_step

BENCHMARKS = {"kernels": "bench_kernels.py", "attention": "bench_attention.py", "model": "bench_model.py",
              "regularisation": "regularisation.py"}


class UsageError(Exception):
    """A bad command-line value: printed as one line naming it and what to do; exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of the usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected a positive integer")
    return value


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: the demo runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available to this PyTorch ({torch.__version__}); "
                         "leave --device out to run on the CPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _check_seq(model, seq: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if isinstance(limit, int) and seq > limit:
        raise UsageError(f"--seq {seq}: this model has position embeddings for {limit} tokens; use --seq {limit} or less")


def _default_inner(device: str) -> str:
    # Inductor's C++ compile of a whole model takes minutes on a small CPU; on a GPU it is the point.
    return "inductor" if device == "cuda" else "aot_eager"


def cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import sparsedrop_compile as sd
    from sparsedrop_compile.models import build_model, example_batch

    device = _device(args.device)
    gpu = device.type == "cuda"
    inner = args.inner or _default_inner(device.type)
    block = args.block_size or (128 if gpu else 32)
    options = {"block_size": block, "inner": inner}
    torch.manual_seed(0)
    model = build_model(args.model, size=args.size).to(device).train()
    _check_seq(model, args.seq)
    batch = example_batch(model, batch=args.batch, seq=args.seq, device=device)
    print(f"sparsedrop demo: {args.model} ({args.size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on {device}, "
          f"inner={inner}, block_size={block}, {args.steps} steps on one fixed batch of {args.batch}x{args.seq}")
    amp = device.type if gpu else None  # bf16 autocast on the GPU
    print("finding the dropout sites (sparsedrop_compile.explain)...", flush=True)
    with bf16_autocast(amp):
        report = sd.explain(model, **batch, options=options)
    print(report)

    losses, step_ms = _train(model, batch, "sparsedrop", options, args.steps, amp, tqdm)
    print("losses:", " ".join(f"{l:.3f}" for l in losses))
    print(f"sparsedrop step: {step_ms:.1f} ms (median after warm-up)")
    if gpu:
        torch.manual_seed(0)
        base = build_model(args.model, size=args.size).to(device).train()
        _, base_ms = _train(base, batch, "inductor", None, args.steps, amp, tqdm)
        name = torch.cuda.get_device_name(device)
        print(f"inductor step:   {base_ms:.1f} ms on {name}; speed-up {base_ms / step_ms:.2f}x")
    return 0


def _train(model, batch, backend, options, steps, amp, tqdm):
    kwargs = {"options": options} if options else {}
    compiled = torch.compile(model, backend=backend, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, times = [], []
    print(f"{backend}: compiling (first step)...", flush=True)
    for step in tqdm(range(steps), desc=backend, leave=False, disable=steps == 1):
        start = time.perf_counter()
        loss = train_step(lambda: compiled(**batch).loss, opt, autocast=amp)
        losses.append(loss.item())  # .item() synchronises, so the wall time is the step's
        times.append(time.perf_counter() - start)
        if step == 0:
            tqdm.write(f"{backend}: first step (compile and run) took {times[0]:.1f} s")
    warm = sorted(times[2:] or times)
    return losses, 1000 * warm[len(warm) // 2]


def cmd_explain(args: argparse.Namespace) -> int:
    import sparsedrop_compile as sd
    from sparsedrop_compile.models import FAMILIES, build_model, example_batch, load_model

    if args.model in FAMILIES:
        model = build_model(args.model, size="tiny", attn=args.attn)
    elif os.path.exists(args.model):
        try:
            model = load_model(args.model, attn=args.attn)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--model: {e}") from None
    else:
        raise UsageError(f"--model {args.model!r} is neither a model family ({', '.join(FAMILIES)}) nor an existing "
                         "path; give a family, or a HF model directory or config.json")
    _check_seq(model, args.seq)
    options = {"block_size": args.block_size} if args.block_size else None
    report = sd.explain(model, **example_batch(model, batch=args.batch, seq=args.seq), options=options)
    print(report)
    return 0


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    script = root / BENCHMARKS[args.what]
    if not script.exists():
        print(f"sparsedrop bench: {script} not found; run this from a source checkout of sparsedrop-compile "
              "(pip install -e .), where benchmarks/ sits beside the package", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *extra])


def build_parser() -> argparse.ArgumentParser:
    from sparsedrop_compile.models import FAMILIES, SIZES

    parser = _Parser(prog="sparsedrop", description="Block dropout fused into matmuls, as a torch.compile backend.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small T5 with the backend; print the sites, losses and step time")
    demo.add_argument("--model", default="t5", choices=FAMILIES)
    demo.add_argument("--size", default="demo", choices=sorted(SIZES))
    demo.add_argument("--steps", type=_positive_int, default=8)
    demo.add_argument("--batch", type=_positive_int, default=4)
    demo.add_argument("--seq", type=_positive_int, default=48)
    demo.add_argument("--block-size", type=_positive_int, default=None, help="mask block (default 128 on CUDA, 32 on CPU for the small demo model)")
    demo.add_argument("--inner", choices=("inductor", "aot_eager", "eager"), default=None, help="default: inductor on CUDA, aot_eager on CPU")
    demo.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    explain = sub.add_parser("explain", help="print the site table of a model family (tiny config) or a local HF config")
    explain.add_argument("--model", default="t5", help=f"one of {', '.join(FAMILIES)}, or a HF model directory / config.json")
    explain.add_argument("--attn", default="sdpa", choices=("eager", "sdpa"))
    # Large enough that the tiny models' activations hold the blocks max_drop_all asks for at the
    # default block size (T5's decoder gets seq / 2 tokens).
    explain.add_argument("--batch", type=_positive_int, default=8)
    explain.add_argument("--seq", type=_positive_int, default=256)
    explain.add_argument("--block-size", type=_positive_int, default=None, help="mask block (default: the backend's, 128)")
    bench = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (extra arguments go to it)")
    bench.add_argument("what", choices=sorted(BENCHMARKS))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return {"demo": cmd_demo, "explain": cmd_explain}[args.command](args)
    except UsageError as e:
        print(f"sparsedrop {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

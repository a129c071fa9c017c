"""``sparsedrop`` / ``python -m sparsedrop_compile``: demo, explain, bench."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCHMARKS = {"kernels": "bench_kernels.py", "attention": "bench_attention.py", "model": "bench_model.py",
              "regularisation": "regularisation.py"}


def _default_inner(device: str) -> str:
    # Inductor's C++ compile of a whole model takes minutes on a small CPU; on a GPU it is the point.
    return "inductor" if device == "cuda" else "aot_eager"


def cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import sparsedrop_compile as sd
    from sparsedrop_compile.models import build_model, example_batch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    inner = args.inner or _default_inner(device)
    block = args.block_size or (128 if device == "cuda" else 32)
    options = {"block_size": block, "inner": inner}
    torch.manual_seed(0)
    model = build_model(args.model, size=args.size).to(device).train()
    batch = example_batch(model, batch=args.batch, seq=args.seq, device=device)
    print(f"sparsedrop demo: {args.model} ({args.size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on {device}, "
          f"inner={inner}, block_size={block}, {args.steps} steps on one fixed batch of {args.batch}x{args.seq}")
    amp = dict(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")
    with torch.autocast(**amp):
        report = sd.explain(model, **batch, options=options)
    print(report)

    losses, step_ms = _train(model, batch, "sparsedrop", options, args.steps, amp, tqdm)
    print("losses:", " ".join(f"{l:.3f}" for l in losses))
    print(f"sparsedrop step: {step_ms:.1f} ms (median after warm-up)")
    if device == "cuda":
        torch.manual_seed(0)
        base = build_model(args.model, size=args.size).to(device).train()
        _, base_ms = _train(base, batch, "inductor", None, args.steps, amp, tqdm)
        name = torch.cuda.get_device_name()
        print(f"inductor step:   {base_ms:.1f} ms on {name}; speed-up {base_ms / step_ms:.2f}x")
    return 0


def _train(model, batch, backend, options, steps, amp, tqdm):
    kwargs = {"options": options} if options else {}
    compiled = torch.compile(model, backend=backend, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, times = [], []
    for _ in tqdm(range(steps), desc=backend, leave=False):
        start = time.perf_counter()
        with torch.autocast(**amp):
            loss = compiled(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() synchronises, so the wall time is the step's
        times.append(time.perf_counter() - start)
    warm = sorted(times[2:] or times)
    return losses, 1000 * warm[len(warm) // 2]


def cmd_explain(args: argparse.Namespace) -> int:
    import sparsedrop_compile as sd
    from sparsedrop_compile.models import FAMILIES, build_model, example_batch, load_model

    if args.model in FAMILIES:
        model = build_model(args.model, size="tiny", attn=args.attn)
    else:
        model = load_model(args.model, attn=args.attn)
    options = {"block_size": args.block_size} if args.block_size else None
    report = sd.explain(model, **example_batch(model, seq=args.seq), options=options)
    print(report)
    return 0


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    script = root / BENCHMARKS[args.what]
    if not script.exists():
        print(f"sparsedrop bench: {script} not found; run this from a source checkout of sparsedrop-compile "
              "(pip install -e .), where benchmarks/ sits beside the package", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root.parent), env.get("PYTHONPATH")]))
    return subprocess.call([sys.executable, str(script), *extra], env=env)


def build_parser() -> argparse.ArgumentParser:
    from sparsedrop_compile.models import FAMILIES, SIZES

    parser = argparse.ArgumentParser(prog="sparsedrop", description="Block dropout fused into matmuls, as a torch.compile backend.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small T5 with the backend; print the sites, losses and step time")
    demo.add_argument("--model", default="t5", choices=FAMILIES)
    demo.add_argument("--size", default="demo", choices=sorted(SIZES))
    demo.add_argument("--steps", type=int, default=8)
    demo.add_argument("--batch", type=int, default=4)
    demo.add_argument("--seq", type=int, default=48)
    demo.add_argument("--block-size", type=int, default=None, help="mask block (default 128 on CUDA, 32 on CPU for the small demo model)")
    demo.add_argument("--inner", choices=("inductor", "aot_eager", "eager"), default=None, help="default: inductor on CUDA, aot_eager on CPU")
    demo.add_argument("--device", default=None)
    explain = sub.add_parser("explain", help="print the site table of a model family (tiny config) or a local HF config")
    explain.add_argument("--model", default="t5", help=f"one of {', '.join(FAMILIES)}, or a HF model directory / config.json")
    explain.add_argument("--attn", default="sdpa", choices=("eager", "sdpa"))
    explain.add_argument("--seq", type=int, default=16)
    explain.add_argument("--block-size", type=int, default=None)
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
    return {"demo": cmd_demo, "explain": cmd_explain}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""Where the host (Python) time of a compiled training step goes: cProfile over a few steps.

    python benchmarks/profile_host.py --model t5 --p 0.5 --backend sparsedrop
"""
import argparse
import cProfile
import pstats

import torch

from sparsedrop_compile.harness import train_step
from sparsedrop_compile.models import build_model, example_batch  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="t5")
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--backend", default="sparsedrop")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model, size="base", dropout=args.p).cuda().train()
    batch = example_batch(model, batch=args.batch, seq=args.seq, device="cuda")
    compiled = torch.compile(model, backend=args.backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        train_step(lambda: compiled(**batch).loss, opt, autocast="cuda")

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    print(f"{args.model} p={args.p} {args.backend}: host seconds per step {stats.total_tt / args.steps * 1e3:.1f} ms (profiled)")
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()

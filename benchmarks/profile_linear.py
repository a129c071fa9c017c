"""Where the time of one dropout -> linear forward + backward goes, kernel by kernel (torch.profiler).

    python benchmarks/profile_linear.py [--shape 4096 4096 4096] [--ps 0 0.7]
"""
import argparse

import torch
import torch.nn.functional as F

import sparsedrop_compile  # noqa: E402,F401
from sparsedrop_compile.kernels.block_mask import dropout_scale, sample_block_keep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=3, default=(4096, 4096, 4096), metavar=("ROWS", "N", "K"))
    parser.add_argument("--ps", type=float, nargs="+", default=(0.0, 0.7))
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    rows, n, k = args.shape
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5).requires_grad_()
    dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    for p in args.ps:
        def step():
            keep = sample_block_keep(x, p, args.block, args.block, False)
            y = torch.ops.sparsedrop.linear(x, w, None, keep, dropout_scale(p), args.block, args.block, "triton")
            return torch.autograd.grad(y, (x, w), dy)

        def dense():
            return torch.autograd.grad(F.linear(x, w), (x, w), dy)

        for fn in (step, dense):
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            print(f"== {fn.__name__} p={p} {rows}x{n}x{k}: CUDA time per step, by kernel (us)")
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:10]:
                print(f"  {e.device_time_total / 10:9.1f}  x{e.count // 10:<3d} {e.key[:90]}")


if __name__ == "__main__":
    main()

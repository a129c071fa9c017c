"""Where the time of one dropout -> linear forward + backward goes, kernel by kernel (torch.profiler).

    python benchmarks/profile_linear.py [--shape 4096 4096 4096] [--ps 0 0.7]
    python benchmarks/profile_linear.py --decompose ...   # CUDA-graph replays of the op's parts
    python benchmarks/profile_linear.py --sustained ...   # ours and cuBLAS timed two ways, with clocks

--decompose times, each as one captured graph (do_bench medians, L2 flushed between replays as
do_bench does): the whole op through its three launchers with the flag draw (what
``bench_kernels.py``'s ``ours_launchers`` runs), the same without the draw (flags drawn once
outside), the draw alone, and each launcher alone (what ``bench_hopper_kernels.py`` sums), so
the whole op's time splits into the draw, the kernels and what running them back to back adds.
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
    parser.add_argument("--decompose", action="store_true", help="CUDA-graph times of the op's parts instead")
    parser.add_argument("--sustained", action="store_true",
                        help="ours and cuBLAS timed two ways (L2 flushed between replays / back to back), with clocks")
    args = parser.parse_args()
    if args.decompose:
        decompose(args)
        return
    if args.sustained:
        sustained(args)
        return
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


def decompose(args) -> None:
    from sparsedrop_compile.harness import capture_cuda_graph, do_bench
    from sparsedrop_compile.kernels import block_sparse_matmul_triton as tri

    rows, n, k = args.shape
    block = (args.block, args.block)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)  # as bench_kernels.py's ours_launchers
    a3 = x.unsqueeze(0)
    wt = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5).t().unsqueeze(0)
    dy = torch.randn(1, rows, n, device="cuda", dtype=torch.bfloat16)
    dw = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)

    def graph_ms(fn) -> float:
        graph, _keep_alive = capture_cuda_graph(fn)
        return do_bench(graph.replay, warmup=25, rep=100)

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {rows}x{n}x{k}, block {block}, bf16")
    for p in args.ps:
        scale = dropout_scale(p)
        fixed = sample_block_keep(x, p, *block, False)
        parts = {
            "fwd": lambda keep: tri.dsd(a3, wt, keep, scale, block),
            "dx": lambda keep: tri.sdd(dy, wt, keep, scale, block),
            "dw": lambda keep: tri.dsd_tn(a3, dy, keep, scale, block, False, out=dw.t().unsqueeze(0)),
        }

        def whole():
            keep = sample_block_keep(x, p, *block, False)
            return [part(keep) for part in parts.values()]

        times = {
            "whole op (draw + 3 launchers)": graph_ms(whole),
            "3 launchers, flags drawn outside": graph_ms(lambda: [part(fixed) for part in parts.values()]),
            "flag draw alone": graph_ms(lambda: sample_block_keep(x, p, *block, False)),
        }
        for name, part in parts.items():
            times[f"{name} launcher alone"] = graph_ms(lambda part=part: part(fixed))
        alone = sum(times[f"{name} launcher alone"] for name in parts)
        # cuBLAS the same way: its three matmuls in one graph, and each alone
        dense = {"fwd": lambda: x @ wt[0], "dx": lambda: dy[0] @ wt[0].t(), "dw": lambda: dy[0].t() @ x}
        times["cuBLAS, 3 matmuls back to back"] = graph_ms(lambda: [f() for f in dense.values()])
        dense_alone = sum(graph_ms(f) for f in dense.values())
        times["cuBLAS, sum of each alone"] = dense_alone
        print(f"== p={p}")
        for name, ms in times.items():
            print(f"  {ms * 1e3:8.1f} us  {name}")
        print(f"  {alone * 1e3:8.1f} us  sum of the launchers alone; back to back they add "
              f"{(times['3 launchers, flags drawn outside'] - alone) * 1e3:+.1f} us, the draw "
              f"{(times['whole op (draw + 3 launchers)'] - times['3 launchers, flags drawn outside']) * 1e3:+.1f} us")


def sustained(args) -> None:
    """The three launchers (flags drawn once) and cuBLAS's three matmuls, each timed as
    bench_kernels.py times (do_bench over CUDA-graph replays: L2 flushed and the GPU briefly idle
    between replays) and as bench_hopper_kernels.py times (do_bench_cudagraph: the calls back to
    back in one graph for ~60 ms, no flush), with the SM clock and power nvidia-smi reads meanwhile."""
    import statistics
    import subprocess
    import tempfile

    import triton
    from sparsedrop_compile.harness import capture_cuda_graph, do_bench
    from sparsedrop_compile.kernels import block_sparse_matmul_triton as tri

    rows, n, k = args.shape
    block = (args.block, args.block)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    a3 = x.unsqueeze(0)
    wt = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5).t().unsqueeze(0)
    dy = torch.randn(1, rows, n, device="cuda", dtype=torch.bfloat16)
    dw = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)

    def sampled(timer):
        with tempfile.NamedTemporaryFile("r", suffix=".csv") as log:
            smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                    "-lms", "20", "-f", log.name])
            try:
                ms = timer()
            finally:
                smi.terminate()
                smi.wait()
            samples = [line.split(",") for line in log.read().splitlines() if line.strip()]
        clock = statistics.median(float(c) for c, _ in samples) if samples else float("nan")
        power = statistics.median(float(w) for _, w in samples) if samples else float("nan")
        return ms, clock, power

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"{rows}x{n}x{k}, block {block}, bf16")
    for p in args.ps:
        scale = dropout_scale(p)
        keep = sample_block_keep(x, p, *block, False)
        steps = {
            "ours": lambda: (tri.dsd(a3, wt, keep, scale, block), tri.sdd(dy, wt, keep, scale, block),
                             tri.dsd_tn(a3, dy, keep, scale, block, False, out=dw.t().unsqueeze(0))),
            "cuBLAS": lambda: (x @ wt[0], dy[0] @ wt[0].t(), dy[0].t() @ x),
        }
        print(f"== p={p}: us per step of three products (SM clock MHz, power W, medians while timed)")
        for name, step in steps.items():
            graph, _keep_alive = capture_cuda_graph(step)
            flushed = sampled(lambda: do_bench(graph.replay, warmup=25, rep=300))
            back_to_back = sampled(lambda: triton.testing.do_bench_cudagraph(step, rep=300))
            for how, (ms, clock, power) in (("L2 flushed, idle between", flushed), ("back to back", back_to_back)):
                print(f"  {name:6s} {how:25s} {ms * 1e3:8.1f} us  ({clock:5.0f} MHz, {power:4.0f} W)")


if __name__ == "__main__":
    main()

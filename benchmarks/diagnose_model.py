"""Which rewrite costs or saves time in a model's training step: one model, several option sets,
side by side in one process (bf16 autocast, fwd + bwd + AdamW, CUDA-event timings).

For each option set it prints the step time (median, min, max) with Python's garbage collector
on and off, the host time to enqueue a step (close to the step time means the step is bound by
the CPU, not the GPU), and with --profile the GPU kernel time per step by kernel family, so a
difference between option sets can be traced to the kernels (or the gaps between them).

    python benchmarks/diagnose_model.py --model t5 --p 0.1 --profile --out /tmp/diag

``--mode reduce-overhead`` compiles both under CUDA graphs; ``--host-profile`` then prints the host
operations by own CPU time per step (torch's profiler), which shows what still runs on the CPU
around the graph replays.
"""
import argparse
import collections
import gc
import os
import statistics
import time

import torch

from sparsedrop_compile import harness
from sparsedrop_compile.models import build_model, example_batch  # noqa: E402

VARIANTS = {
    "inductor": ("inductor", None),
    "sparsedrop": ("sparsedrop", {}),
    "no_attention": ("sparsedrop", {"attention": False}),
    "input_side_only": ("sparsedrop", {"output_side": False}),
    "attention_only": ("sparsedrop", {"exclude": ["kind:linear", "kind:matmul", "kind:addmm"]}),
}

# Kernel families by a substring of the kernel name, first match wins.
FAMILIES = (
    ("sd_attention_fwd", ("_attn_fwd",)),
    ("sd_attention_bwd", ("_attn_bwd", "_classify_mask")),
    ("sd_matmul", ("_dsd_kernel", "_sdd_kernel", "_dsd_tn_kernel")),
    ("sdpa", ("flash", "fmha", "attention", "efficient")),
    ("cublas_gemm", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_")),
    ("inductor_triton", ("triton_",)),
    ("optimizer", ("multi_tensor", "fused_adam", "adamw")),
    ("copy_fill", ("copy", "fill", "elementwise", "reduce", "index", "cat", "memcpy", "memset")),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k.lower() in low for k in keys):
            return fam
    return "other"


def train_step(compiled, batch, opt):
    harness.train_step(lambda: compiled(**batch).loss, opt, autocast="cuda")


def time_steps(compiled, batch, opt, steps):
    gpu, host = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        train_step(compiled, batch, opt)
        end.record()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    return gpu, host


def kernel_times(compiled, batch, opt, steps):
    """GPU kernel time per step by kernel family, and the top kernels, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step(compiled, batch, opt)
        torch.cuda.synchronize()
    per_kernel = collections.Counter()
    calls = collections.Counter()
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = getattr(evt, "device_time", None)
        if t is None:
            t = evt.cuda_time
        per_kernel[evt.name] += t / 1e3 / steps  # ms per step
        calls[evt.name] += 1 / steps
    per_family = collections.Counter()
    for name, ms in per_kernel.items():
        per_family[family(name)] += ms
    return per_family, per_kernel, calls


def host_ops(compiled, batch, opt, steps, top=18):
    """The host operations of a step by own CPU time (ms per step), from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(compiled, batch, opt)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) / 1e3 / steps
    print(f"    host ops: {total:.2f} ms of own CPU time per step; top {top}:")
    for e in rows[:top]:
        print(f"      {e.self_cpu_time_total / 1e3 / steps:7.3f} ms {e.count / steps:6.1f}x  {e.key[:100]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="t5")
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--profile", action="store_true", help="also print kernel time by family")
    parser.add_argument("--out", default=None, help="folder for the full per-kernel tables")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--host-profile", action="store_true", help="also print host operations by own CPU time")
    args = parser.parse_args()
    print(f"{harness.device_name('cuda')} torch {torch.__version__}; {args.model} base, batch {args.batch}x{args.seq}, "
          f"p={args.p}, mode {args.mode or 'default'}", flush=True)
    summary = []
    for name in args.variants:
        backend, options = VARIANTS[name]
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build_model(args.model, size="base", dropout=args.p).cuda().train()
        batch = example_batch(model, batch=args.batch, seq=args.seq, device="cuda")
        # torch.compile refuses mode= together with options=: sparsedrop takes its mode in options.
        mode = {} if args.mode is None else {"mode": args.mode}
        kwargs = {"options": {**options, **mode}} if options is not None else mode
        compiled = torch.compile(model, backend=backend, **kwargs)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        time_steps(compiled, batch, opt, 3)  # compile, tune, warm up
        gpu, host = time_steps(compiled, batch, opt, args.steps)
        gc.disable()
        try:
            gpu_nogc, _ = time_steps(compiled, batch, opt, args.steps)
        finally:
            gc.enable()
        med = statistics.median(gpu)
        line = (f"  {name:16s} {med:7.1f} ms/step (min {min(gpu):.1f}, max {max(gpu):.1f}); gc off "
                f"{statistics.median(gpu_nogc):.1f} (max {max(gpu_nogc):.1f}); host enqueue {statistics.median(host):.1f} ms")
        print(line, flush=True)
        print("    steps: " + " ".join(f"{t:.1f}" for t in gpu), flush=True)
        row = {"variant": name, "median": med}
        if args.host_profile:
            host_ops(compiled, batch, opt, 5)
        if args.profile:
            fams, kernels, calls = kernel_times(compiled, batch, opt, 3)
            total = sum(fams.values())
            launched = collections.Counter()
            for k, n in calls.items():
                launched[family(k)] += n
            print(f"    GPU kernel time {total:.1f} ms/step; idle {med - total:.1f} ms; " +
                  ", ".join(f"{f} {ms:.1f}" for f, ms in fams.most_common()), flush=True)
            print(f"    kernels per step {sum(launched.values()):.0f}: " +
                  ", ".join(f"{f} {n:.0f}" for f, n in launched.most_common()), flush=True)
            row.update(fams, kernel_total=total)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, f"kernels_{args.model}_{name}.txt"), "w") as f:
                    for k, ms in kernels.most_common():
                        f.write(f"{ms:9.3f} ms {calls[k]:6.1f}x  {family(k):16s} {k[:160]}\n")
            for k, ms in kernels.most_common(8):
                print(f"      {ms:7.2f} ms {calls[k]:5.0f}x {family(k):16s} {k[:90]}")
        summary.append(row)
        del model, compiled, opt
        gc.collect()
        torch.cuda.empty_cache()
    if args.profile:
        fams = sorted({k for r in summary for k in r if k not in ("variant", "median")})
        print("\nms/step by kernel family")
        print(f"{'variant':16s} {'step':>7s} " + " ".join(f"{f[:12]:>12s}" for f in fams))
        for r in summary:
            print(f"{r['variant']:16s} {r['median']:7.1f} " + " ".join(f"{r.get(f, 0.0):12.2f}" for f in fams))


if __name__ == "__main__":
    main()

"""Host (CPU) time per rewritten site, forward + backward, sparsedrop against Inductor, per family.

Question: a compiled training step is only as fast as the host can enqueue its kernels. How many
microseconds of host time does a rewritten site (dropout + matmul, forward and backward) cost,
against what Inductor spends on the dropout + matmul it replaces?

Method: for each family a function chains SITES sites (linear: x = linear_i(dropout(x));
residual (the output side): x = x + dropout(linear_i(x)); batched matmul: v = dropout(P_i) @ v;
attention: q = SDPA(q, k_i, v_i, dropout_p)). It is
compiled with backend="sparsedrop" and with backend="inductor" (default mode, bf16), and one
forward + backward of it is timed while the GPU is kept busy (torch.cuda._sleep), so each call
only enqueues work and its wall time is host time alone. Per site = (time with SITES sites -
time with 1 site) / (SITES - 1): the marginal cost, without the fixed cost of calling a compiled
function. Median of --reps rounds, each timing --calls calls of every variant in turn (both
backends, both site counts), so a drift of the host's speed reaches all of them alike; wall time
(host_us_*) and the process's CPU time (cpu_us_per_site, all threads, not counting time the
process was preempted). launches_per_site counts, the same way, the launching calls in
Inductor's generated code (Triton kernels, extern kernels such as cuBLAS, ATen ops). --calls
stays small: the GPU's launch queue holds about a thousand launches, and once it is full the
host waits for the GPU, so the loop would time the GPU's sleep instead of the host (the first
run here did, reading ~10 ms for everything).

Also the eager functional form (no compile): ``sparse_dropout_linear`` forward + backward called
from Python, wall time per call against its CUDA-graph replay, at three shapes from 4096^3 up,
with the eager path's launch plans and without them (rounds alternate between the two).

    python benchmarks/host_overhead.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import sparsedrop_compile as sd
from sparsedrop_compile import harness
from sparsedrop_compile.harness import capture_cuda_graph, do_bench

SITES = 8


def host_us(fns: dict, calls: int, reps: int, warmup: int = 3) -> dict:
    """Host microseconds per call of each of ``fns`` (name -> fn), as the median over ``reps``
    rounds: (wall, process CPU time). The GPU is kept busy, so no call waits for it. Each round
    times every fn once, in turn, so a drift of the machine's speed (the GPU host's CPUs are
    shared) reaches every fn alike. CPU time counts every thread (backward runs on autograd's)
    and leaves out the time the process was not running."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU spin: the loop below never waits for the GPU
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            wall[name].append((time.perf_counter() - t0) / calls * 1e6)
            cpu[name].append((time.process_time() - c0) / calls * 1e6)
            torch.cuda.synchronize()
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def family_chain(family: str, sites: int, dev="cuda", dt=torch.bfloat16):
    """(fn, inputs) with ``sites`` dropout sites of ``family`` chained."""
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, device=dev, dtype=dt, generator=g).mul_(0.5).requires_grad_(grad)

    if family == "linear":  # a BERT-base fine-tuning batch: 16 x 128 tokens, 768 -> 768
        x = rnd(16 * 128, 768)
        ws = [rnd(768, 768) for _ in range(sites)]

        def fn(x, *ws):
            for w in ws:
                x = F.linear(F.dropout(x, 0.1, True), w)
            return x
        return fn, (x, *ws)
    if family == "residual":  # BERT's SelfOutput: x + dropout(dense(x)), 16 x 128 tokens, 768 -> 768, with bias
        x = rnd(16 * 128, 768)
        wbs = [t for _ in range(sites) for t in (rnd(768, 768), rnd(768))]

        def fn(x, *wbs):
            for i in range(0, len(wbs), 2):
                x = x + F.dropout(F.linear(x, wbs[i], wbs[i + 1]), 0.1, True)
            return x
        return fn, (x, *wbs)
    if family == "matmul":  # attention-shaped P @ V: batch 16, 12 heads, 128 x 128 @ 128 x 64
        v = rnd(16, 12, 128, 64)
        ps = [torch.softmax(rnd(16, 12, 128, 128, grad=False), -1).requires_grad_() for _ in range(sites)]

        def fn(v, *ps):
            for p in ps:
                v = torch.matmul(F.dropout(p, 0.1, True), v)
            return v
        return fn, (v, *ps)
    if family == "attention":  # SDPA with dropout, batch 16, 12 heads, 128 tokens, head dim 64
        q = rnd(16, 12, 128, 64)
        kvs = [rnd(16, 12, 128, 64) for _ in range(2 * sites)]

        def fn(q, *kvs):
            for i in range(0, len(kvs), 2):
                q = F.scaled_dot_product_attention(q, kvs[i], kvs[i + 1], dropout_p=0.1)
            return q
        return fn, (q, *kvs)
    raise ValueError(family)


# A call that launches GPU work from Inductor's generated wrapper: a Triton kernel's ``.run(``,
# an extern kernel (cuBLAS matmuls) or an ATen op (SDPA, the RNG seeds).
_LAUNCH = re.compile(r"\.run\(|\bextern_kernels\.\w+\(|\baten\.\w+\.\w+\(")


def launches(sources: list[str]) -> int:
    """Launching calls in Inductor's generated code (comment lines skipped)."""
    return sum(len(_LAUNCH.findall(line)) for src in sources for line in src.splitlines()
               if not line.lstrip().startswith("#"))


def compile_and_get_code(step) -> list[str]:
    """Run ``step`` (its first call compiles) and return the code Inductor wrote for it, as
    torch._inductor.utils.run_and_get_code does but without its dynamo reset, which would drop
    the variants compiled before."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    sources: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", sources.append):
        step()
    return sources


def compile_kwargs(family: str, backend: str) -> dict:
    """torch.compile's keywords for a family's chain: sparsedrop's mask block (64 for the
    attention-shaped batched matmul, 128 otherwise)."""
    return {"options": {"block_size": 64 if family == "matmul" else 128}} if backend == "sparsedrop" else {}


def site_costs(calls: int, reps: int, families=("linear", "residual", "matmul", "attention")):
    for family in families:
        steps, compile_s, n_launches = {}, {}, {}
        for backend in ("inductor", "sparsedrop"):
            for n in (1, SITES):
                fn, inputs = family_chain(family, n)
                # A code object of its own per variant, so the four compiled versions live side
                # by side in dynamo's cache and the rounds below can alternate between them.
                fn.__code__ = fn.__code__.replace(co_name=f"{family}_{backend}_{n}")
                compiled = torch.compile(fn, backend=backend, **compile_kwargs(family, backend))

                def step(compiled=compiled, inputs=inputs):
                    compiled(*inputs).sum().backward()

                t0 = time.perf_counter()
                sources = compile_and_get_code(step)  # forward and backward
                torch.cuda.synchronize()
                compile_s[backend] = time.perf_counter() - t0
                n_launches[(backend, n)] = launches(sources)
                steps[(backend, n)] = step
        times = host_us(steps, calls, reps)
        for backend in ("inductor", "sparsedrop"):
            (wall_1, cpu_1), (wall_n, cpu_n) = times[(backend, 1)], times[(backend, SITES)]
            yield dict(case=f"{family} site fwd+bwd", backend=backend,
                       host_us_per_site=round((wall_n - wall_1) / (SITES - 1), 1),
                       cpu_us_per_site=round((cpu_n - cpu_1) / (SITES - 1), 1),
                       launches_per_site=round((n_launches[(backend, SITES)] - n_launches[(backend, 1)]) / (SITES - 1), 2),
                       host_us_1_site=round(wall_1, 1), host_us_all=round(wall_n, 1), sites=SITES,
                       compile_s_last=round(compile_s[backend], 1))
        torch._dynamo.reset()


def site_code_and_profile(code_path: str | None, profile_path: str | None, families) -> None:
    """Where the host time goes: Inductor's generated code for one site of each family (forward
    and backward, each backend), and a CPU profile of SITES chained sites, by self CPU time."""
    code, prof_text = [], []
    for family in families:
        for backend in ("inductor", "sparsedrop"):
            opts = compile_kwargs(family, backend)
            if code_path:
                torch._dynamo.reset()
                fn, inputs = family_chain(family, 1)
                compiled = torch.compile(fn, backend=backend, **opts)
                sources = compile_and_get_code(lambda: compiled(*inputs).sum().backward())
                code.append(f"# {'=' * 70}\n# {family}, {backend}: {len(sources)} graph(s)\n")
                code.extend(sources)
            if profile_path:
                torch._dynamo.reset()
                fn, inputs = family_chain(family, SITES)
                compiled = torch.compile(fn, backend=backend, **opts)
                for _ in range(3):
                    compiled(*inputs).sum().backward()
                torch.cuda.synchronize()
                torch.cuda._sleep(400_000_000)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    for _ in range(4):
                        compiled(*inputs).sum().backward()
                torch.cuda.synchronize()
                prof_text.append(f"# {family}, {backend}, {SITES} sites, 4 calls\n")
                prof_text.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    for path, parts in ((code_path, code), (profile_path, prof_text)):
        if path:
            with open(path, "w") as f:
                f.write("\n".join(parts))
            print("wrote", path)


EAGER_SHAPES = ((4096, 4096, 4096), (8192, 1024, 4096), (8192, 4096, 14336))


def eager_step(rows: int, n: int, k: int):
    """(step, x, w): one sparse_dropout_linear forward + backward from Python, bf16, p = 0.1."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) / k**0.5).requires_grad_()
    gy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16, generator=g)

    def step():
        y = sd.sparse_dropout_linear(x, w, None, p=0.1, block_size=128)
        y.backward(gy)
    return step, x, w


def eager_functional(reps: int):
    """sparse_dropout_linear fwd + bwd from Python: wall time per call vs its CUDA-graph replay,
    with the launch plans (kernels/launch_plans.py) and without them, in alternating rounds."""
    from sparsedrop_compile.kernels import launch_plans

    for rows, n, k in EAGER_SHAPES:
        step, x, w = eager_step(rows, n, k)
        walls = {True: [], False: []}
        for _ in range(reps):
            for plans in (True, False):
                launch_plans.ENABLED = plans
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    step()
                torch.cuda.synchronize()
                walls[plans].append((time.perf_counter() - t0) / 20 * 1e3)
        launch_plans.ENABLED = True
        x.grad = w.grad = None
        graph, _ = capture_cuda_graph(step, warmup_calls=2)
        replay = do_bench(graph.replay, warmup=10, rep=50)
        for plans in (True, False):
            wall = statistics.median(walls[plans])
            yield dict(case=f"eager sparse_dropout_linear fwd+bwd {rows}x{n}x{k}",
                       backend="sparsedrop" if plans else "sparsedrop, no launch plans",
                       wall_ms=round(wall, 4), cuda_graph_ms=round(replay, 4), wall_over_graph=round(wall / replay, 3))


def plot(rows: list[dict], path: str) -> None:
    """Per-site host time by family, Inductor beside sparsedrop, from the CSV's rows."""
    plt = harness.pyplot()
    if plt is None:
        return
    sites = [r for r in rows if r.get("host_us_per_site") not in (None, "")]
    families = list(dict.fromkeys(r["case"].split()[0] for r in sites))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for j, backend in enumerate(("inductor", "sparsedrop")):
        values = [next(float(r["host_us_per_site"]) for r in sites if r["case"].startswith(f + " ") and r["backend"] == backend)
                  for f in families]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(families))], values, width, label=backend)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(families)), [f"{f} site" for f in families])
    ax.set_ylabel("host us per site, fwd + bwd")
    ax.set_title(f"{rows[0]['gpu']}, torch {rows[0]['torch']}, default mode", fontsize=9)
    ax.legend(loc="lower right")
    harness.save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default=None, help="folder for host_overhead_<gpu>.csv and .png")
    parser.add_argument("--code-out", default=None, help="write Inductor's code for one site of each family here")
    parser.add_argument("--profile-out", default=None, help="write a CPU profile of the chained sites here")
    parser.add_argument("--only-diagnose", action="store_true",
                        help="write --code-out / --profile-out, time nothing (profile_launches.py profiles the eager call)")
    parser.add_argument("--families", nargs="*", default=["linear", "residual", "matmul", "attention"],
                        choices=["linear", "residual", "matmul", "attention"],
                        help="site families to time (none: only the eager rows)")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager functional rows")
    parser.add_argument("--plot-only", metavar="CSV", default=None, help="redraw the plot of a measured CSV (no GPU)")
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(harness.read_csv(args.plot_only), args.plot_only.removesuffix(".csv") + ".png")
        return 0
    if not torch.cuda.is_available():
        sys.exit("host_overhead.py measures launches on a CUDA GPU")
    env = harness.environment("cuda", ("torch", "triton"))
    name = env["gpu"]
    print(f"{name}, torch {env['torch']}, triton {env['triton']}")
    if args.code_out or args.profile_out:
        site_code_and_profile(args.code_out, args.profile_out, args.families)
    if args.only_diagnose:
        return 0
    rows = []
    for row in list(site_costs(args.calls, args.reps, args.families)) + ([] if args.no_eager else list(eager_functional(args.reps))):
        row = {**env, **row}
        rows.append(row)
        print(", ".join(f"{k}={v}" for k, v in row.items() if k not in env), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"host_overhead_{harness.slug(name)}.csv")
        harness.write_csv(path, rows)
        plot(rows, path.removesuffix(".csv") + ".png")
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

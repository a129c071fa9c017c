"""The physical limit of a model's training step under block dropout (issue 12's ``ideal_speedup``).

Block dropout saves two things against Inductor's element dropout: the matmul work of the
dropped blocks next to each rewritten dropout, and the dropout work itself (drawing and applying
an element mask). Everything else in the step stays. So the fastest the rewritten step could be is

    limit = T_base - saved_matmul,   ideal_speedup = T_inductor(p) / limit

T_base is Inductor's step at p = 0 when the same run measured it (dropout work gone), else
Inductor's step at p (dropout work not subtracted: a lower, conservative limit; the CSV's
``ideal_basis`` says which). saved_matmul is estimated per kind of work from two measurements of
the Inductor step:

- its GPU time in matmul kernels and in attention kernels (``kernel_ms``: a profile of a few
  steps; on CPU the matmul and attention ops' own time, for the smoke test), and
- the share of that work that block dropout skips (``skipped_shares``): FLOPs per module of
  one forward + backward (``torch.utils.flop_counter``), each rewritten site's matmul modules
  weighted by the fraction it skips: p for a linear with dropout on one side, 1 - (1 - p)^2 on
  both sides (T5's wo), and 3/7 * p for attention (tile dropout skips P @ V forward and dV, dP
  backward: 3 of the 7 S x S x D products with the backward's recomputed Q K^T; dQ and dK still
  visit dropped tiles).

Assumptions, stated in the README: a site's matmul time is its FLOP share of the matmul kernels'
time; matmuls outside modules (a functional ``x @ w``) are not attributed and count as not
skipped.
"""
from __future__ import annotations

from collections import defaultdict

import torch

MATMUL_OPS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")
_CPU_MATMUL_OPS = tuple(op.replace(".", "::", 1) for op in MATMUL_OPS)  # as the profiler names them
ATTENTION_SKIP = 3 / 7
# Kernel names (lower case) of matmuls: cuBLAS / cuBLASLt / CUTLASS and Inductor's templates.
_MATMUL_KERNELS = ("gemm", "xmma", "cutlass", "nvjet", "triton_tem_fused_mm", "triton_tem_fused_addmm",
                   "triton_tem_fused_bmm", "splitk")
# ... and of attention: FlashAttention, memory-efficient (fmha) and cuDNN SDPA kernels.
_ATTENTION_KERNELS = ("flash", "fmha", "attention", "sdpa")


def site_fractions(sites, p: float) -> tuple[dict[str, float], dict[str, float]]:
    """From an explain report's rewritten sites: {matmul module: fraction of its work skipped}
    and {attention module: fraction skipped}, at dropout rate p."""
    sides: dict[str, set[str]] = defaultdict(set)
    attention: dict[str, float] = {}
    for site in sites:
        if not site.rewritten:
            continue
        if site.kind == "attention":
            attention[site.module_path] = ATTENTION_SKIP * p
            continue
        if site.side in ("input", "both"):
            for consumer in site.consumers:
                _, _, path = consumer.partition(" ")
                if path:
                    sides[path].add("input")
        if site.side in ("output", "both") and site.producer:
            _, _, path = site.producer.partition(" ")
            if path:
                sides[path].add("output")
    return {path: 1 - (1 - p) ** len(s) for path, s in sides.items()}, attention


def module_flops(model: torch.nn.Module, run_step) -> tuple[dict[str, int], dict[str, int]]:
    """FLOPs of one forward + backward per module name (``named_modules()`` names, "" for the
    model itself): ({module: matmul FLOPs}, {module: attention FLOPs}). ``run_step()`` runs the
    forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run_step()
    root = type(model).__name__
    matmul: dict[str, int] = {}
    attention: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        if name == root:
            path = ""
        elif name.startswith(root + "."):
            path = name[len(root) + 1:]
        else:
            continue  # "Global": the same as the root
        matmul[path] = sum(n for op, n in ops.items() if str(op).startswith(MATMUL_OPS))
        attention[path] = sum(n for op, n in ops.items() if "attention" in str(op))
    return matmul, attention


def skipped_shares(sites, p: float, matmul_flops: dict[str, int], attention_flops: dict[str, int]) -> tuple[float, float]:
    """(share of the step's matmul FLOPs, share of its attention FLOPs) that block dropout at p skips."""
    mm_frac, attn_frac = site_fractions(sites, p)
    mm_total, attn_total = matmul_flops.get("", 0), attention_flops.get("", 0)
    mm = sum(matmul_flops.get(path, 0) * f for path, f in mm_frac.items())
    attn = sum(attention_flops.get(path, 0) * f for path, f in attn_frac.items())
    return (mm / mm_total if mm_total else 0.0), (attn / attn_total if attn_total else 0.0)


def kernel_ms(step, device: str, steps: int = 3) -> tuple[float, float, float]:
    """(matmul, attention, all) time per step of ``step()``: GPU kernel time on CUDA (a profile of
    ``steps`` steps), the ops' own CPU time on CPU. ``all`` sums every kernel (every op on CPU):
    a step whose wall time is well above it waits on the host, not on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    matmul = attention = total = 0.0
    for event in prof.key_averages():
        name = event.key.lower()
        if cuda:
            if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        else:
            us = event.self_cpu_time_total
        total += us
        if any(k in name for k in _ATTENTION_KERNELS):
            attention += us
        elif (any(k in name for k in _MATMUL_KERNELS) if cuda else name in _CPU_MATMUL_OPS):
            matmul += us
    return matmul / steps / 1000, attention / steps / 1000, total / steps / 1000


def ideal_speedup(t_p: float, t_base: float, matmul_ms: float, attention_ms: float,
                  matmul_share: float, attention_share: float) -> float:
    """T_inductor(p) / (T_base - matmul_ms * matmul_share - attention_ms * attention_share)."""
    limit = t_base - matmul_ms * matmul_share - attention_ms * attention_share
    if limit <= 0:
        raise ValueError(f"ideal_speedup: the limit {limit:.3f} ms is not positive (T_base {t_base}, "
                         f"matmul {matmul_ms} x {matmul_share}, attention {attention_ms} x {attention_share})")
    return t_p / limit

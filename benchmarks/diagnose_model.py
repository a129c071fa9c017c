"""Which rewrite costs or saves time in a model's training step: one model, several option sets,
side by side in one process (bf16 autocast, fwd + bwd + AdamW, median of CUDA-event timings).

    python benchmarks/diagnose_model.py --model t5 --p 0.1
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout
from sparsedrop_compile.models import build_model, example_batch  # noqa: E402

VARIANTS = {
    "inductor": ("inductor", None),
    "sparsedrop": ("sparsedrop", {}),
    "no_attention": ("sparsedrop", {"attention": False}),
    "attention_only": ("sparsedrop", {"exclude": ["kind:linear", "kind:matmul", "kind:addmm"]}),
}


def step_ms(model, batch, backend, options, steps=12, warmup=3):
    compiled = torch.compile(model, backend=backend, **({"options": options} if options is not None else {}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="t5")
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; {args.model} base, batch {args.batch}x{args.seq}, p={args.p}")
    for name in args.variants:
        backend, options = VARIANTS[name]
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build_model(args.model, size="base", dropout=args.p).cuda().train()
        batch = example_batch(model, batch=args.batch, seq=args.seq, device="cuda")
        print(f"  {name:16s} {step_ms(model, batch, backend, options):8.1f} ms/step", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

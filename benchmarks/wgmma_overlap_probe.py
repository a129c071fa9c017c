"""Does ptxas keep a wgmma in flight while the softmax of the previous one runs? (No GPU needed.)

The smallest form of the Gluon attention forward's loop (session 15): issue S = A Bᵀ and then
O += A B (or P B with P from registers, V=1) as two async wgmma groups, wait for the first
(``warpgroup_mma_wait(1)``), run a softmax step on S, then wait for the second. Compiled for sm_90
with the installed Triton, it prints what the SASS runs between the two waits. With Triton 3.6
(ptxas 12.8, any -O level) only the row max runs there and every exp2 comes after the second
wait, in every variant: V=0 (as the kernel), V=1 (P from registers), V=3 (a one-instruction first
product, K = 16), V=5 (no row max: exp2(S - 1); nothing runs between the waits), V=6 (the row max
through shared memory instead of shuffles: all of it runs between, the exponentials still after),
V=7 (FlashAttention-3's order, O rescaled before its product is issued: nothing between; ptxas
reports C7517, "warpgroup.wait is injected ... to allow use of registers defined by GMMA").
benchmarks/NOTES_attention.md, session 15, has the context.

    V=0 python benchmarks/wgmma_overlap_probe.py
"""
import os
import re
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def probe(out_ptr, n, V: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)
    sl16: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 16], gl.bfloat16)
    a = gl.allocate_shared_memory(gl.bfloat16, [64, 64], sl)
    b = gl.allocate_shared_memory(gl.bfloat16, [64, 64], sl)
    a16 = gl.allocate_shared_memory(gl.bfloat16, [64, 16], sl16)
    b16 = gl.allocate_shared_memory(gl.bfloat16, [64, 16], sl16)
    a.store(gl.zeros([64, 64], gl.bfloat16, s_layout))
    b.store(gl.zeros([64, 64], gl.bfloat16, s_layout))
    fence_async_shared()
    acc = gl.zeros([64, 64], gl.float32, s_layout)
    zero = gl.zeros([64, 64], gl.float32, s_layout)
    p = gl.zeros([64, 64], gl.float32, s_layout)
    for _ in range(n):
        if V == 3:
            s_tok = warpgroup_mma(a16, b16.permute((1, 0)), zero, use_acc=False, is_async=True)
        else:
            s_tok = warpgroup_mma(a, b.permute((1, 0)), zero, use_acc=False, is_async=True)
        if V == 7:  # FlashAttention-3's order: O is rescaled before its product is issued, not after the wait
            acc = acc * 0.5
        if V == 1:
            acc_tok = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), b, acc, is_async=True)
        else:
            acc_tok = warpgroup_mma(a, b, acc, is_async=True)
        s, acc = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, acc_tok))
        if V == 5:  # no cross-lane reduction
            p = gl.exp2(s - 1.0)
        elif V == 6:  # the row max through shared memory, each thread one row, no shuffles
            rows: gl.constexpr = gl.BlockedLayout([1, 64], [32, 1], [4, 1], [1, 0])
            m = gl.convert_layout(gl.max(gl.convert_layout(s, rows), axis=1), gl.SliceLayout(1, s_layout))
            p = gl.exp2(s - gl.expand_dims(m, 1))
        else:  # meant to run beside the second product
            p = gl.exp2(s - gl.expand_dims(gl.max(s, axis=1), 1))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        if V != 7:
            acc = acc * 0.5
    gl.store(out_ptr + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout)), gl.sum(acc + p, axis=1))


def main() -> None:
    variant = int(os.environ.get("V", "0"))
    src = GluonASTSource(probe, {"out_ptr": "*fp32", "n": "i32", "V": "constexpr"}, {"V": variant})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    cubin = f"/tmp/wgmma_overlap_probe_{variant}.cubin"
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True).stdout
    # What runs between the wait for the first product and the wait for both, by opcode.
    body = [re.sub(r"/\*[0-9a-f]+\*/", "", line).strip() for line in sass.splitlines()]
    body = [t for t in body if t and not t.startswith((".", "//"))]
    first = next(i for i, t in enumerate(body) if "DEPBAR.LE gsb0, 0x1" in t)
    both = next(i for i, t in enumerate(body) if i > first and "DEPBAR.LE gsb0, 0x0" in t)
    counts = {}
    for t in body[first + 1:both]:
        op = t.split()[0] if not t.startswith("@") else t.split()[1]
        counts[op] = counts.get(op, 0) + 1
    print(f"V={variant}: between the two waits: " + (", ".join(f"{n} {op}" for op, n in sorted(counts.items())) or "nothing"))
    print("first instructions after the second wait:", "; ".join(body[both + 1:both + 4]))


if __name__ == "__main__":
    main()

"""Where the Hopper kernel's stream-K schedule spends its time (session 14; a Hopper GPU, run from
the repository root). The weight gradients that take stream-K (T5's 8192x768x3072 and
6000x2000x3000), p = 0 and 0.5:

    python benchmarks/profile_stream_k.py           # CUDA-graph medians: whole tiles, stream-K, and
                                                    # stream-K with the partial-sum exchange cut out
                                                    # (wrong numbers: timing only)
    ncu --kernel-name regex:_listed_wgmma ... python benchmarks/profile_stream_k.py ncu
                                                    # the same three kernels, two launches each
    python benchmarks/profile_stream_k.py timeline  # globaltimer stamps per program: start, the
                                                    # partial sum's stores, the adding of the
                                                    # others', the end of the shares, the kernel end

The variants are text patches of the kernels package's sources (the stream-K helpers in
``kernels/block_sparse_matmul_hopper_stream_k.py``, the kernel in
``block_sparse_matmul_hopper_kernels.py``), applied to a copy of the package that is imported
under a name of its own; each patch must apply, so a probe never times the unpatched kernel.
"""
import importlib
import os
import shutil
import sys
import tempfile

import torch
import triton

from sparsedrop_compile import ops  # noqa: F401  (registers torch.ops.sparsedrop)
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as hopper
from sparsedrop_compile.kernels import block_sparse_matmul_triton as tri
from sparsedrop_compile.kernels import launch_plans
from sparsedrop_compile.kernels.block_mask import cdiv

STREAM_K = "block_sparse_matmul_hopper_stream_k.py"
KERNEL = "block_sparse_matmul_hopper_kernels.py"
SHAPES = [(8192, 768, 3072), (6000, 2000, 3000)]
STAMPS = 8  # int64 stamps a program: 0 start, 1/2 before/after its partial sum's stores,
            # 3/4 before/after adding the others', 5 end of its share, 6 kernel end

NO_EXCHANGE = {STREAM_K: [  # no partial-sum stores, no waits or loads of the others'
    ('    gl.store(part_ptr + _sk_offsets(TILE_R, TILE_C, acc_layout), acc, eviction_policy="evict_last")',
     "    pass"),
    ("    for q in range(first, pid):", "    for q in range(first, first):"),
]}
TIMELINE = {KERNEL: [
    ("@gluon.jit\ndef _mma_steps(", '''@gluon.jit
def _now():
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _mma_steps('''),
    ("        stored = pid < 0  # a partial sum stored, its flag not yet raised\n",
     "        stored = pid < 0  # a partial sum stored, its flag not yet raised\n"
     "        dbg = (part_ptr + programs * TILE).to(gl.pointer_type(gl.int64)) + pid * 8\n"
     "        gl.store(dbg, _now())\n"),
    ("                _sk_store_partial(acc, part_ptr + pid * TILE, TILE_R, TILE_C, acc_layout)\n",
     "                gl.store(dbg + 1, _now())\n"
     "                _sk_store_partial(acc, part_ptr + pid * TILE, TILE_R, TILE_C, acc_layout)\n"
     "                gl.store(dbg + 2, _now())\n"),
    ("                    acc = _sk_gather(acc, ts, total, part_ptr, flags, TILE_R, TILE_C, acc_layout)\n",
     "                    gl.store(dbg + 3, _now())\n"
     "                    acc = _sk_gather(acc, ts, total, part_ptr, flags, TILE_R, TILE_C, acc_layout)\n"
     "                    gl.store(dbg + 4, _now())\n"),
    ("        # the tiles of lines with nothing kept (ranked last): zeros, plus the bias",
     "        gl.store(dbg + 5, _now())\n"
     "        # the tiles of lines with nothing kept (ranked last): zeros, plus the bias"),
    ("    tma.store_wait(pendings=0)\n    for i in gl.static_range(STAGES):",
     "    tma.store_wait(pendings=0)\n"
     "    if STREAM_K:\n"
     "        gl.store((part_ptr + gl.num_programs(0) * (TILE_R * TILE_C)).to(gl.pointer_type(gl.int64))\n"
     "                 + pid * 8 + 6, _now())\n"
     "    for i in gl.static_range(STAGES):"),
]}


def patched_kernel(name: str, patches: dict):
    """The wgmma kernel of a copy of the kernels package with ``patches`` ({file: [(old, new)]})
    applied, imported as a package of its own (its modules import each other relatively)."""
    root = tempfile.mkdtemp(prefix=f"sparsedrop_{name}_")
    package = f"kernels_{name}"
    shutil.copytree(os.path.dirname(hopper.__file__), os.path.join(root, package),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for file, changes in patches.items():
        path = os.path.join(root, package, file)
        src = open(path).read()
        for old, new in changes:
            assert src.count(old) == 1, f"{name}: patch no longer applies to {file}: {old[:60]!r}"
            src = src.replace(old, new)
        open(path, "w").write(src)
    sys.path.insert(0, root)
    try:
        module = importlib.import_module(f"{package}.block_sparse_matmul_hopper_kernels")
    finally:
        sys.path.remove(root)
    return module._listed_wgmma_kernel


def problems():
    torch.manual_seed(0)
    for (M, N, K) in SHAPES:
        for p in (0.0, 0.5):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128), device="cuda") >= p
            out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t().unsqueeze(0)
            yield f"{M}x{N}x{K} p={p}", lambda: tri.dsd_tn(x[None], g[None], keep, 1.0, (128, 128), False, out=out)


def timing(ncu: bool) -> None:
    real = hopper._listed_wgmma_kernel
    variants = (("tiles", False, real), ("stream_k", True, real),
                ("no_exchange", True, patched_kernel("no_exchange", NO_EXCHANGE)))
    for label, fn in problems():
        res = {}
        for name, stream_k, kernel in variants:
            hopper._STREAM_K, hopper._listed_wgmma_kernel = stream_k, kernel
            fn()
            torch.cuda.synchronize()
            if ncu:
                fn()
                torch.cuda.synchronize()
            else:
                res[name] = triton.testing.do_bench_cudagraph(fn, rep=50)
        hopper._STREAM_K, hopper._listed_wgmma_kernel = None, real
        if not ncu:
            print(f"{label} dW: " + "  ".join(f"{k} {v * 1000:.1f} us" for k, v in res.items()), flush=True)


def timeline() -> None:
    hopper._listed_wgmma_kernel = patched_kernel("timeline", TIMELINE)
    hopper._STREAM_K = True
    launch_plans.ENABLED = False  # every call allocates (below), so the stamps land in this call's buffer
    slots = []
    empty = launch_plans.empty

    def with_stamps(size, dtype, device):  # the partial-sum slots, then the stamps
        if dtype != torch.float32:
            return empty(size, dtype, device)
        t = torch.zeros(size + 2 * STAMPS * 1024, dtype=dtype, device=device)
        slots.append((t, size))
        return t

    hopper.launch_plans.empty = with_stamps
    for label, fn in problems():
        for _ in range(3):
            slots.clear()
            fn()
            torch.cuda.synchronize()
        t, size = slots[-1]
        programs = (t.numel() - size) // (2 * STAMPS)
        ts = t[size:].view(torch.int64).view(programs, STAMPS)[: torch.cuda.get_device_properties(0).multi_processor_count]
        ts = ts.cpu()
        t0 = ts[:, 0].min()

        def rel(c):
            return (ts[:, c] - t0).float() / 1000.0

        def has(c):
            return ts[:, c] != 0

        start, end, kernel_end = rel(0), rel(5), rel(6)
        pub0, pub1, add0, add1 = rel(1)[has(1)], rel(2)[has(2)], rel(3)[has(3)], rel(4)[has(4)]
        print(f"== {label}: start max {start.max():.1f} us, shares end min/median/max "
              f"{end.min():.1f}/{end.median():.1f}/{end.max():.1f}, kernel end max {kernel_end.max():.1f}")
        print(f"   partial-sum stores: n={len(pub0)}, start at median {pub0.median():.1f} (max {pub0.max():.1f}), "
              f"take median {(pub1 - pub0).median():.2f} max {(pub1 - pub0).max():.2f} us")
        print(f"   adding the others': n={len(add0)}, start at median {add0.median():.1f} (max {add0.max():.1f}), "
              f"take median {(add1 - add0).median():.2f} max {(add1 - add0).max():.2f} us")
        for q in torch.argsort(end, descending=True)[:5].tolist():
            print(f"   slowest program {q}: " + " ".join(f"{rel(c)[q]:.1f}" if has(c)[q] else "-" for c in range(7)))
    hopper.launch_plans.empty = empty


if __name__ == "__main__":
    print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    mode = sys.argv[1] if len(sys.argv) > 1 else "time"
    if mode == "timeline":
        timeline()
    else:
        timing(ncu=mode == "ncu")

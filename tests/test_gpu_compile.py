"""Every Triton kernel variant the launchers pick compiles for a Hopper GPU, on a machine without one.

Triton's interpreter (how CI runs the kernels) checks what a kernel computes, not whether it
compiles: a type or layout error that only the GPU compiler sees would first show on the GPU
machine. Triton can compile for a target without a device (its wheel ships ptxas), so this test
drives the real launchers on CPU tensors with the launch replaced by a recorder, then compiles
each recorded (kernel, specialisation) for sm_90 through Triton's own warm-up path, as a launch
would. The matmuls' TMA variants are not reached on CPU tensors (no device to check them
against); every pointer-load variant of both size classes (runtime.launch_bound), the second
masks, and the attention passes (two-pass and single-pass backward, bool and float masks,
dropkey, the tiles of each head-dim class; the forward and dQ pass also with K and V as TMA
descriptors) are.

It runs in a subprocess: the suite's TRITON_INTERPRET=1 turns the kernels into interpreted
functions, which do not compile.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_RECORD = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget

class HopperWithoutDevice:  # what Triton's launch path asks a driver for, up to compiling
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
    def get_current_device(self):
        return 0
    def get_current_stream(self, device=None):
        return 0

triton.runtime.driver.set_active(HopperWithoutDevice())

from sparsedrop_compile.kernels import block_sparse_matmul_configs as configs
from sparsedrop_compile.kernels import block_sparse_matmul_triton as bsm
from sparsedrop_compile.kernels import flash_attention_triton as fat
from sparsedrop_compile.kernels import kept_blocks
from sparsedrop_compile.kernels import runtime
from sparsedrop_compile.kernels.block_mask import cdiv

recorded = {}

class Record:
    def __init__(self, kernel):
        self.kernel = kernel
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args), **kwargs)
            # Triton specialises on dtype, 16-byte alignment and ints equal to 1: keep those.
            key = (self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__,
                   tuple((k, (v.dtype if isinstance(v, torch.Tensor) else
                              (v.base.dtype, tuple(v.block_shape)) if hasattr(v, "block_shape") else  # a TMA descriptor
                              v if not isinstance(v, int) else (v == 1, v % 16 == 0)))
                         for k, v in sorted(named.items())))
            recorded.setdefault(key, (self.kernel, named))
        return launch

for module in (bsm, fat, kept_blocks):  # kept_blocks: the kept-block lists' kernels
    module.launch = Record
    module.interpreting = lambda: False
configs.interpreting = lambda: False
fat.unsupported_reason = lambda tensors, block: None
runtime.sm_resources = lambda device: (132, 227 * 1024, 65536)

def matmuls(dtype):
    block = (64, 64)
    B, M, K, N = 2, 200, 160, 96
    a, g = torch.randn(B, M, K, dtype=dtype), torch.randn(B, M, N, dtype=dtype)
    w = torch.randn(N, K, dtype=dtype)
    keep = torch.rand(B, cdiv(M, 64) + 1, cdiv(K, 64) + 1) > 0.3
    out_keep = torch.rand(B, cdiv(M, 64) + 1, cdiv(N, 64) + 1) > 0.3
    bias_n, bias_k = torch.randn(N, dtype=dtype), torch.randn(K, dtype=dtype)
    wt = w.t().unsqueeze(0)  # (1, K, N), K contiguous: a linear's weight
    bkn = torch.randn(B, K, N, dtype=dtype)  # a batched matmul's right operand
    for b in (wt, bkn):
        bsm.dsd(a, b, keep, 1.25, block, bias_n, _supported=True)
        bsm.dsd(a, b, keep, 1.25, block, out_keep=out_keep, _supported=True)
        bsm.sdd(g, b, keep, 1.25, block, bias_k, _supported=True)
        bsm.sdd(g, b, keep, 1.25, block, reduce_keep=out_keep, _supported=True)
    for batched in (False, True):
        bsm.dsd_tn(a, g, keep, 1.25, block, batched, _supported=True)
        bsm.dsd_tn(a, g, keep, 1.25, block, batched, grad_keep=out_keep, _supported=True)
    for walk in (False, True):  # dsd_tn's split reduction (chosen on a GPU by its SM count)
        split = bsm.KernelConfig(64, 64, 64, 3, 4, split=3, walk=walk)
        bsm.dsd_tn(a, g, keep, 1.25, block, False, config=split, _supported=True)
        bsm.dsd_tn(a, g, keep, 1.25, block, True, grad_keep=out_keep, config=split, _supported=True)

def attention(dtype):
    B, H, S, D = 2, 2, 200, 64
    q, k, v = (torch.randn(B, H, S, D, dtype=dtype) for _ in range(3))
    keep = torch.rand(B, H, cdiv(S, 64) + 1, cdiv(S, 64) + 1) > 0.3
    masks = (None, torch.rand(B, 1, 1, S) > 0.2, torch.randn(B, 1, S, S, dtype=dtype))
    for mask in masks:
        for mode in ("dropout", "dropkey"):
            out, lse = fat.attention_forward(q, k, v, mask, keep, 0.1, mask is None, None, False, (64, 64), mode)
            out = torch.randn(B, H, S, D, dtype=dtype)
            lse = torch.randn(B, H, S)
            for strategy in ("two_pass", "atomic"):
                fat.attention_backward(torch.randn_like(out), q, k, v, out, lse, mask, keep, 0.1, mask is None, None,
                                       False, (64, 64), mode, mask is not None and mask.dtype != torch.bool,
                                       config={"bwd": strategy})

def attention_default_mask_tile(dtype):
    # The 128 and 256 classes' own tiles (head dims 72-128 and 136-256) at the default mask tile,
    # without a mask and with a key-padding one, the default (two-pass) backward; and head dim
    # 64's there, whose plain (no mask) and bool-masked problems take PROBLEM_FIRST's 128-key tiles.
    # Up to 128 also with a materialised bool mask (PROBLEM_FIRST's "bool_mask_rows" tiles).
    B, H, S = 1, 2, 200
    for D in (64, 128, 256):
        q, k, v = (torch.randn(B, H, S, D, dtype=dtype) for _ in range(3))
        keep = torch.rand(B, H, cdiv(S, 64) + 1, cdiv(S, 128) + 1) > 0.3
        masks = (None, torch.rand(B, 1, 1, S) > 0.2) + ((torch.rand(B, 1, S, S) > 0.2,) if D <= 128 else ())
        for mask in masks:
            fat.attention_forward(q, k, v, mask, keep, 0.1, mask is None, None, False, fat.DEFAULT_BLOCK, "dropout")
            out, lse = torch.randn(B, H, S, D, dtype=dtype), torch.randn(B, H, S)
            fat.attention_backward(torch.randn_like(out), q, k, v, out, lse, mask, keep, 0.1, mask is None, None,
                                   False, fat.DEFAULT_BLOCK, "dropout", False)

for size_class in ("launch-bound", "large"):
    runtime.LAUNCH_BOUND_WORK = 2**62 if size_class == "launch-bound" else 0
    for dtype in (torch.bfloat16, torch.float32):
        matmuls(dtype)
attention(torch.bfloat16)
attention_default_mask_tile(torch.bfloat16)
"""

_COMPILE = r"""
failed = []
for (name, _), (kernel, named) in recorded.items():
    args = {k: (torch.empty(16, dtype=v.dtype) if isinstance(v, torch.Tensor) else v) for k, v in named.items()}
    try:
        kernel.warmup(grid=(1,), **args)
    except Exception as err:
        failed.append(f"{name}: {type(err).__name__}: {str(err)[:400]}")
print("compiled", len(recorded) - len(failed), "of", len(recorded))
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


# The attention passes again with K and V streamed through TMA descriptors, as on a Hopper GPU
# (not in the recording the analysis below reads, whose stand-in tensors a descriptor cannot
# cover; compiled code takes them only with Triton's launcher, traced_descriptors.usable, and
# test_gpu_compiled_tma_loads_equal_eager_tma_loads checks it on the GPU).
_TMA_ATTENTION = r"""
fat._tma_loads = lambda pb, tensors: True
attention(torch.bfloat16)
attention_default_mask_tile(torch.bfloat16)
assert any(hasattr(v, "block_shape") for _, named in recorded.values() for v in named.values()), "no TMA variant"
"""


def _has_ptxas() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists() or bool(shutil.which("ptxas"))


@pytest.mark.skipif(not _has_ptxas(), reason="needs the ptxas that Triton's wheel ships")
def test_every_launched_kernel_variant_compiles_for_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    out = _run(_RECORD + _TMA_ATTENTION + _COMPILE, env)
    compiled = int(out.split("compiled", 1)[1].split()[0])
    assert compiled >= 20, out  # both size classes, two dtypes, the second masks, attention


# The Gluon (Hopper-only) kernels, driven through their real host code on CPU tensors with the
# device checks answered for an H200: every flavour the matmul plans launch (listed, stream-K on
# and off, flat sdd with and without PINGPONG, paired sdd, bias, transposed operands, the aligned
# copy of an unaligned weight) and the attention forward's configs.
# Gluon cannot run under the interpreter, so this is CI's only check that they still build with
# CI's Triton (the GPU machine runs another release).
_GLUON = r"""
from sparsedrop_compile.kernels import block_sparse_matmul_hopper as mmh
from sparsedrop_compile.kernels import flash_attention_hopper as fah
from sparsedrop_compile.kernels import launch_plans

assert mmh._listed_wgmma_kernel is not None and fah._attn_fwd_wgmma_kernel is not None, "Gluon kernels did not import"
recorded.clear()
runtime.launch = Record
class Skip:  # the kept-block list kernels are compiled by the test above; here their launches are skipped
    def __init__(self, kernel):
        pass
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None
kept_blocks.launch = Skip
runtime.hopper_enabled = lambda device: True
runtime.LAUNCH_BOUND_WORK = 0
launch_plans.recording = lambda: None

def hopper_matmuls():
    for B, M, K, N, block in ((1, 1024, 1152, 768, (128, 128)), (1, 2048, 768, 64, (128, 128)), (1, 704, 576, 448, (64, 64))):
        a, g = torch.randn(B, M, K, dtype=torch.bfloat16), torch.randn(B, M, N, dtype=torch.bfloat16)
        wt = torch.randn(N, K, dtype=torch.bfloat16).t().unsqueeze(0)
        keep = torch.rand(B, cdiv(M, block[0]) + 1, cdiv(K, block[1]) + 1) > 0.3
        bias = torch.randn(N, dtype=torch.bfloat16)
        for stream_k in (False, True):
            mmh._STREAM_K = stream_k
            for b_op in (wt, wt.contiguous()):
                bsm.dsd(a, b_op, keep, 1.25, block, bias, _supported=True)
            bsm.dsd_tn(a, g, keep, 1.25, block, False, _supported=True)
        for pairs, pingpong in ((None, True), (None, False), (mmh._CONFIGS["tall"], False)):  # the sdd's tiles
            mmh._SDD_PAIRS, mmh._SDD_PINGPONG = pairs, pingpong
            for b_op in (wt, wt.contiguous()):
                bsm.sdd(g, b_op, keep, 1.25, block, _supported=True)
    mmh._STREAM_K, mmh._SDD_PAIRS, mmh._SDD_PINGPONG = None, None, True
    mmh._COPY_Y_MIN_ROWS = 0  # a weight of 2000-byte rows, read from an aligned copy (_copy_rows_kernel)
    a, g = torch.randn(1, 512, 1000, dtype=torch.bfloat16), torch.randn(1, 512, 640, dtype=torch.bfloat16)
    wt = torch.randn(640, 1000, dtype=torch.bfloat16).t().unsqueeze(0)
    keep = torch.rand(1, 5, 9) > 0.3
    bsm.dsd(a, wt, keep, 1.25, (128, 128), _supported=True)
    bsm.sdd(g, wt, keep, 1.25, (128, 128), _supported=True)
    mmh._COPY_Y_MIN_ROWS = 4096

def hopper_attention():
    B, H, S, D = 1, 2, 300, 128
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.bfloat16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(B, H, S)
    for block in ((64, 128), (32, 64)):
        keep = torch.rand(B, H, cdiv(S, block[0]) + 1, cdiv(S, block[1]) + 1) > 0.3
        for cfg in fah.CANDIDATES[128] + [fah.FwdConfig(128, 64, 3, 8)]:
            if fah.fits(cfg, block):
                for causal in (False, True):
                    fah.launch_forward(q, k, v, keep, out, lse, 1, 0.088, 1.1, block, causal, cfg)

hopper_matmuls()
hopper_attention()
names = sorted({name for name, _ in recorded})
assert names == ["_attn_fwd_wgmma_kernel", "_copy_rows_kernel", "_listed_wgmma_kernel"], names

# The aligned copy's loads are 16 bytes wide on rows of 1000 bf16 elements: with a column bound
# that Triton could not see as a multiple of 8 they were one element each, and the copy 2-3x
# slower (NOTES_kernels §18).
import re
kernel, named = next(v for (name, _), v in recorded.items() if name == "_copy_rows_kernel")
args = {k: (torch.empty(16, dtype=v.dtype) if isinstance(v, torch.Tensor) else v) for k, v in named.items()}
loads = re.findall(r"ld\.global[\w.]*", kernel.warmup(grid=(1,), **args).asm["ptx"])
assert loads and all(".v4." in op for op in loads), loads
"""


@pytest.mark.skipif(not _has_ptxas(), reason="needs the ptxas that Triton's wheel ships")
def test_gluon_hopper_kernels_compile_for_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = _run(_RECORD.split("for size_class in")[0] + _GLUON + _COMPILE, env)
    compiled = int(out.split("compiled", 1)[1].split()[0])
    assert compiled >= 12, out  # the matmul flavours and the attention configs, each specialisation once


def _run(script: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout[-4000:], out.stderr[-4000:])
    return out.stdout


# torch's analysis of which tensors a kernel writes (kernels/trace_analysis.py caches it per
# specialisation): for every recorded variant, each launch wrapped as torch wraps it (a fresh
# Autotuner per launch), the cached answer is torch's own, a repeat is a hit, and the written
# tensors are the kernel's outputs.
_ANALYSE = r"""
from torch._higher_order_ops import triton_kernel_wrap as tkw
from sparsedrop_compile.kernels import trace_analysis
names = trace_analysis.install()
assert names, "no analysis of torch's to cache"
wrong, writes = [], set()
from triton import Config, autotune

def as_torch_wraps_it(kernel, args):
    # wrap_triton moves num_warps / num_stages into a new one-config Autotuner at every launch
    special = {k: args.pop(k) for k in ("num_warps", "num_stages") if k in args}
    return autotune(configs=[Config(kwargs={}, **special)], key=[])(kernel), args

for (name, _), (kernel, named) in recorded.items():
    args = {k: (torch.empty(16, dtype=v.dtype) if isinstance(v, torch.Tensor) else v) for k, v in named.items()}
    for fn_name in names:
        cached = getattr(tkw, fn_name)
        expected = cached.__wrapped__(*as_torch_wraps_it(kernel, dict(args)), {})
        first, again = (cached(*as_torch_wraps_it(kernel, dict(args)), {}) for _ in range(2))
        if not (first == expected and again == expected):
            wrong.append(f"{name} {fn_name}: {first} / {again} != {expected}")
        result = expected if isinstance(expected, list) else [d.name for d in expected.read_writes.writes]
        writes.update((name, w) for w in result)
variants = len(recorded) * len(names)
print("analysed", variants, "hits", trace_analysis.stats["hits"], "misses", trace_analysis.stats["misses"])
print("writes", sorted(writes))
print("\n".join(wrong))
sys.exit(1 if wrong or trace_analysis.stats != {"hits": variants, "misses": variants, "skipped": 0} else 0)
"""


def test_kernel_write_analysis_is_cached_per_specialisation_with_torchs_answer(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = _run(_RECORD + _ANALYSE, env)
    writes = eval(out.split("writes", 1)[1].splitlines()[0])  # (kernel, argument) pairs, printed sorted
    # The dense-output matmuls write their output and nothing else (dsd_tn's split reduction its
    # partial sums instead, which _sum_splits_kernel adds into the output); sdd its output (torch's
    # analysis, being conservative, also counts the kept-block lists its persistent schedule reads).
    assert {w for k, w in writes if k in ("_dsd_kernel", "_sum_splits_kernel")} == {"out_ptr"}, out
    assert {w for k, w in writes if k == "_dsd_tn_kernel"} == {"out_ptr", "part_ptr"}, out
    assert "out_ptr" in {w for k, w in writes if k == "_sdd_kernel"}, out
    # The kept-block lists write their lists and nothing else. With the flags counted as written
    # (a helper taking keep returned the counts that address the stores), compiled code with
    # these lists did not build: Inductor copied the flags and failed in its scheduler.
    lists = {w for k, w in writes if k == "_kept_lists_kernel"}
    assert {"count_ptr", "index_ptr"} <= lists <= {"count_ptr", "index_ptr", "order_ptr", "schedule_ptr"}, out
    # The attention kernels write their outputs and nothing else: an input counted as written
    # (q, k, v, the mask, the flags) would be copied by compiled code before every launch. (A
    # helper whose result addresses a store makes torch count the helper's every argument.)
    outputs = {"_attn_fwd": {"Out", "Lse"}, "_attn_bwd_delta": {"Delta"}, "_attn_bwd_dq": {"dQ", "dMask", "Delta"},
               "_attn_bwd_dkdv": {"dK", "dV", "dQacc", "dMask"}}
    for kernel, written in outputs.items():
        assert {w for k, w in writes if k == kernel} == written, (kernel, out)

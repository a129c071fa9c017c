"""What both Triton kernel families share on the host: one place for each of these questions.

- Is Triton's CPU interpreter on (``TRITON_INTERPRET=1``, how CI runs the kernels)?
- How is a kernel launched? Through ``torch.library.wrap_triton``, so that when an op's body is
  traced by torch.compile, Inductor sees the kernel and launches it from its own generated code
  (a few microseconds) instead of calling back into Python for every op.
- How is an op defined? ``torch.library.triton_op`` (traced into, see above) where kernels run
  on a GPU; a plain ``custom_op`` under the interpreter, whose kernels cannot be traced.
- Facts about the device, cached per device (capability, SMs, shared memory, registers).
- TMA (Hopper's tensor memory accelerator): whether an operand qualifies, and the strides a
  descriptor takes. The matmuls build descriptors inside the kernels (``tl.make_tensor_descriptor``);
  attention's K and V reads take host-built ones, which traced launches record with the metadata
  Inductor rebuilds them from (``traced_descriptors``).
- Tuning: one tuner, with Inductor's policy. By default it takes the first candidate that runs
  (the candidate lists are ordered best guess first), so building a graph compiles one config
  per kernel and problem; with autotuning on (``mode="max-autotune"``, the backend's
  ``autotune`` option, or ``SPARSEDROP_AUTOTUNE=1``) it times the candidates once per problem
  key. While an op is traced (fake tensors: torch.compile is building the graph) it runs them on
  stand-in tensors of the same shapes and strides, so the chosen config is baked into the
  compiled code.

Everything here is safe on fake and symbolic tensors: no data pointers, no guards on sizes
unless a comment says why.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Callable, Sequence

import torch
import triton
from torch import Tensor
from torch._inductor import config as inductor_config
from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import launch_plans, traced_descriptors

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Triton reads TRITON_INTERPRET when kernels are defined; so does this module."""
    return INTERPRET


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (0 for n <= 0); plain int arithmetic, no Triton call."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def hint(n) -> int:
    """An int for a size that may be symbolic (its example value), without adding a guard.

    Use it only for choices that cannot change a result (tile sizes, schedules), never for one
    that must hold for every size the compiled code will see."""
    if isinstance(n, torch.SymInt):
        return n.node.hint if n.node.hint is not None else 4096
    return int(n)


def known(expr) -> bool:
    """True only if ``expr`` (a bool or a symbolic one) is true for every size: no guard."""
    if isinstance(expr, bool):
        return expr
    return statically_known_true(expr)


def has_symbolic_sizes(tensors) -> bool:
    """Whether any of ``tensors`` (other items are skipped) has a symbolic size or stride."""
    return any(isinstance(n, torch.SymInt) for t in tensors if isinstance(t, Tensor)
               for n in (*t.shape, *t.stride()))


def is_traced(t: Tensor | None) -> bool:
    """Whether ``t`` is a fake (or functional-over-fake) tensor of a graph being traced."""
    return t is not None and is_fake(t)


# --------------------------------------------------------------------------- ops and launches
def define_op(name: str, body: Callable, fake: Callable | None = None):
    """Register ``body`` as the op ``name`` (schema from its annotations, no mutated args).

    On a GPU the op is a ``triton_op``: torch.compile traces its body and Inductor launches the
    kernels itself; the body is its own fake implementation, so it must be traceable (metadata
    only, kernels through :func:`launch`). Under the interpreter the kernels cannot be traced, so
    the op is an opaque ``custom_op`` and ``fake`` gives its output metadata.
    """
    if INTERPRET:
        op = torch.library.custom_op(name, body, mutates_args=())
        if fake is not None:
            op.register_fake(fake)
        return op
    from . import trace_analysis

    trace_analysis.install()  # analyse each kernel specialisation once per process, not per launch
    return torch.library.triton_op(name, body, mutates_args=())


def launch(kernel):
    """``launch(kernel)[grid](*args, **constexprs)``: a kernel launch that torch.compile can see.

    Through ``wrap_triton``, which inside a trace records the launch for Inductor. Outside one it
    still costs a few hundred microseconds of Python per launch (it registers the kernel and its
    constants in torch's side table and routes the call through a higher-order op), so code that
    knows nothing traces it turns the wrapper off with :func:`direct_launches` and gets Triton's
    own launch. Under the interpreter it is always the plain launch.
    """
    if INTERPRET or not is_wrap_triton_enabled():
        rec = launch_plans.recording()
        return kernel if rec is None else launch_plans.RecordingLaunch(kernel, rec)
    from torch.library import wrap_triton

    return _Wrapped(wrap_triton(kernel))


class _Wrapped:
    """A ``wrap_triton`` kernel whose traced launches may also take host-built TMA descriptors
    (recorded with their metadata: ``traced_descriptors``)."""

    __slots__ = ("kernel",)

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        with_grid = self.kernel[grid]

        def call(*args, **kwargs):
            if tracing() and traced_descriptors.holds_descriptor(args, kwargs):
                return traced_descriptors.traced_launch(with_grid, args, kwargs)
            return with_grid(*args, **kwargs)

        return call


def tracing() -> bool:
    """Whether torch is recording what runs: Dynamo, or any dispatch mode (fake tensors,
    functionalization, make_fx's proxies), where launches must go through ``wrap_triton``."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


@contextlib.contextmanager
def direct_launches():
    """Launch kernels through Triton's own path for the code inside, unless something traces it
    (then this changes nothing), and replay the launchers' recorded launch plans
    (``launch_plans``). For the eager functional forms, forward and backward: both flags are per
    thread, and autograd runs backward on its own thread."""
    if tracing():
        yield
        return
    with set_wrap_triton_enabled(False), launch_plans.active():
        yield


def set_scratch_allocator() -> None:
    """Kernels that build TMA descriptors on the device need scratch memory per launch, which
    Triton asks its allocator for. Triton keeps the allocator per thread (the autograd engine
    runs backward on another thread), so the launchers call this before such launches. Inductor
    sets its own before each launch of compiled code."""
    triton.set_allocator(_torch_alloc)
    launch_plans.note_allocator()


def _torch_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


# --------------------------------------------------------------------------- device facts
_CAPABILITY: dict[int, tuple[int, int]] = {}
_SM_RESOURCES: dict[int, tuple[int, int, int]] = {}


def cuda_index(device: torch.device) -> int:
    """The device's index; the current device for a bare torch.device("cuda")."""
    return device.index if device.index is not None else torch.cuda.current_device()


def capability(device: torch.device) -> tuple[int, int]:
    """torch.cuda.get_device_capability, cached per device index (it cannot change)."""
    index = cuda_index(device)
    cap = _CAPABILITY.get(index)
    if cap is None:
        cap = _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return cap


def sm_resources(device: torch.device) -> tuple[int, int, int]:
    """(SMs, shared memory and registers per SM) of a GPU, cached per device index."""
    index = cuda_index(device)
    res = _SM_RESOURCES.get(index)
    if res is None:
        props = torch.cuda.get_device_properties(index)
        smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
        regs = getattr(props, "regs_per_multiprocessor", 65536)
        res = _SM_RESOURCES[index] = (props.multi_processor_count, smem, regs)
    return res


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL_CTX = _NullCtx()  # stateless, so one instance serves every launch


def device_guard(t: Tensor):
    """Make t's GPU the current device for a launch (Triton launches on the current one).
    Nothing to do, and no context switch, on CPU or when it already is (the usual case)."""
    device = t.device
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NULL_CTX


# --------------------------------------------------------------------------- TMA
def tma_enabled(device: torch.device) -> bool:
    """TMA descriptors on this device: Hopper or newer, not interpreted, not switched off."""
    if INTERPRET or device.type != "cuda" or os.environ.get("SPARSEDROP_TMA", "1") == "0":
        return False
    return capability(device)[0] >= 9


def hopper_enabled(device: torch.device) -> bool:
    """Whether the Gluon Hopper kernels may run on this device: an sm_90 GPU, not interpreted,
    ``SPARSEDROP_HOPPER`` not 0 (each family also needs its kernels to have imported)."""
    if INTERPRET or device.type != "cuda" or os.environ.get("SPARSEDROP_HOPPER", "1") == "0":
        return False
    return capability(device)[0] == 9


def cuda_graphs() -> bool:
    """Whether code torch compiles now will run under CUDA graphs (Inductor's
    ``mode="reduce-overhead"``), whose replays launch nothing."""
    return bool(inductor_config.triton.cudagraphs)


# Below this many multiply-adds (M N K) a matmul kernel is launch-bound: in a default-mode step
# the host spends longer launching it than the GPU spends running it, so its config is chosen
# for a cheap launch rather than for the last per cent of GPU time. 2**34 is ~35 us of bf16 work
# on an H100/H200 (a 4096 x 4096 x 1024 matmul); a BERT-base linear at a fine-tuning batch of
# 16 x 128 tokens is 2**30.2.
LAUNCH_BOUND_WORK = 2**34


def launch_bound(M, N, K) -> bool:
    """Whether an (M x K) @ (K x N) kernel is small enough that its launch, not its GPU time,
    decides what it costs: below LAUNCH_BOUND_WORK, unless the graph runs under CUDA graphs
    (Inductor's ``mode="reduce-overhead"``), whose replays launch nothing. Such kernels take no
    TMA (device-side descriptors need global scratch, which Triton allocates with a torch.empty on
    every launch and which keeps Inductor from its static launcher) and no extra launch for work
    balance. Sizes may be symbolic (their hints decide: a choice of speed, never of result).
    ``SPARSEDROP_TMA=always`` counts every size as large (``=0`` turns TMA off: ``tma_enabled``)."""
    return launch_bound_work(hint(M) * hint(N) * hint(K), cuda_graphs())


def launch_bound_work(work: int, cuda_graphs: bool) -> bool:
    """``launch_bound`` for ``work`` multiply-adds, with CUDA graphs on or off as given (the
    passes decide before Inductor has applied its mode's settings)."""
    return work < LAUNCH_BOUND_WORK and os.environ.get("SPARSEDROP_TMA") != "always" and not cuda_graphs


def launch_settings() -> tuple:
    """The process-wide settings the launchers' choices read besides their arguments (TMA and
    launch-bound rules, the Hopper path, autotuning, fp32 precision): part of every launch plan's key."""
    return (os.environ.get("SPARSEDROP_TMA"), os.environ.get("SPARSEDROP_HOPPER"), LAUNCH_BOUND_WORK, cuda_graphs(),
            autotune_enabled(), torch.get_float32_matmul_precision())


def tma_view_ok(t: Tensor) -> bool:
    """Can a rank-3 TMA descriptor cover this (B, R, C) view? 16-byte aligned base and strides,
    unit last stride, 16-bit dtype (fp32 stays on pointer loads: not the speed path).

    A traced tensor has no address: its storage offset stands in, as Inductor assumes (and
    checks at run time) that the buffers it is handed are aligned."""
    if t.dtype not in (torch.float16, torch.bfloat16) or not known(t.stride(-1) == 1):
        return False
    es = t.element_size()
    if is_traced(t):
        if not known(t.storage_offset() * es % 16 == 0):
            return False
    elif t.data_ptr() % 16:
        return False
    # Broadcast (stride 0) dims are left to the pointer path: TMA wants real, aligned strides.
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if known(size == 1):
            continue
        if not (known(stride > 0) and known(stride * es % 16 == 0)):
            return False
    return True


def tma_strides(t: Tensor) -> tuple:
    """The strides to build a rank-3 descriptor of ``t`` with: a size-1 dim's stride is never
    used by the hardware but must still be 16-byte aligned, so it gets the packed value."""
    s0, s1, s2 = t.stride()
    es = t.element_size()
    if known(t.shape[1] == 1):
        s1 = (t.shape[2] * es + 15) // 16 * 16 // es
    if known(t.shape[0] == 1):
        s0 = t.shape[1] * s1
    return s0, s1, s2


# --------------------------------------------------------------------------- configs and tuning
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of a kernel: its tiles and how it is scheduled.

    The tile fields are named after the problem's dims; each kernel family's host module says
    which tile is which. ``skip``, ``balance`` and ``walk`` are schedule choices that only some
    kernels read (the attention kernels' dropped-tile handling, the matmuls' work balance, and
    the matmuls' walk over every block instead of a kept-block list); ``split`` is dsd_tn's
    reduction split over that many programs per output tile.
    """

    tile_m: int
    tile_n: int
    tile_k: int = 0
    stages: int = 3
    warps: int = 4
    group: int = 8
    tma: bool = False
    balance: bool = False
    skip: int = 0
    walk: bool = False
    split: int = 1

    def __str__(self) -> str:
        return (
            f"m{self.tile_m}n{self.tile_n}k{self.tile_k}_s{self.stages}w{self.warps}g{self.group}"
            + ("_tma" if self.tma else "_ptr")
            + ("_bal" if self.balance else "")
            + (f"_skip{self.skip}" if self.skip else "")
            + ("_walk" if self.walk else "")
            + (f"_split{self.split}" if self.split > 1 else "")
        )


_AUTOTUNE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("sparsedrop_autotune", default=None)


def autotune_enabled() -> bool:
    """Whether configs are chosen by timing the candidates (else: the first one that runs).

    Set for one compile by the backend (:func:`autotuning`), else ``SPARSEDROP_AUTOTUNE=1``.
    Off by default, as Inductor's own matmul autotuning is: timing eight configs of three
    kernels per problem made building a graph several times slower than Inductor's."""
    forced = _AUTOTUNE.get()
    if forced is not None:
        return forced
    return os.environ.get("SPARSEDROP_AUTOTUNE", "0") == "1"


@contextlib.contextmanager
def autotuning(enabled: bool | None):
    """Turn timing of candidate configs on or off for the code inside (None: the default)."""
    token = _AUTOTUNE.set(enabled)
    try:
        yield
    finally:
        _AUTOTUNE.reset(token)


class Tuner:
    """Picks and caches one config per problem key: the first candidate that runs, or with
    :func:`autotune_enabled` the fastest, by timing the candidates once.

    Why not triton.autotune: the candidates depend on the mask block and on whether the operands
    qualify for TMA, the grid and some arguments depend on the config, and tuning must be
    skipped, not crash, while a CUDA graph is being captured. ``prefer`` may pick, among the
    configs within ``tie`` of the fastest, one it prefers (e.g. a work-balanced schedule).
    """

    def __init__(self, tie: float = 0.0, prefer: Callable[[KernelConfig], bool] | None = None) -> None:
        self.best: dict[tuple, KernelConfig] = {}
        self.timings: dict[tuple, list[tuple[KernelConfig, float | str]]] = {}
        self.tie, self.prefer = tie, prefer

    @staticmethod
    def timed(n_candidates: int) -> bool:
        """Whether a pick among ``n_candidates`` times them (else: the first that runs)."""
        return autotune_enabled() and n_candidates > 1 and not INTERPRET

    def cached(self, key: tuple, n_candidates: int = 2) -> KernelConfig | None:
        """The config already picked for ``key`` under the current policy, if any."""
        return self.best.get((key, self.timed(n_candidates)))

    def first_that_fits(self, key: tuple, candidates: Sequence[KernelConfig],
                        fits: Callable[[KernelConfig], bool]) -> KernelConfig:
        """The first candidate ``fits`` accepts, picked without running any (kept as the
        untimed choice for ``key``)."""
        for c in candidates:
            if fits(c):
                self.best[(key, False)] = c
                return c
        raise RuntimeError(f"sparsedrop: no kernel config for {key} fits this device's shared memory: "
                           + ", ".join(str(c) for c in candidates) + ". Use kernel='reference'.")

    def pick(self, key: tuple, candidates: Sequence[KernelConfig], run: Callable[[KernelConfig], None]) -> KernelConfig:
        """The config for ``key``; ``run(cfg)`` launches one on real tensors (stand-ins while
        tracing). The caller launches the chosen config on its own tensors afterwards."""
        timed = self.timed(len(candidates))
        cfg = self.best.get((key, timed))
        if cfg is not None:
            return cfg
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # While a CUDA graph is captured nothing may run outside it: the first candidate,
            # unchecked and not cached (the next uncaptured call picks properly).
            return candidates[0]
        if not timed:
            return self._first_that_runs((key, timed), candidates, run)
        results: list[tuple[KernelConfig, float | str]] = []
        for c in candidates:
            try:
                run(c)  # compile outside the timed region
                ms = triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=20, return_mode="median")
                results.append((c, ms))
            except Exception as err:  # a config that does not compile or fit is skipped
                results.append((c, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
        self.timings[key] = results
        ok = [(ms, i) for i, (_, ms) in enumerate(results) if isinstance(ms, float)]
        if not ok:
            raise RuntimeError(
                f"sparsedrop: no kernel config could run for {key}: "
                + "; ".join(f"{c}: {r}" for c, r in results)
                + ". Set SPARSEDROP_TMA=0 to rule out TMA descriptors, or use kernel='reference'."
            )
        fastest = min(ok)[0]
        preferred = [(ms, i) for ms, i in ok
                     if self.prefer is not None and self.prefer(candidates[i]) and ms <= fastest * (1 + self.tie)]
        best = candidates[min(preferred or ok)[1]]
        self.best[(key, True)] = best
        return best

    def _first_that_runs(self, cache_key, candidates, run) -> KernelConfig:
        errors = []
        for c in candidates:
            try:
                run(c)
            except Exception as err:
                errors.append(f"{c}: {type(err).__name__}: {err}")
                continue
            self.best[cache_key] = c
            return c
        raise RuntimeError(f"sparsedrop: no kernel config could run for {cache_key[0]}: " + "; ".join(errors))


@contextlib.contextmanager
def real_tensors():
    """Run real kernels while a graph is being traced (to time configs): no fake or functional
    mode, no proxy recording, launches go straight to Triton, no autograd."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), set_wrap_triton_enabled(False), torch.no_grad():
        yield


def standin(t: Tensor | None, fill: str = "normal") -> Tensor | None:
    """A real tensor with ``t``'s sizes (their hints), strides, dtype and device, for timing
    kernels while ``t`` itself is fake. Call inside :func:`real_tensors`."""
    if t is None:
        return None
    size = [hint(s) for s in t.shape]
    stride = [hint(s) for s in t.stride()]
    out = torch.empty_strided(size, stride, dtype=t.dtype, device=t.device)
    if out.is_floating_point():
        out.normal_() if fill == "normal" else out.zero_()
    else:
        out.zero_()
    return out

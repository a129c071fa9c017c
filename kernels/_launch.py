"""Launching an already-compiled @triton.jit kernel without ``JITFunction.run``'s per-call work.

``kernel[grid](*args, **constexprs)`` binds every argument, specialises each one, hashes a cache
key, reads Triton's runtime settings and builds launch metadata on every call: tens of
microseconds of host time per launch, where Inductor's own launches cost a few. A training step
makes over a hundred of ours, and at base sizes the step is then bound by the host.

``FastKernel(fn)[grid](*args, **constexprs)`` has the same meaning. The first call of each
*specialisation* goes through Triton as usual (it compiles, or finds the compiled kernel); later
calls of that specialisation call the compiled kernel's launcher directly with the same
arguments, in the same order that ``JITFunction.run`` passes them.

Correctness rests on the specialisation key: two calls may share a compiled kernel only if
Triton would have chosen the same one for both. The key here is at least as fine as Triton's:
the keyword (constexpr and option) values; per tensor its dtype and whether its address is a
multiple of 16; per int whether it is 1, whether it is a multiple of 16 and its width (i32, i64
or u64); per descriptor its dtype, block shape and the 16-divisibility of its shape and strides;
the type of every other argument. Any argument of another kind sends the call down Triton's own
path. The current device is part of the key (a compiled kernel is loaded per device).

Off under Triton's interpreter, when a launch hook is installed (profilers read them), or with
SPARSEDROP_FAST_LAUNCH=0. With no hook installed the direct launch passes None for the hooks and
their metadata, which the launcher treats as "no hook" (Triton 3.6 keeps empty hook chains there).
"""
from __future__ import annotations

import os

import torch

try:  # where descriptors live differs across Triton versions; without them, no descriptor keys
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover
    _TensorDescriptor = None

_I32_MIN, _I32_MAX, _I64_MAX = -(2**31), 2**31 - 1, 2**63 - 1


try:  # the runtime settings (hooks) that JITFunction.run reads; read here once per launch too
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - a Triton without knobs: Triton's own path only
    _knobs = None


def fast_launch_enabled() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or os.environ.get("SPARSEDROP_FAST_LAUNCH", "1") == "0":
        return False
    if _knobs is None:
        return False
    return _no_hook(_knobs.runtime.launch_enter_hook) and _no_hook(_knobs.runtime.launch_exit_hook)


def _no_hook(hook) -> bool:
    """None (Triton >= 3.7) or an empty HookChain (3.6, where the knob is always a chain)."""
    return hook is None or (type(hook).__name__ == "HookChain" and not getattr(hook, "calls", True))


def _arg_key(args: tuple):
    """The specialisation-relevant properties of the positional arguments, or None for a kind
    of argument this module does not know (the caller then takes Triton's path)."""
    key = []
    for a in args:
        t = type(a)
        if t is bool:  # before int: bool is an int subclass, and Triton types it i1
            key.append(("b", a))
        elif t is int:
            width = 0 if _I32_MIN <= a <= _I32_MAX else (1 if a <= _I64_MAX else 2)  # i32, i64, u64
            key.append((a == 1, a % 16 == 0, width))
        elif t is float:
            key.append("f")
        elif a is None:
            key.append(None)
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif _TensorDescriptor is not None and t is _TensorDescriptor:
            key.append(("d", a.base.dtype, tuple(a.block_shape), tuple(s % 16 == 0 for s in a.shape),
                        tuple(s % 16 == 0 for s in a.strides), getattr(a, "padding", None)))
        else:
            return None
    return tuple(key)


# Keyword values (constexprs, num_warps, ...) that key the cache by value.
_PLAIN = (bool, int, float, str, type(None))


def _raw_stream(device: int) -> int:
    """The current CUDA stream's handle, as Triton's own launch path reads it."""
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return get(device) if get is not None else torch.cuda.current_stream(device).cuda_stream


class FastKernel:
    """A @triton.jit function whose repeat launches skip ``JITFunction.run`` (module docstring)."""

    def __init__(self, fn):
        self.fn = fn
        params = getattr(fn, "params", None)  # an interpreted function has none: Triton's path only
        self._replayable = params is not None
        self._names = [p.name for p in params or ()]
        self._defaults = {p.name: p.default for p in params or () if p.has_default}
        self._cache: dict = {}
        self.fast_launches = 0  # for tests: how many launches took the direct path
        self.fallback = ""  # why the last call that could not take it did not

    def _not_replayable(self, grid, kwargs: dict) -> str:
        """Why this call must take Triton's path ("" if it need not)."""
        if not self._replayable:
            return "no parameter list (an interpreted function)"
        if not fast_launch_enabled():
            return "off (interpreter, SPARSEDROP_FAST_LAUNCH=0 or a launch hook)"
        if getattr(self.fn, "pre_run_hooks", None):
            return "the function has pre-run hooks"
        if type(grid) is not tuple:
            return f"grid of type {type(grid).__name__}"
        bad = [k for k, v in kwargs.items() if type(v) not in _PLAIN]
        return f"keyword arguments {bad} are not plain values" if bad else ""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args: tuple, kwargs: dict):
        why = self._not_replayable(grid, kwargs)
        arg_key = None if why else _arg_key(args)
        if arg_key is None:
            self.fallback = why or "an argument of a kind this module does not key: " + ", ".join(
                sorted({type(a).__name__ for a in args}))
            return self.fn[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        key = (device, arg_key, tuple(kwargs.items()))
        entry = self._cache.get(key)
        if entry is None:
            kernel = self.fn[grid](*args, **kwargs)
            # JITFunction.run passes every parameter, constexprs included, in declaration order.
            rest = self._names[len(args):]
            if any(name not in kwargs and name not in self._defaults for name in rest):
                self.fallback = "a parameter neither passed by keyword nor defaulted"
                return kernel  # a call Triton accepted that this module cannot replay: never cached
            tail = tuple(kwargs[n] if n in kwargs else self._defaults[n] for n in rest)
            self._cache[key] = (kernel, tail)
            return kernel
        kernel, tail = entry
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = _raw_stream(device)
        kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *tail)
        self.fast_launches += 1
        return kernel


_WRAPPED: dict[int, FastKernel] = {}


def fast(fn) -> FastKernel:
    """The FastKernel of a @triton.jit function (one per function, so its cache lasts)."""
    kernel = _WRAPPED.get(id(fn))
    if kernel is None:
        kernel = _WRAPPED[id(fn)] = FastKernel(fn)
    return kernel

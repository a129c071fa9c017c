"""Launch plans: an eager call's kernel launches, recorded once per key and replayed.

Outside torch.compile the functional forms (``sparse_dropout_linear`` and the rest) run the op
bodies from Python on every call. Each call re-derives the same decisions from the same shapes
(checks, kernel choice, config, grid, strides, kept-list sizes) and goes through Triton's Python
launcher (argument specialisation and cache lookup). On an H200 host that was 35-60 us a launch,
against 7-18 us for the compiled kernel's own launcher, and the decisions cost more than the
launches (``benchmarks/results/raw/session10/launch_costs_db0afbf.log``).

A plan is what one planned call did, for one key (every shape, stride, dtype, 16-byte alignment
and scalar argument of the call, and the settings its choices read: see ``settings``): which
buffers it allocated, which views it took of its tensors and buffers, and which kernels it
launched with which arguments. A later call with the same key allocates the same buffers, takes
the same views of its own tensors and launches the same compiled kernels, without running the
call's Python: one key lookup per call. A view that a kernel receives at its base's own address
is not taken again: the kernel is handed its base (see ``_Slots``).

Plans nest. The eager op bodies (``ops.py``) are planned, and so are the launchers they call; a
body that cannot be planned (it computes a tensor with a torch op, e.g. a copy of a broadcast
operand) runs in full, and its launchers are planned on their own.

When a plan is made, and why it is safe:
- only inside ``runtime.direct_launches`` (the eager functional forms), never while tracing, and
  only on the second call of a key (the first may tune, compile, or read occupancy off a binary);
- a plan is kept only when every tensor a recorded launch received (and the result) is one of
  the call's own tensor arguments (by identity), a buffer it allocated through :func:`empty`, or a
  view of exactly one of those; and when the call ran no torch op other than views and
  allocations while recorded (a torch op computes values, or writes into a buffer, which a
  replay would not reproduce). Anything else leaves the key unplanned, and the call runs in
  full every time;
- a TMA descriptor built on the host holds the tensor it describes: a replay gives it the
  replay's tensor in the same role (a copy of the recorded descriptor with another ``base``);
  any other argument that holds a tensor leaves the key unplanned;
- a view is replayed relative to its base (sizes, strides, and storage offset from the base's),
  so arguments that sit at other offsets of their storage get the same views of themselves;
- a kernel launched through Triton returns its compiled kernel, whose launcher a replay calls
  directly with the current stream; under Triton's interpreter (CI) there is none, and a replay
  launches through Triton with the same arguments, so the recording and the argument mapping are
  tested on CPU too. Launch hooks (Triton's profiler) send replays through Triton as well.

``SPARSEDROP_LAUNCH_PLANS=0`` turns plans off (every call runs the launcher in full).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
import threading
from typing import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from . import runtime  # which imports this module: its functions are only called, never at import

ENABLED = os.environ.get("SPARSEDROP_LAUNCH_PLANS", "1") != "0"
_MAX_PLANS = 4096  # keys per process; the cache is emptied when full (a new shape costs one recording)


class _State(threading.local):
    """Per thread (autograd runs backward on a thread of its own); class attributes are the
    defaults every thread starts from."""

    active = False  # inside direct_launches
    settings: dict | None = None  # the settings read in that block, per settings function
    recorder: "_Recorder | None" = None  # the recording in progress


_state = _State()
_plans: dict[tuple, "Plan | None"] = {}  # None: recorded, but not plannable
_seen: set[tuple] = set()  # keys called once (the next call records)
stats = {"recorded": 0, "replayed": 0, "refused": 0}  # read by tests and benchmarks

try:  # Triton's launch hooks (its profiler sets them); a replay must not skip them
    from triton import knobs as _knobs

    _HOOKS = _knobs.runtime
except ImportError:  # pragma: no cover - an older Triton: replays always go through Triton
    _HOOKS = None


def _hook_set(hook) -> bool:
    """Whether a Triton launch hook is set: None when unset in older Triton; from 3.5 on an
    always-present ``HookChain``, set when its ``calls`` list is not empty."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or len(calls) > 0


def launch_hooks_set() -> bool:
    """Whether a launch hook (Triton's profiler, proton) is set: replays then launch through
    Triton, which calls them. Unknown Triton (no knobs): treated as set."""
    return _HOOKS is None or _hook_set(_HOOKS.launch_enter_hook) or _hook_set(_HOOKS.launch_exit_hook)


class active:
    """Context manager: plans may be recorded and replayed for the launcher calls inside (set by
    ``runtime.direct_launches``; per thread, as autograd runs backward on its own thread)."""

    def __enter__(self):
        self.prev = _state.active, _state.settings
        _state.active = ENABLED
        _state.settings = {}  # settings() per launcher kind, read once per block: they cannot change inside
        return self

    def __exit__(self, *exc):
        _state.active, _state.settings = self.prev
        return False


def recording():
    """The recording in progress on this thread, or None (read by ``runtime.launch``)."""
    return _state.recorder


def empty(size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty`` for a launcher's scratch and output buffers: a recording notes it, so that a
    replay allocates the same buffer."""
    t = torch.empty(size, dtype=dtype, device=device)
    rec = recording()
    if rec is not None:
        rec.buffers.append(t)
    return t


def note_allocator() -> None:
    """Called where a launcher sets Triton's scratch allocator (TMA descriptors built on the
    device): a replay on another thread must set it too."""
    rec = recording()
    if rec is not None:
        rec.needs_allocator = True


class _Recorder:
    def __init__(self, inputs: list[Tensor]):
        self.inputs = inputs
        self.buffers: list[Tensor] = []
        self.launches: list[tuple] = []
        self.needs_allocator = False
        self.other_ops: list[str] = []  # torch ops other than views and allocations run while recording
        self.launching = False  # inside a kernel launch (Triton's interpreter runs torch ops of its own)


_ALLOCATIONS = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default)


class _OnlyViews(TorchDispatchMode):
    """While a call is recorded: notes every torch op that is neither a view nor an allocation.
    Such an op computes values (or writes into a buffer) that a replay, which only allocates,
    takes views and launches, would not reproduce: the call is then never planned."""

    def __init__(self, rec: _Recorder):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (self.rec.launching or func.is_view or func in _ALLOCATIONS):
            self.rec.other_ops.append(str(func))
        return func(*args, **(kwargs or {}))


class RecordingLaunch:
    """``kernel[grid](*args, **kwargs)``: launched through Triton as usual, and noted."""

    def __init__(self, kernel, rec: _Recorder):
        self.kernel, self.rec = kernel, rec

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.rec.launching = True
            try:
                compiled = self.kernel[grid](*args, **kwargs)
            finally:
                self.rec.launching = False
            self.rec.launches.append((self.kernel, tuple(grid), args, kwargs, compiled))
            return compiled
        return call


def _describe(v):
    if isinstance(v, Tensor):
        return (v.shape, v.stride(), v.dtype, v.device, v.data_ptr() % 16 == 0)
    return v


@functools.lru_cache(maxsize=None)
def _param_names(kernel) -> tuple[tuple[str, ...], dict]:
    """The kernel's parameters in order, and their defaults."""
    sig = inspect.signature(kernel.fn)
    return tuple(sig.parameters), {n: p.default for n, p in sig.parameters.items() if p.default is not p.empty}


class _Replay:
    """One recorded launch: the compiled kernel (or the Triton kernel under the interpreter), its
    grid, and its arguments with the positions that take the call's tensors."""

    def __init__(self, kernel, grid, args, kwargs, compiled, slot: Callable[[Tensor], int]):
        names, defaults = _param_names(kernel)
        values = list(args) + [kwargs[n] if n in kwargs else defaults.get(n) for n in names[len(args):]]
        self.slots = [(i, slot(v)) for i, v in enumerate(values) if isinstance(v, Tensor)]
        # a TMA descriptor built on the host: rebuilt on the replay's tensor (see _on)
        self.described = [(i, slot(v.base)) for i, v in enumerate(values) if _descriptor(v)]
        if any(_holds_tensor(v) and not _descriptor(v) for v in values):
            raise _Unplannable  # a replay would pass it on as recorded: with the recorded call's memory
        # kept without the tensors they held: a plan must not keep its recording call's memory alive
        self.values = [None if isinstance(v, Tensor) else _on(v, None) if _descriptor(v) else v for v in values]
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.compiled = compiled if _HOOKS is not None and hasattr(compiled, "packed_metadata") else None
        self.kernel, self.options = kernel, {k: v for k, v in kwargs.items() if k not in names}
        self.names = names

    def __call__(self, tensors: list[Tensor], stream, hooks: bool) -> None:
        """Launch on ``tensors`` (the replay's, by slot); ``hooks``: launch_hooks_set()."""
        values = self.values.copy()
        for i, s in self.slots:
            values[i] = tensors[s]
        for i, s in self.described:
            values[i] = _on(values[i], tensors[s])
        c = self.compiled
        if c is not None and not hooks:
            g = self.grid
            c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata, None, None, None, *values)
        else:
            self.kernel[self.grid](**dict(zip(self.names, values)), **self.options)


class _Unplannable(Exception):
    pass


def _descriptor(v) -> bool:
    """Whether a kernel argument is a TMA descriptor built on the host (Triton's
    ``TensorDescriptor``, or Gluon's): a dataclass whose ``base`` is the tensor it describes, the
    rest (sizes, strides, block shape, layout) plain values."""
    return dataclasses.is_dataclass(v) and not isinstance(v, type) and isinstance(getattr(v, "base", None), Tensor)


def _on(descriptor, base: Tensor | None):
    """``descriptor`` over ``base`` instead of its recorded tensor (None: over nothing, as a plan
    keeps it). The key guarantees that a replay's base has the recorded one's sizes, strides,
    dtype and 16-byte alignment, which is all the descriptor's checks read, so its fields are
    copied, not validated again."""
    replayed = copy.copy(descriptor)
    object.__setattr__(replayed, "base", base)
    return replayed


def _holds_tensor(v) -> bool:
    """Whether a kernel argument that is not a tensor carries one in its attributes. A TMA
    descriptor built on the host does too, but is replayed over the replay's tensor instead
    (``_descriptor``); the caller sets those apart."""
    return not isinstance(v, Tensor) and any(isinstance(x, Tensor) for x in getattr(v, "__dict__", {}).values())


class _Slots:
    """Numbers for the tensors of a recording, in the order a replay makes them: the call's
    tensor arguments, the buffers it allocated, then views of those (each a base slot and the
    view's sizes, strides and storage offset relative to its base's).

    A kernel argument that is a view at its base's own address (offset 0) gets the base's slot,
    so a replay takes no view for it: a launch reads a tensor argument's address, dtype and
    16-byte alignment only (its sizes and strides are arguments of their own), and those are the
    base's. The call's result is always a tensor of its own shape."""

    def __init__(self, rec: _Recorder):
        self.tensors = [*rec.inputs, *rec.buffers]
        self.of = {id(t): i for i, t in enumerate(self.tensors)}
        self.base_of: dict[int, int | None] = {}  # storage address -> slot (None: two share it)
        for i, t in enumerate(self.tensors):
            ptr = t.untyped_storage().data_ptr()
            self.base_of[ptr] = None if ptr in self.base_of else i
        self.views: list[tuple] = []

    def argument(self, t: Tensor) -> int:
        """The slot of a tensor a kernel receives."""
        slot = self.of.get(id(t))
        if slot is None:
            base, view = self._view(t)
            slot = self.of[id(t)] = base if view[2] == 0 else self._add(base, view)
        return slot

    def result(self, t: Tensor) -> int:
        """The slot of the call's result."""
        slot = self.of.get(id(t))
        if slot is not None and (slot >= len(self.tensors) or self.tensors[slot] is t):
            return slot
        return self._add(*self._view(t))  # a view, taken even at its base's address

    def _view(self, t: Tensor) -> tuple[int, tuple]:
        """(base slot, (sizes, strides, offset from the base's)): t must view exactly one
        argument or buffer, with its dtype, or the call is not plannable."""
        base = self.base_of.get(t.untyped_storage().data_ptr())
        if base is None or t.dtype != self.tensors[base].dtype:
            raise _Unplannable
        return base, (tuple(t.shape), t.stride(), t.storage_offset() - self.tensors[base].storage_offset())

    def _add(self, base: int, view: tuple) -> int:
        self.views.append((base, *view))
        return len(self.tensors) + len(self.views) - 1


class Plan:
    """What one planned call did: the buffers it allocated, the views it took of its tensors and
    buffers, and the launches it made; and which of those tensors it returned."""

    def __init__(self, rec: _Recorder, result: Tensor):
        if rec.other_ops or not rec.launches or not isinstance(result, Tensor):
            raise _Unplannable
        slots = _Slots(rec)
        self.launches = [_Replay(*launch, slots.argument) for launch in rec.launches]
        self.result = slots.result(result)
        # with their strides: torch.empty_strided parses its arguments faster than torch.empty
        self.buffers = [(tuple(t.shape), t.stride(), t.dtype, t.device) for t in rec.buffers]
        self.views = slots.views
        self.needs_allocator = rec.needs_allocator
        self.cuda = rec.inputs[0].device.type == "cuda"

    def __call__(self, inputs: list[Tensor]) -> Tensor:
        tensors = list(inputs)
        tensors += [torch.empty_strided(size, stride, dtype=dtype, device=dev)
                    for size, stride, dtype, dev in self.buffers]
        for base, size, stride, offset in self.views:
            t = tensors[base]
            tensors.append(t.as_strided(size, stride, t.storage_offset() + offset))
        if self.needs_allocator:
            runtime.set_scratch_allocator()
        hooks = launch_hooks_set()
        with runtime.device_guard(tensors[0]):  # the recorded kernels were loaded for this GPU
            stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device()) if self.cuda else None
            for launch in self.launches:
                launch(tensors, stream, hooks)
        return tensors[self.result]


def planned(settings: Callable[[], tuple]):
    """Decorator for a launcher, or an op body that calls launchers, whose launches go through
    ``runtime.launch`` and whose buffers come from :func:`empty`: inside :class:`active`, its calls
    are recorded (second call of a key) and replayed (every later one). ``settings()`` returns the
    global settings its choices read, which are part of the key."""
    def deco(launcher):
        name = launcher.__name__

        @functools.wraps(launcher)
        def wrapper(*args, **kwargs):
            if not _state.active or _state.recorder is not None:
                return launcher(*args, **kwargs)
            named = sorted(kwargs.items())
            inputs = [a for a in args if isinstance(a, Tensor)]
            inputs += [v for _, v in named if isinstance(v, Tensor)]
            if len(set(map(id, inputs))) != len(inputs):
                # One tensor in two roles: a replay maps tensors by role, and the key does not
                # say which roles shared a tensor, so such calls always run in full.
                return launcher(*args, **kwargs)
            known_settings = _state.settings
            current = known_settings.get(settings)
            if current is None:
                current = known_settings[settings] = settings()
            key = (name, current, tuple(map(_describe, args)), tuple([(k, _describe(v)) for k, v in named]))
            plan = _plans.get(key)
            if plan is not None:
                stats["replayed"] += 1
                return plan(inputs)
            if key in _plans:  # recorded once and not plannable
                return launcher(*args, **kwargs)
            if key not in _seen:  # first call
                _seen.add(key)
                return launcher(*args, **kwargs)
            rec = _Recorder(inputs)
            _state.recorder = rec
            try:
                with _OnlyViews(rec):
                    result = launcher(*args, **kwargs)
            finally:
                _state.recorder = None
            if len(_plans) >= _MAX_PLANS:
                _plans.clear()
                _seen.clear()
            try:
                _plans[key] = Plan(rec, result)
                stats["recorded"] += 1
            except _Unplannable:
                _plans[key] = None
                stats["refused"] += 1
            return result
        return wrapper
    return deco


def clear() -> None:
    """Forget every plan and zero the counts (tests; a plan holds no tensors, only compiled
    kernels, sizes and scalars)."""
    _plans.clear()
    _seen.clear()
    stats.update(recorded=0, replayed=0, refused=0)

"""Compile time: torch's analysis of which tensors a traced Triton kernel writes, once per
specialisation of our kernels instead of once per launch.

When torch.compile traces a ``wrap_triton`` launch, torch asks which of the kernel's tensor
arguments it writes: it lowers the kernel to Triton IR and walks it (``generate_ttir`` in
``torch/_higher_order_ops/triton_kernel_wrap.py``). It asks at every launch site, several
times per site (functionalisation, then Inductor's lowering), and nothing is cached. A model
launches the same few specialisations at every layer: BERT-base's 37 dropout sites launch about
150 kernels per step, each analysed ~4 times at 15-40 ms a lowering, a large share of the
difference between our compile time and Inductor's (``bench_model.py`` logs the phases).

The answer depends only on what the lowering sees, which torch itself reduces to: the kernel
(torch wraps every launch in a fresh one-config Autotuner: its JITFunction and config), each
argument's kind (a symbolic value becomes the constant 2, a fake or Inductor tensor an
empty tensor of its dtype, a real tensor its dtype and 16-byte alignment), every plain value
(ints, floats, constexprs, None) and the TMA metadata. That is the cache key; an argument of any
other kind, or a kernel that is not ours, skips the cache. Each hit returns a deep copy, so no
caller can change what another one sees.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# Names of the analysis across torch versions: 2.11 asks identify_mutated_tensors for the
# written names, later versions identify_accessed_tensors for reads and writes.
_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")
_PACKAGE = __name__.rsplit(".", 2)[0]  # sparsedrop_compile

_cache: dict[tuple, Any] = {}
stats = {"hits": 0, "misses": 0, "skipped": 0}


def _arg_key(value: Any, tma_entry: Any) -> tuple | None:
    """What the lowering sees of one argument, or None when that cannot be told safely."""
    import sympy
    from torch._subclasses.fake_tensor import FakeTensor

    if tma_entry is not None:
        return ("tma", repr(tma_entry), str(getattr(value, "dtype", None)))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("sym",)
    if isinstance(value, FakeTensor):
        return ("tensor", value.dtype)
    if isinstance(value, Tensor):
        return ("real", value.dtype, value.data_ptr() % 16 == 0)
    if type(value).__name__ == "TensorBox":  # Inductor's IR node: lowered as an empty tensor of its dtype
        return ("tensor", value.get_dtype())
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    return None


def _kernel_key(kernel: Any) -> tuple | None:
    """The kernel as the lowering sees it. torch wraps each launch that passes num_warps /
    num_stages in a new one-config Autotuner, so an Autotuner counts as its JITFunction plus its
    configs (the lowering merges the first config's kwargs into the arguments)."""
    configs = getattr(kernel, "configs", None)
    jit = kernel if configs is None else getattr(kernel, "fn", None)
    fn = getattr(jit, "fn", None)  # the Python function
    if fn is None or not getattr(fn, "__module__", "").startswith(_PACKAGE + ".") or getattr(jit, "configs", None) is not None:
        return None
    if configs is None:
        return (jit,)
    return (jit, tuple((tuple(sorted(c.kwargs.items())), str(c)) for c in configs))


def _key(kernel: Any, kwargs: dict, tma_meta: Any) -> tuple | None:
    kernel_key = _kernel_key(kernel)
    if kernel_key is None:
        return None
    parts = []
    for name, value in kwargs.items():
        part = _arg_key(value, (tma_meta or {}).get(name))
        if part is None:
            return None
        parts.append((name, part))
    return (kernel_key, tuple(parts))


def _cached(analysis: Callable) -> Callable:
    @functools.wraps(analysis)
    def wrapper(kernel, kwargs, *rest, **kw):
        key = _key(kernel, kwargs, rest[0] if rest else kw.get("tma_descriptor_metadata"))
        if key is None:
            stats["skipped"] += 1
            return analysis(kernel, kwargs, *rest, **kw)
        key = (analysis.__name__, key)
        if key not in _cache:
            stats["misses"] += 1
            _cache[key] = analysis(kernel, kwargs, *rest, **kw)
        else:
            stats["hits"] += 1
        return copy.deepcopy(_cache[key])

    wrapper._sparsedrop_cached = True
    return wrapper


def install() -> list[str]:
    """Put the cache in front of torch's analysis (idempotent); returns the names wrapped."""
    from torch._higher_order_ops import triton_kernel_wrap

    wrapped = []
    for name in _ANALYSES:
        analysis = getattr(triton_kernel_wrap, name, None)
        if analysis is None:
            continue
        if not getattr(analysis, "_sparsedrop_cached", False):
            setattr(triton_kernel_wrap, name, _cached(analysis))
        wrapped.append(name)
    return wrapped

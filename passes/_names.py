"""Module paths as users name them: the names of ``model.named_modules()`` for the model they compiled.

Dynamo records, per FX node, the modules it was called in (``nn_module_stack``): a key and a source
expression relative to the compiled frame, e.g. ``L['args'][0].model.layers[0].self_attn`` (HF's
decorated forwards take ``self`` in ``*args``) or ``L['self'].__dict__['_modules']['base_model']...``
(PEFT's ``__getattr__``). After a graph break, the frame is a submodule's forward and the expression
is relative to that submodule. So where Dynamo keys the entry by the module's ``id`` (modules it
inlines), the module is looked up by identity in the compiled model's ``named_modules()``; the
source expression, tidied, is the fallback.
"""
from __future__ import annotations

import contextlib
import contextvars
import re
import sys

import torch
import torch.fx as fx

_names: contextvars.ContextVar = contextvars.ContextVar("sparsedrop_module_names", default=None)


def compiled_root() -> torch.nn.Module | None:
    """The module whose call entered compiled code, found on the Python call stack (outermost first):
    ``torch.compile(model)`` calls go through the OptimizedModule wrapper, ``model.compile()`` through
    the module itself. None when a plain function was compiled."""
    from torch._dynamo.eval_frame import OptimizedModule

    call = torch.nn.Module._wrapped_call_impl.__code__
    root, frame = None, sys._getframe(1)
    while frame is not None:
        if frame.f_code is call:  # read locals only of these frames
            obj = frame.f_locals.get("self")
            if isinstance(obj, OptimizedModule):
                root = obj._orig_mod
            elif isinstance(obj, torch.nn.Module) and getattr(obj, "_compiled_call_impl", None) is not None:
                root = obj
        frame = frame.f_back
    while isinstance(root, OptimizedModule):  # torch.compile(torch.compile(model))
        root = root._orig_mod
    return root


def names_by_id(root: torch.nn.Module | None) -> dict[int, str]:
    """id(module) -> its first name in ``root.named_modules()`` ('' for the root itself)."""
    names: dict[int, str] = {}
    if root is not None:
        for name, module in root.named_modules(remove_duplicate=False):
            names.setdefault(id(module), name)
    return names


@contextlib.contextmanager
def naming(root: torch.nn.Module | None):
    """Name modules after ``root``'s ``named_modules()`` while the passes run in this block."""
    token = _names.set(names_by_id(root))
    try:
        yield
    finally:
        _names.reset(token)


def tidy_source(source: str) -> str:
    """Dynamo's source expression -> a dotted path relative to the frame's root object."""
    path = re.sub(r"^[LG]\['[^']*'\](\[[^\]]*\])*", "", source)  # the frame's local or global, and items of it
    path = re.sub(r"\.__dict__\['_modules'\]|\._modules(?=\[)", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"\]]*)['\"]\]", r".\1", path)
    return path.strip(".")


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that made this node, as in ``named_modules()``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    key, (source, *_) = list(stack.items())[-1]
    names = _names.get()
    match = re.fullmatch(r"(\d+)(@\d+)?", str(key))  # "<id>" or "<id>@<call number>"
    if names and match and int(match.group(1)) in names:
        return names[int(match.group(1))]
    return tidy_source(source)

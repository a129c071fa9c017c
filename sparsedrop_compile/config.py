"""The backend's options: one frozen dataclass, validated with errors that say what to do."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
KERNELS = ("auto", "triton", "reference")
ATTENTION_MODES = ("post_softmax", "dropkey")
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class SparseDropConfig:
    """Options of the ``sparsedrop`` backend (``torch.compile(..., options={...})``).

    block_size: mask block (rows, cols) of the matmul's activation operand; an int means square.
    min_p: dropouts with a smaller p keep element-wise dropout.
    sparse_min_p: a block-dropped matmul site (input or output side) skips its dropped blocks in
        the block-sparse kernels only from this p up, or where the matmul is launch-bound (small,
        and not under CUDA graphs: there the fused kernels win by launching less). Below it, a
        GPU-bound site keeps the same block dropout (same flags, same random stream) on a dense
        matmul: today's kernels run a kept tile slower than cuBLAS, so skipping 10% of the work
        does not pay. 0.25 by default; 0 always skips. Only with kernel="auto".
    output_side: also rewrite a dropout of a matmul's output (``dropout(linear(x))``, the
        residual dropout of most transformer layers): only its kept output tiles are computed.
        On by default; False rewrites dropouts only where they feed a matmul.
    max_drop_all: a site is block-dropped only if the chance that every block of its whole
        activation is dropped at once, p**k for k blocks (all matrices' blocks for a batched
        matmul, all (batch, head) tiles for attention), is at most this; otherwise it keeps
        element-wise dropout. 1e-6 by default: p = 0.1 needs 6 blocks, p = 0.3 12, p = 0.5 20.
        With dynamic shapes, k is counted at the sizes of the call that compiled the graph.
    inner: the compiler the rewritten graph goes to: "inductor", "aot_eager" or "eager".
    kernel: "auto" (Triton on CUDA where supported, else the PyTorch reference),
        "triton" (always Triton; on CPU tensors only under TRITON_INTERPRET=1) or "reference".
    exclude: glob patterns on a site's module path (e.g. "decoder.*", "*.EncDecAttention.*")
        or on its kind (e.g. "kind:attention"); matching sites are left as they are. Paths are
        the names of the compiled module's ``named_modules()`` (when a plain function is
        compiled: relative to the module whose forward Dynamo compiled).
    filter_fn: called as filter_fn(site) -> bool for each candidate site; False leaves it alone.
    attention: rewrite ``scaled_dot_product_attention(dropout_p > 0)`` to tile-dropout attention.
    attention_mode: "post_softmax" (SDPA's semantics, dropout after the softmax) or
        "dropkey" (tiles dropped before the softmax and renormalised; a different regulariser).
    attention_block: (query, key) tile of the attention dropout mask.
    inductor_options: config patches handed to Inductor's compile_fx.
    mode: Inductor's compile mode ("default", "reduce-overhead", "max-autotune",
        "max-autotune-no-cudagraphs"). torch.compile refuses ``mode=`` together with ``options=``,
        so with options pass it here.
    autotune: time the block-sparse matmul's candidate kernel configs while the graph is built
        (True) or take the first that runs, the best guess for the shape (False). None (the
        default) follows Inductor: on in the "max-autotune" modes, else off unless
        SPARSEDROP_AUTOTUNE=1. Timing makes the first compile several times slower.
    """

    block_size: tuple[int, int] = (128, 128)
    min_p: float = 0.0
    sparse_min_p: float = 0.25
    output_side: bool = True
    max_drop_all: float = 1e-6
    inner: str = "inductor"
    kernel: str = "auto"
    exclude: tuple[str, ...] = ()
    filter_fn: Callable[[Any], bool] | None = field(default=None, compare=False)
    attention: bool = True
    attention_mode: str = "post_softmax"
    attention_block: tuple[int, int] = (64, 128)
    inductor_options: Mapping[str, Any] = field(default_factory=dict, compare=False)
    mode: str | None = None
    autotune: bool | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("block_size", _block_pair("block_size", self.block_size))
        set_("attention_block", _block_pair("attention_block", self.attention_block))
        for name in ("min_p", "sparse_min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"sparsedrop option {name}={value!r}: expected a number in [0, 1]")
        bound = self.max_drop_all
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound <= 1:
            raise ValueError(
                f"sparsedrop option max_drop_all={bound!r}: expected a probability in (0, 1], e.g. 1e-6 (the default); "
                "1 turns the whole-activation check off, and exclude=[...] or min_p leave sites element-wise"
            )
        for name, allowed in (("inner", INNER_COMPILERS), ("kernel", KERNELS), ("attention_mode", ATTENTION_MODES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"sparsedrop option {name}={value!r}: expected one of {', '.join(map(repr, allowed))}")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        if not isinstance(exclude, (tuple, list)) or not all(isinstance(e, str) for e in exclude):
            raise ValueError(
                f"sparsedrop option exclude={self.exclude!r}: expected a glob pattern or a list of them, "
                "e.g. ['decoder.*', 'kind:attention']"
            )
        set_("exclude", tuple(exclude))
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ValueError(f"sparsedrop option filter_fn={self.filter_fn!r}: expected a callable site -> bool")
        for name in ("attention", "output_side"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"sparsedrop option {name}={getattr(self, name)!r}: expected True or False")
        if self.mode is not None and self.mode not in INDUCTOR_MODES:
            raise ValueError(f"sparsedrop option mode={self.mode!r}: expected one of {', '.join(map(repr, INDUCTOR_MODES))}")
        if self.autotune is not None and not isinstance(self.autotune, bool):
            raise ValueError(f"sparsedrop option autotune={self.autotune!r}: expected True, False or None (follow the mode)")
        if not isinstance(self.inductor_options, Mapping):
            raise ValueError(
                f"sparsedrop option inductor_options={self.inductor_options!r}: expected a dict of "
                "torch._inductor.config names to values"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "SparseDropConfig" | None) -> "SparseDropConfig":
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(f"sparsedrop options={options!r}: expected a dict, e.g. options={{'block_size': 128}}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown sparsedrop option(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(valid)}")
        return cls(**options)

    def autotune_kernels(self) -> bool | None:
        """Whether to time kernel configs during this compile; None leaves it to the environment."""
        if self.autotune is not None:
            return self.autotune
        return True if self.mode is not None and self.mode.startswith("max-autotune") else None

    def replace(self, **changes: Any) -> "SparseDropConfig":
        return dataclasses.replace(self, **changes)


def _block_pair(name: str, value: Any) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
    ):
        raise ValueError(f"sparsedrop option {name}={value!r}: expected a positive int or a (rows, cols) pair of them, e.g. 128 or (128, 64)")
    return (int(pair[0]), int(pair[1]))

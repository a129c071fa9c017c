"""``torch.einsum`` as a matmul of the dropout output, when its equation provably is one.

Two forms are recognised (d is the dropout output's subscripts, its last index k contracted):

    linear: d = <rows> k, other = n k or k n, out = <rows> n     e.g. "bsk,nk->bsn", "ik,kj->ij"
            -> linear(d, other) or linear(d, other.t())
    matmul: d = <batch> m k, other = <batch'> k n or <batch'> n k, out = <batch''> m n, where one
            batch is a suffix of the other and <batch''> the longer (torch.matmul broadcasting,
            which matches einsum's for size-1 dims)                  e.g. "bhqk,bhkd->bhqd"
            -> matmul(d, other) or matmul(d, other.transpose(-2, -1))

The operands may come in either order (the equation fixes the result). Anything else (an
ellipsis, repeated or extra summed indices, three operands, another output order) is refused
with a reason naming the equation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

EINSUM_TARGETS = (torch.functional.einsum, torch.einsum)


@dataclass
class EinsumMatmul:
    kind: str  # "linear" (other is the 2-D weight) or "matmul"
    other: fx.Node
    transpose: bool  # other's last two dims are swapped first: linear wants (n, k), matmul (k, n)


def is_einsum(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in EINSUM_TARGETS


def _equation_and_operands(node: fx.Node):
    args = node.args
    if not args or not isinstance(args[0], str):
        return None, None
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])  # einsum(eq, [a, b])
    return args[0], list(operands)


def einsum_as_matmul(node: fx.Node, source: fx.Node) -> tuple[EinsumMatmul | None, str | None]:
    """(form, None) if ``node`` is a matmul with ``source`` as the activation, else (None, why)."""
    equation, operands = _equation_and_operands(node)
    if equation is None:
        return None, "einsum in sublist form (operand, indices, ...) is not read"
    label = f"einsum {equation!r}"
    if node.kwargs:
        return None, f"{label} with keyword arguments {sorted(node.kwargs)}"
    if len(operands) != 2:
        return None, f"{label} has {len(operands)} operands; only a two-operand einsum is a matmul"
    if operands[0] is source and operands[1] is source:
        return None, f"{label} reads the dropout output as both operands"
    if source not in operands:
        return None, f"{label}: the dropout output is not one of its operands"
    eq = equation.replace(" ", "")
    if "." in eq:
        return None, f"{label} has an ellipsis"
    lhs, arrow, out = eq.partition("->")
    inputs = lhs.split(",")
    if len(inputs) != 2 or not all(s.isalpha() for s in inputs) or not (out.isalpha() or out == ""):
        return None, f"{label}: cannot read the equation"
    if not arrow:  # implicit output: the indices seen once, sorted (as torch.einsum does)
        letters = "".join(inputs)
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    i = operands.index(source)
    a, b, other = inputs[i], inputs[1 - i], operands[1 - i]
    if any(len(set(s)) != len(s) for s in (a, b, out)):
        return None, f"{label} repeats an index within one operand or the output"
    if len(a) < 2 or len(b) < 2:
        return None, f"{label}: an operand is 1-D"
    k = a[-1]
    if k not in b or k in out:
        return None, f"{label}: the dropout operand's last index {k!r} is not the (only) contracted one"
    if any(c not in out for c in a[:-1]) or any(c not in out for c in b.replace(k, "")):
        return None, f"{label} sums over an index besides {k!r}"
    if len(b) == 2 and not (set(a) & set(b)) - {k}:
        n = b.replace(k, "")
        if out != a[:-1] + n:
            return None, f"{label}: output order {out!r} is not the matmul's {a[:-1] + n!r}"
        return EinsumMatmul("linear", other, transpose=b == k + n), None
    if k not in b[-2:]:
        return None, f"{label}: {k!r} is not among the other operand's last two indices"
    m, n = a[-2], b[-2:].replace(k, "")
    batch_a, batch_b = a[:-2], b[:-2]
    if m in b or n in a or not (batch_a.endswith(batch_b) or batch_b.endswith(batch_a)):
        return None, f"{label}: batch indices do not line up as in a batched matmul"
    batch = max(batch_a, batch_b, key=len)
    if out != batch + m + n:
        return None, f"{label}: output order {out!r} is not the matmul's {batch + m + n!r}"
    return EinsumMatmul("matmul", other, transpose=b[-1] == k), None

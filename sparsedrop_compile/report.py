"""What the backend did with each dropout: ``Site``, the report, its table, and the recorder.

``Site`` is what ``filter_fn`` receives and what ``explain(...).sites`` holds. The backend and
``explain`` both import this module; neither imports the other's internals.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

HEADER = ("graph", "location", "p", "kind", "producer", "consumers", "rewritten", "reason")


@dataclass
class Site:
    """One dropout the backend looked at, and what it did with it."""

    graph: int | None  # None: the dropout ran outside every compiled graph
    node: str
    location: str
    module_path: str
    p: float | None
    kind: str
    consumers: list[str] = field(default_factory=list)
    rewritten: bool = False
    reason: str | None = None
    block_size: tuple[int, int] | None = None
    blocks: int | None = None  # k: mask blocks (or attention tiles) over the whole activation
    region: str | None = None  # e.g. "activation checkpoint": the higher-order-op body it is in
    # Which side of a matmul the dropout was fused on: "input" (it feeds the matmul), "output" (the
    # matmul feeds it), "both" (its matmul is block-sparse on both sides: T5's dropout -> wo ->
    # dropout, either dropout's row); None where not rewritten, or inside attention.
    side: str | None = None
    producer: str | None = None  # the matmul whose output the dropout drops, e.g. "linear layer.0.output.dense"
    # How a rewritten matmul site computes: "sparse" (the block-sparse kernels skip dropped blocks)
    # or "dense" (the same block dropout in front of the dense matmul: passes/compute_choice.py).
    compute: str | None = None

    def row(self) -> tuple[str, ...]:
        p = "sym" if self.p is None else f"{self.p:g}"
        how = ", ".join(x for x in (self.side, "dense" if self.compute == "dense" else None) if x)
        status = (f"yes ({how})" if how else "yes") if self.rewritten else "no"
        where = f"{self.location} [in {self.region}]" if self.region else self.location
        graph = "-" if self.graph is None else str(self.graph)
        return (graph, where, p, self.kind, self.producer or "-", ", ".join(self.consumers) or "-", status, self.reason or "")


def format_sites(sites) -> str:
    """A plain-text table, one row per site. Cells are never cut, so no two rows can look alike
    when their sites differ."""
    rows = [HEADER] + [s.row() for s in sites]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class ExplainReport:
    """Every dropout site the backend saw while compiling, over all graphs."""

    sites: list = field(default_factory=list)
    graphs: int = 0
    # Rewritten sites whose keep flags come from a draw shared with others of their graph and p
    # (passes/keep_sampling.py), and the launches those draws take.
    shared_draw_sites: int = 0
    shared_draws: int = 0

    @property
    def rewritten(self) -> list:
        return [s for s in self.sites if s.rewritten]

    @property
    def skipped(self) -> list:
        return [s for s in self.sites if not s.rewritten]

    def __str__(self) -> str:
        head = f"sparsedrop: {len(self.rewritten)} of {len(self.sites)} dropout site(s) rewritten in {self.graphs} graph(s)"
        if self.shared_draws:
            head += (f"; keep flags of {self.shared_draw_sites} rewritten site(s) drawn in {self.shared_draws} "
                     f"launch(es), one per graph and p")
        return head + ("\n" + format_sites(self.sites) if self.sites else "")


class _GraphCount:
    """Numbers graphs compiled outside any ``recording`` block (for the debug log)."""

    graphs = 0


_outside = _GraphCount()
_active: contextvars.ContextVar = contextvars.ContextVar("sparsedrop_report", default=None)


def next_graph_index() -> int:
    """The index of the graph about to be rewritten, counted per report while one is recording."""
    counter = _active.get() or _outside
    index = counter.graphs
    counter.graphs += 1
    return index


def record(sites) -> None:
    """Add a graph's sites to the report being recorded, if any."""
    report = _active.get()
    if report is not None:
        report.sites.extend(sites)


def record_shared_draws(sites: int, draws: int) -> None:
    """Add a graph's merged keep draws (``sites`` sampled in ``draws`` launches) to the report."""
    report = _active.get()
    if report is not None:
        report.shared_draw_sites += sites
        report.shared_draws += draws


@contextlib.contextmanager
def recording(report: ExplainReport):
    """Collect into ``report`` the sites of every graph the backend rewrites in this block."""
    token = _active.set(report)
    try:
        yield report
    finally:
        _active.reset(token)

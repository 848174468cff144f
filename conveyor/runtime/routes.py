"""Where each compute action's values come from and go, worked out once per program and rank.

The executor runs the same program every step. What depends only on the program (the edges into and out
of a stage, whether both ends of an edge run a micro-batch on this rank, which backwards are split off
from their W) is computed here once, so that an action does no lookups in the stage graph while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schedules import Edge, Kind, Link, Program

__all__ = ["BackwardRoute", "ForwardRoute", "HandoffKey", "Hop", "backward_route", "forward_route", "split_here"]

# What a value waits under between two actions of this rank: ("act", src, dst, mb) for src's outputs to
# dst, ("grad", src, dst, mb) for the gradients of dst's inputs back to src.
HandoffKey = tuple[str, int, int, int]


@dataclass(frozen=True)
class Hop:
    """One edge's values for one micro-batch: handed over in memory under `key` (`link` None), or over `link`."""

    key: HandoffKey
    link: Link | None
    values: tuple[int, ...] | None
    """Which outputs of the edge's source it carries (None: all of them, in order)."""
    grad: bool
    """Whether some value on the edge carries a gradient back."""

    @property
    def local(self) -> bool:
        return self.link is None


@dataclass(frozen=True)
class ForwardRoute:
    """A forward's inputs (its in-edges, in the order the stage takes them) and where its outputs go."""

    inputs: tuple[Hop, ...]
    outputs: tuple[Hop, ...]


@dataclass(frozen=True)
class BackwardRoute:
    """A backward's output gradients (over its out-edges that carry one) and where its input gradients go."""

    output_grads: tuple[Hop, ...]
    input_grads: tuple[Hop, ...]
    split: bool
    """Whether a W follows: this B computes only the input gradients."""


def _hop(program: Program, kind: str, edge: Edge, mb: int) -> Hop:
    link = None if program.same_rank(edge.src, edge.dst, mb) else (kind, edge.src, edge.dst)
    return Hop((kind, edge.src, edge.dst, mb), link, edge.values, edge.grad)


def forward_route(program: Program, stage: int, mb: int) -> ForwardRoute:
    graph = program.graph
    return ForwardRoute(
        tuple(_hop(program, "act", edge, mb) for edge in graph.in_edges(stage)),
        tuple(_hop(program, "act", edge, mb) for edge in graph.out_edges(stage)),
    )


def backward_route(program: Program, stage: int, mb: int, split: bool) -> BackwardRoute:
    graph = program.graph
    return BackwardRoute(
        tuple(_hop(program, "grad", edge, mb) for edge in graph.out_edges(stage) if edge.grad),
        tuple(_hop(program, "grad", edge, mb) for edge in graph.in_edges(stage)),
        split,
    )


def split_here(program: Program, rank: int) -> set[tuple[int, int | None]]:
    """The (stage, micro-batch) pairs whose B this rank runs split from a W (a W of the same pair runs here)."""
    return {(a.stage, a.mb) for a in program.actions.get(rank, []) if a.kind is Kind.WEIGHT}

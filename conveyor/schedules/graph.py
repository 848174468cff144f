"""The stage graph: which stage's outputs go to which stage, and which parameters several stages hold.

A split produces it once; every reader takes the edges from here (lowering
inserts a transfer per edge that crosses ranks, the validator and simulator
wait on them, the executor routes tensors by them), so a value produced on
stage i and used on stage j > i + 1 travels directly from i to j.

Conventions every split follows:

- stage 0 is called with the user's micro-batch; a later stage with the
  values of its in-edges, positionally: edges in order of their source
  stage, each edge's values in the order it lists them;
- a stage other than the last returns a flat tuple (or one tensor) of
  outputs, and an edge names the indices of the outputs it carries; one
  output may travel on several edges (its gradients are summed);
- the last stage's output goes to the loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Edge", "StageGraph", "Tie"]


@dataclass(frozen=True, order=True)
class Edge:
    """Values of stage `src` used by stage `dst` (src < dst)."""

    src: int
    dst: int
    values: tuple[int, ...] | None = None
    """Indices into src's outputs, in the order dst takes them; None: all of src's outputs, in order."""
    grad: bool = True
    """Whether some value on the edge carries a gradient back to src (False: integer ids, masks)."""

    def __str__(self) -> str:
        shown = "all" if self.values is None else ",".join(map(str, self.values))
        return f"{self.src}->{self.dst}[{shown}]{'' if self.grad else ' (no grad)'}"


@dataclass(frozen=True)
class Tie:
    """One parameter that several stages hold (GPT-2's token embedding and LM head): its name on each."""

    names: tuple[tuple[int, str], ...]
    """(stage, the parameter's name in that stage's module), by stage."""

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(stage for stage, _ in self.names)

    def name_on(self, stage: int) -> str:
        return dict(self.names)[stage]


@dataclass(frozen=True)
class StageGraph:
    """The edges between a model's stages and its tied parameters."""

    num_stages: int
    edges: tuple[Edge, ...]
    ties: tuple[Tie, ...] = ()

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ValueError(f"a stage graph needs at least 1 stage; got {self.num_stages}")
        seen: set[tuple[int, int]] = set()
        for edge in self.edges:
            if not 0 <= edge.src < edge.dst < self.num_stages:
                last = self.num_stages - 1
                raise ValueError(f"edge {edge} must go from an earlier to a later stage of stages 0..{last}")
            if (edge.src, edge.dst) in seen:
                raise ValueError(f"stage {edge.src} has two edges to stage {edge.dst}: merge their values into one")
            seen.add((edge.src, edge.dst))
        for stage in range(self.num_stages - 1):
            if not self.out_edges(stage):
                raise ValueError(f"stage {stage} sends its outputs nowhere: every stage but the last needs an out-edge")
        for stage in range(1, self.num_stages):
            if not self.in_edges(stage):
                raise ValueError(f"stage {stage} receives nothing: every stage but the first needs an in-edge")
        for tie in self.ties:
            stages = tie.stages
            if len(stages) < 2 or len(set(stages)) != len(stages) or not all(0 <= s < self.num_stages for s in stages):
                raise ValueError(f"a tie needs two or more distinct stages of {self.num_stages}; got {tie}")

    @classmethod
    def chain(cls, num_stages: int, ties: Iterable[Tie] = ()) -> StageGraph:
        """Stage s feeds all its outputs to stage s + 1 (a manual split)."""
        return cls(num_stages, tuple(Edge(s, s + 1) for s in range(num_stages - 1)), tuple(ties))

    @property
    def is_chain(self) -> bool:
        return all(e.dst == e.src + 1 and e.values is None and e.grad for e in self.edges)

    def in_edges(self, stage: int) -> list[Edge]:
        """Edges into `stage`, by source: the order of the stage's inputs."""
        return sorted(e for e in self.edges if e.dst == stage)

    def out_edges(self, stage: int) -> list[Edge]:
        """Edges out of `stage`, by destination."""
        return sorted(e for e in self.edges if e.src == stage)

    def edge(self, src: int, dst: int) -> Edge:
        for edge in self.edges:
            if (edge.src, edge.dst) == (src, dst):
                return edge
        raise KeyError(f"no edge from stage {src} to stage {dst}")

    def tied_with(self, stage: int) -> list[int]:
        """The stages that share some parameter with `stage`, directly or through others (itself included).

        These stages reduce their gradients together; empty when `stage` shares nothing.
        """
        component: set[int] = set()
        frontier = [stage]
        while frontier:
            current = frontier.pop()
            for tie in self.ties:
                if current in tie.stages:
                    for other in tie.stages:
                        if other not in component:
                            component.add(other)
                            frontier.append(other)
        return sorted(component)

    def ties_of(self, stage: int) -> list[Tie]:
        return [tie for tie in self.ties if stage in tie.stages]

    def describe(self) -> str:
        lines = [f"{self.num_stages} stages; edges: {', '.join(map(str, sorted(self.edges))) or 'none'}"]
        for tie in self.ties:
            lines.append("tied: " + " = ".join(f"stage {s} {name}" for s, name in tie.names))
        return "\n".join(lines)

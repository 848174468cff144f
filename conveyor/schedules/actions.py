"""The schedule IR: actions, per-rank programs, and their short string form."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Action", "Kind", "Link", "Program", "parse_action", "parse_actions"]

# A one-way link between neighbouring stages on different ranks: ("act", s) carries
# stage s's outputs to stage s + 1, ("grad", s) carries stage s's input gradients to
# stage s - 1. Each link carries its micro-batches in order, on its own channel.
Link = tuple[str, int]


class Kind(enum.Enum):
    """What an action does. The value is its short form in action strings."""

    FORWARD = "F"
    BACKWARD = "B"  # the whole backward, or only the input gradient when the stage's W is split off
    WEIGHT = "W"  # the weight-gradient part of a split backward (zero-bubble schedules)
    SEND_F = "SF"  # send stage's output activations to the next stage
    RECV_F = "RF"  # receive stage's input activations from the previous stage
    SEND_B = "SB"  # send the gradient of stage's input to the previous stage
    RECV_B = "RB"  # receive the gradient of stage's output from the next stage
    STEP = "STEP"  # optimizer step of the stage's parameters

    @property
    def is_compute(self) -> bool:
        return self in (Kind.FORWARD, Kind.BACKWARD, Kind.WEIGHT)

    @property
    def is_send(self) -> bool:
        return self in (Kind.SEND_F, Kind.SEND_B)

    @property
    def is_recv(self) -> bool:
        return self in (Kind.RECV_F, Kind.RECV_B)


@dataclass(frozen=True, order=True)
class Action:
    """One step of a rank's program: `kind` applied to micro-batch `mb` of `stage`.

    Written as ``<stage><kind><mb>``: ``1F3`` is the forward of micro-batch 3 on
    stage 1, ``0SB2`` sends stage 0's input gradient of micro-batch 2, and
    ``1STEP`` steps stage 1's optimizer (STEP has no micro-batch).
    """

    stage: int
    kind: Kind
    mb: int | None = None

    def __post_init__(self) -> None:
        if (self.kind is Kind.STEP) != (self.mb is None):
            raise ValueError(f"{self.kind.name} {'takes no' if self.kind is Kind.STEP else 'needs a'} micro-batch")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{'' if self.mb is None else self.mb}"

    def __repr__(self) -> str:
        return f"Action({self})"


_ACTION = re.compile(r"^(\d+)(STEP|SF|RF|SB|RB|F|B|W)(\d*)$")


def parse_action(text: str) -> Action:
    """Parse the string form written by `str(action)`, e.g. ``"1F3"``."""
    match = _ACTION.match(text.strip())
    if match is None:
        raise ValueError(f"not an action: {text!r} (expected e.g. '1F3', '0SB2', '1STEP')")
    stage, kind, mb = match.groups()
    return Action(int(stage), Kind(kind), int(mb) if mb else None)


def parse_actions(text: str) -> list[Action]:
    """Parse a whitespace-separated list of actions, e.g. ``"0F0 0F1 0B0 0B1"``."""
    return [parse_action(word) for word in text.split()]


@dataclass
class Program:
    """A schedule: one list of actions per rank, and where each stage lives.

    `placement[s]` is the rank that owns stage `s`. A program fresh from a
    generator holds only compute and STEP actions; `lower` adds the transfers.
    """

    placement: tuple[int, ...]
    num_microbatches: int
    actions: dict[int, list[Action]] = field(default_factory=dict)
    name: str = ""

    @property
    def num_stages(self) -> int:
        return len(self.placement)

    @property
    def num_ranks(self) -> int:
        return max(self.placement) + 1

    def stages_of(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.placement) if r == rank]

    def rank_of(self, stage: int) -> int:
        return self.placement[stage]

    @classmethod
    def from_strings(
        cls, rows: Mapping[int, str] | Sequence[str], placement: Iterable[int], num_microbatches: int, name: str = ""
    ) -> Program:
        """Build a program from one action string per rank (handy in tests)."""
        items = rows.items() if isinstance(rows, Mapping) else enumerate(rows)
        return cls(tuple(placement), num_microbatches, {rank: parse_actions(row) for rank, row in items}, name)

    def links(self) -> dict[Link, tuple[int, int]]:
        """Every link between stages on different ranks, with its (sender, receiver) ranks."""
        found: dict[Link, tuple[int, int]] = {}
        for stage in range(self.num_stages - 1):
            a, b = self.rank_of(stage), self.rank_of(stage + 1)
            if a != b:
                found[("act", stage)] = (a, b)
                found[("grad", stage + 1)] = (b, a)
        return found

    def to_strings(self) -> list[str]:
        return [" ".join(str(a) for a in self.actions.get(rank, [])) for rank in range(self.num_ranks)]

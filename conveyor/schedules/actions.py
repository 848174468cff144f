"""The schedule IR: actions, per-rank programs, and their short string form."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .graph import StageGraph

__all__ = ["Action", "Channel", "Kind", "Link", "Program", "parse_action", "parse_actions"]

# A one-way channel of an edge (src, dst) of the stage graph between stages on different
# ranks: ("act", src, dst) carries src's outputs to dst, ("grad", src, dst) carries the
# gradients of dst's inputs back to src. The pair is always the edge, in forward order, so a
# link names the same two ends wherever it appears. Each link carries its micro-batches in
# order, on a channel of its own.
Link = tuple[str, int, int]

# What a link's messages travel on: the link itself, or, where a replicated stage sits at one of its
# ends, (kind, src, dst, sender rank, receiver rank) for each pair of ranks (see `Program.channel`).
# The runtime names its own channels the same way: ("loss", from rank, to rank) for the loss,
# ("tie<i>" | "replicas<s>", from rank, to rank) for shared gradients.
Channel = tuple[str, int, int] | tuple[str, int, int, int, int]


class Kind(enum.Enum):
    """What an action does. The value is its short form in action strings."""

    FORWARD = "F"
    BACKWARD = "B"  # the whole backward, or only the input gradient when the stage's W is split off
    WEIGHT = "W"  # the weight-gradient part of a split backward (zero-bubble schedules)
    SEND_F = "SF"  # send the stage's outputs to the stage `peer`
    RECV_F = "RF"  # receive the stage's inputs from the stage `peer`
    SEND_B = "SB"  # send the gradient of the stage's inputs back to the stage `peer` they came from
    RECV_B = "RB"  # receive the gradient of the stage's outputs from the stage `peer` that used them
    REDUCE = "RD"  # sum the gradients the stage shares: tied weights, and a replicated stage's with its replicas
    STEP = "STEP"  # optimizer step of the stage's parameters
    OFFLOAD = "OF"  # start moving what the stage saved for the micro-batch's backward to host memory
    RELOAD = "RL"  # start bringing it back to the device; the backward waits until it is there

    @property
    def is_compute(self) -> bool:
        return self in (Kind.FORWARD, Kind.BACKWARD, Kind.WEIGHT)

    @property
    def is_send(self) -> bool:
        return self in (Kind.SEND_F, Kind.SEND_B)

    @property
    def is_recv(self) -> bool:
        return self in (Kind.RECV_F, Kind.RECV_B)

    @property
    def is_transfer(self) -> bool:
        return self.is_send or self.is_recv

    @property
    def is_host_copy(self) -> bool:
        """An offload to host memory or a reload from it: a copy on the rank's copy stream, no peer."""
        return self in (Kind.OFFLOAD, Kind.RELOAD)

    @property
    def optional_mb(self) -> bool:
        """STEP and REDUCE cover a whole mini-batch, or (asynchronous schedules) follow one micro-batch."""
        return self in (Kind.STEP, Kind.REDUCE)


@dataclass(frozen=True, order=True)
class Action:
    """One step of a rank's program: `kind` applied to micro-batch `mb` of `stage`.

    Written as ``<stage><kind><mb>``, and a transfer adds the stage at the
    other end: ``1F3`` is the forward of micro-batch 3 on stage 1, ``1SF3>2``
    sends its outputs to stage 2, ``2RF3<1`` receives them there, ``2SB3>1``
    sends the gradient of stage 2's inputs back to stage 1, ``1RB3<2``
    receives it. ``1STEP`` steps stage 1's optimizer and ``0RD`` sums the
    gradients stage 0 shares with other stages, once per mini-batch; an
    asynchronous schedule writes them after one micro-batch (``1STEP3``).
    ``1OF3`` moves what stage 1 saved for micro-batch 3's backward to host
    memory, ``1RL3`` brings it back before that backward.
    """

    stage: int
    kind: Kind
    mb: int | None = None
    peer: int | None = None

    def __post_init__(self) -> None:
        if self.mb is None and not self.kind.optional_mb:
            raise ValueError(f"{self.kind.name} needs a micro-batch")
        if (self.peer is None) == self.kind.is_transfer:
            raise ValueError(
                f"{self.kind.name} {'needs the stage at the other end' if self.kind.is_transfer else 'has no peer'}"
            )

    @property
    def link(self) -> Link:
        """The link a transfer uses: its edge in forward order, and which way the data goes."""
        assert self.peer is not None, f"{self} is not a transfer"
        s, peer = self.stage, self.peer
        return {
            Kind.SEND_F: ("act", s, peer),
            Kind.RECV_F: ("act", peer, s),
            Kind.SEND_B: ("grad", peer, s),
            Kind.RECV_B: ("grad", s, peer),
        }[self.kind]

    def __str__(self) -> str:
        mb = "" if self.mb is None else str(self.mb)
        peer = "" if self.peer is None else (">" if self.kind.is_send else "<") + str(self.peer)
        return f"{self.stage}{self.kind.value}{mb}{peer}"

    def __repr__(self) -> str:
        return f"Action({self})"


_ACTION = re.compile(r"^(\d+)(STEP|RD|SF|RF|SB|RB|OF|RL|F|B|W)(\d*)(?:([<>])(\d+))?$")


def parse_action(text: str) -> Action:
    """Parse the string form written by `str(action)`, e.g. ``"1F3"`` or ``"1SF3>2"``."""
    match = _ACTION.match(text.strip())
    if match is None:
        raise ValueError(f"not an action: {text!r} (expected e.g. '1F3', '1SF3>2', '2RB0<3', '1STEP')")
    stage, kind_text, mb, arrow, peer = match.groups()
    kind = Kind(kind_text)
    if kind.is_transfer and arrow != (">" if kind.is_send else "<"):
        raise ValueError(f"not an action: {text!r} (a send names its peer with '>', a receive with '<')")
    try:
        return Action(int(stage), kind, int(mb) if mb else None, int(peer) if peer else None)
    except ValueError as error:
        raise ValueError(f"not an action: {text!r} ({error})") from None


def parse_actions(text: str) -> list[Action]:
    """Parse a whitespace-separated list of actions, e.g. ``"0F0 0SF0>1 0RB0<1 0B0"``."""
    return [parse_action(word) for word in text.split()]


@dataclass
class Program:
    """A schedule: one list of actions per rank, where each stage lives, and the stage graph.

    `placement[s]` is the ranks that hold stage `s`: one rank, or several
    replicas (PipeDream's 1F1B-RR), which take its micro-batches round-robin
    (micro-batch k runs on `placement[s][k % replicas]`) and keep identical
    weights: each step's REDUCE sums their gradients. A placement may be
    given as one rank per stage. `graph` says which stage's
    outputs go to which stage and which parameters several stages share; a
    chain (stage s feeds s + 1) unless given. A program fresh from a generator
    holds only compute and STEP actions; `lower` adds the transfers and
    reductions. A `forward_only` program (evaluation, inference) has no
    backward and no step.

    An asynchronous program (PipeDream) steps after single micro-batches, so
    weights change while other micro-batches are in flight: `weight_versions`
    says which version of its stage's weights each forward uses (version v:
    after v steps of that stage), and that micro-batch's backward must use it
    too. `microbatches_per_step` is how many micro-batches' gradients one step
    applies (None: all of them, once, in a synchronous program).
    """

    placement: tuple[tuple[int, ...], ...]
    num_microbatches: int
    actions: dict[int, list[Action]] = field(default_factory=dict)
    name: str = ""
    graph: StageGraph = None  # type: ignore[assignment]  # filled with a chain in __post_init__
    forward_only: bool = False
    weight_versions: dict[tuple[int, int], int] | None = None
    microbatches_per_step: int | None = None

    def __post_init__(self) -> None:
        self.placement = tuple((ranks,) if isinstance(ranks, int) else tuple(ranks) for ranks in self.placement)
        for stage, ranks in enumerate(self.placement):
            if not ranks or len(set(ranks)) != len(ranks):
                raise ValueError(f"stage {stage} needs one or more distinct ranks; got {ranks}")
        if self.graph is None:
            self.graph = StageGraph.chain(len(self.placement))
        if self.graph.num_stages != len(self.placement):
            raise ValueError(
                f"the stage graph has {self.graph.num_stages} stages but the placement places {len(self.placement)}"
            )

    @property
    def num_stages(self) -> int:
        return len(self.placement)

    @property
    def asynchronous(self) -> bool:
        """Whether weights change between a micro-batch's forward and its backward (see `weight_versions`)."""
        return self.weight_versions is not None

    @property
    def num_ranks(self) -> int:
        return max(max(ranks) for ranks in self.placement) + 1

    @property
    def replicated(self) -> bool:
        """Whether some stage is held by several ranks."""
        return any(len(ranks) > 1 for ranks in self.placement)

    def stages_of(self, rank: int) -> list[int]:
        return [s for s, ranks in enumerate(self.placement) if rank in ranks]

    def replicas_of(self, stage: int) -> tuple[int, ...]:
        """The ranks that hold `stage` (one, unless it is replicated)."""
        return self.placement[stage]

    def rank_of(self, stage: int, mb: int | None = None) -> int:
        """The rank that runs micro-batch `mb` of `stage` (any micro-batch, if the stage has one rank)."""
        ranks = self.placement[stage]
        if len(ranks) == 1:
            return ranks[0]
        if mb is None:
            raise ValueError(f"stage {stage} is replicated on ranks {list(ranks)}: its rank depends on the micro-batch")
        return ranks[mb % len(ranks)]

    def shares_gradients(self, stage: int) -> bool:
        """Whether `stage`'s gradients are summed with others before its step: it is tied, or replicated."""
        return bool(self.graph.ties_of(stage)) or len(self.placement[stage]) > 1

    def same_rank(self, a: int, b: int, mb: int | None = None) -> bool:
        """Whether stages `a` and `b` run micro-batch `mb` on one rank."""
        return self.rank_of(a, mb) == self.rank_of(b, mb)

    def channel(self, link: Link, mb: int) -> Channel:
        """The channel micro-batch `mb` travels on over `link`: the link itself between unreplicated stages;
        with a replicated end, one channel per pair of ranks, (kind, src, dst, sender, receiver)."""
        kind, src, dst = link
        if len(self.placement[src]) == len(self.placement[dst]) == 1:
            return link
        a, b = self.rank_of(src, mb), self.rank_of(dst, mb)
        return (kind, src, dst, a, b) if kind == "act" else (kind, src, dst, b, a)

    def derive(self, actions: dict[int, list[Action]], name: str | None = None) -> Program:
        """This program's placement, graph and sizes with other actions (what each lowering pass returns)."""
        return Program(
            self.placement,
            self.num_microbatches,
            actions,
            self.name if name is None else name,
            self.graph,
            self.forward_only,
            self.weight_versions,
            self.microbatches_per_step,
        )

    @classmethod
    def from_strings(
        cls,
        rows: Mapping[int, str] | Sequence[str],
        placement: Iterable[int],
        num_microbatches: int,
        name: str = "",
        graph: StageGraph | None = None,
    ) -> Program:
        """Build a program from one action string per rank (handy in tests)."""
        items = rows.items() if isinstance(rows, Mapping) else enumerate(rows)
        actions = {rank: parse_actions(row) for rank, row in items}
        return cls(tuple(placement), num_microbatches, actions, name, graph)  # type: ignore[arg-type]

    def channels(self) -> dict[Channel, tuple[int, int]]:
        """Every channel between stages on different ranks (see `channel`), with its (sender, receiver) ranks.

        Replicated ends pair up with a period of their replica counts' product, whatever the micro-batches.
        """
        found: dict[Channel, tuple[int, int]] = {}
        for edge in self.graph.edges:
            period = len(self.placement[edge.src]) * len(self.placement[edge.dst])
            for mb in range(period):
                a, b = self.rank_of(edge.src, mb), self.rank_of(edge.dst, mb)
                if a != b:
                    found[self.channel(("act", edge.src, edge.dst), mb)] = (a, b)
                    if edge.grad and not self.forward_only:
                        found[self.channel(("grad", edge.src, edge.dst), mb)] = (b, a)
        return found

    def to_strings(self) -> list[str]:
        return [" ".join(str(a) for a in self.actions.get(rank, [])) for rank in range(self.num_ranks)]

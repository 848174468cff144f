"""The simulator: run a schedule's action lists against a cost model, before spending a GPU-hour.

Pure Python, no torch: it reads the same lowered program the executor runs,
on the validator's clock (a send keeps its rank busy for `send`, posting a
receive for `recv`, or `late_recv` if its message arrived first, a received
tensor arrives `latency` after its send ends, and a compute starts when its
rank is free and its inputs have arrived). An offload's or reload's copy runs on
the rank's copy stream for `StageCosts.offload`, or, without one
(`CostModel.copy_stream=False`: the CPU), keeps the rank itself busy as long.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

from ..schedules import Action, Kind, Program, Timing, split_backwards, validate, versions_held

__all__ = [
    "CostModel",
    "Simulation",
    "StageCosts",
    "load_costs",
    "parse_costs",
    "repeat_steps",
    "save_costs",
    "simulate",
]


@dataclass(frozen=True)
class StageCosts:
    """How long one micro-batch's work takes on a stage, and what it keeps for backward."""

    forward: float = 1.0
    backward: float = 1.0
    """B: the backward for the stage's input, when W is split off."""
    weight: float = 1.0
    """W: the backward for the stage's weights, after its B."""
    activation_bytes: float | None = None
    """Bytes one in-flight micro-batch keeps alive on this stage, if known."""
    whole: float | None = None
    """A backward run whole (a B with no W of its own). None: backward + weight; a split
    costs more than that on real hardware, so profiles measure it."""
    reduce: float = 0.0
    """A REDUCE: the time the rank spends offering its tied gradients (their arrival adds the latency)."""
    weight_bytes: float | None = None
    """Bytes of one version of the stage's weights, if known (weight stashing holds several)."""
    step: float = 0.0
    """A STEP: the optimizer step of the stage's weights (and zeroing their gradients)."""
    offload: float = 0.0
    """Copying one micro-batch's offloaded activations to host memory, or back (each way)."""
    offload_bytes: float | None = None
    """Of `activation_bytes`, those an offload moves (what autograd saved, not the stage's inputs and outputs,
    which the stage keeps for its backward); None: all of them."""

    @property
    def whole_backward(self) -> float:
        return self.backward + self.weight if self.whole is None else self.whole


@dataclass(frozen=True)
class CostModel:
    """Per-stage costs (one entry, or one per stage) and what a message between ranks costs."""

    stages: tuple[StageCosts, ...] = (StageCosts(),)
    latency: float = 0.0
    """From the end of a send to the tensor's arrival on the other rank."""
    send: float = 0.0
    """The time a SEND keeps its rank busy (the executor's own work, and the transport's, to start it)."""
    recv: float = 0.0
    """The time posting a receive (RF, RB) keeps its rank busy."""
    late_recv: float | None = None
    """The time posting a receive keeps its rank busy when its message arrived first (gloo: the receiver then
    tells the sender to start, a system call under contention); None: `recv`, as any post."""
    copy_stream: bool = True
    """Whether host copies (offload, reload) run beside the computes on a copy stream of their own (CUDA), or
    keep the rank busy (the CPU, where the copy is the rank's own memcpy)."""

    def of(self, stage: int) -> StageCosts:
        if len(self.stages) == 1:
            return self.stages[0]
        return self.stages[stage]

    def check(self, num_stages: int) -> None:
        if len(self.stages) not in (1, num_stages):
            raise ValueError(f"costs are given for {len(self.stages)} stages; the schedule has {num_stages}")


@dataclass
class Simulation:
    """What `simulate` predicts for one step."""

    schedule: str
    ranks: int
    microbatches: int
    step_time: float
    """The synchronous step: from the first action's start to the last action's end over all ranks. What one
    step costs when something global ends it (a barrier, a global gradient norm, a loss reported to all ranks),
    and what a benchmark that times steps between barriers measures."""
    bubble_fraction: float
    """Mean idle share of the synchronous step over ranks: (step_time - busy) / step_time."""
    peak_activations: list[int]
    """Per rank: the most micro-batches whose forward ran and whose backward (W, if split) had not, on the
    device: an offloaded one leaves when its offload's copy ends and is back when its reload starts."""
    peak_activation_bytes: list[float] | None
    timing: Timing = field(repr=False)
    weight_versions: list[int] = field(default_factory=list)
    """Per stage: the most weight versions held at once (1 unless the program is asynchronous)."""
    staleness: list[int] = field(default_factory=list)
    """Per stage: the most updates between the weights a gradient was computed with and those it updates."""
    throughput: float = 0.0
    """Micro-batches per unit of time over the whole program (the synchronous step, or a whole stream)."""
    peak_weight_bytes: list[float] | None = None
    """Per stage, when the costs know a version's bytes: the weight versions held at most, in bytes."""
    rank_span: float = 0.0
    """The largest span of one rank, from its own first compute's start to its own last compute's end (what
    `step_time` was before it counted the ranks' offsets; no run lasts this long, not even in the steady state)."""
    busy: list[float] = field(default_factory=list)
    """Per rank: the time it is busy in one step: computing, reducing, stepping, sending and posting receives."""
    program: Program | None = field(default=None, repr=False)
    costs: CostModel = field(default_factory=CostModel, repr=False)

    @cached_property
    def period(self) -> float:
        """The steady state: time per step when steps run back to back with nothing global between them, so a
        rank starts its next step as soon as its own work and inputs allow. Simulated (on first use) as the
        growth of a run of `PERIOD_STEPS` steps over its first half. 0 for an asynchronous program, a stream
        already: its `throughput` is its steady state."""
        if self.program is None or self.program.asynchronous:
            return 0.0
        return _period(self.program, self.costs)

    @property
    def peak_full_stages(self) -> float:
        """The busiest rank's peak activations in micro-batches of a full-size stage, a 1/P share of the model
        (1F1B's stage on P ranks): `peak_activations` times P / stages. With v stages per rank each stage
        holds 1/v of a rank's share, so a micro-batch's activations there are 1/v as large (equal layers)."""
        if self.program is None or not self.peak_activations:
            return float(max(self.peak_activations, default=0))
        return max(self.peak_activations) * self.program.num_ranks / self.program.num_stages

    @property
    def period_bubble_fraction(self) -> float:
        """Mean idle share of `period` over ranks: (period - busy) / period; the zero-bubble papers' bubble."""
        return _bubble(self.period, self.busy)

    def to_json(self) -> dict[str, object]:
        return {
            "schedule": self.schedule,
            "ranks": self.ranks,
            "microbatches": self.microbatches,
            "step_time": self.step_time,
            "bubble_fraction": self.bubble_fraction,
            "peak_activations": self.peak_activations,
            "peak_full_stages": self.peak_full_stages,
            "peak_activation_bytes": self.peak_activation_bytes,
            "weight_versions": self.weight_versions,
            "staleness": self.staleness,
            "throughput": self.throughput,
            "peak_weight_bytes": self.peak_weight_bytes,
            "rank_span": self.rank_span,
            "period": self.period,
            "period_bubble_fraction": self.period_bubble_fraction,
        }


PERIOD_STEPS = 4
"""Steps simulated back to back to find the steady-state period: the period is the last half's time per step."""


def simulate(program: Program, costs: CostModel = CostModel()) -> Simulation:
    """Predict step time, bubble and peak memory of a lowered `program` under `costs`.

    Raises ScheduleError (DeadlockError for a hang) when the program cannot run.
    """
    costs.check(program.num_stages)
    split = split_backwards(program)
    cost = _action_cost(costs, split)
    timing = validate(program, cost, costs.latency, costs.late_recv, _copy_time(costs))
    spans = {}  # per rank, from its first compute's start to its last compute's end
    for rank, actions in program.actions.items():
        times = [
            (b, e) for a, b, e in zip(actions, timing.start[rank], timing.end[rank], strict=True) if a.kind.is_compute
        ]
        if times:
            spans[rank] = (min(b for b, _ in times), max(e for _, e in times))
    rank_span = max((end - start for start, end in spans.values()), default=0.0)
    step_time = timing.span
    busy = [
        sum(e - b for b, e in zip(timing.start.get(r, []), timing.end.get(r, []), strict=True))
        for r in range(program.num_ranks)
    ]
    peaks, peak_bytes = _peak_memory(program, costs, split, timing)
    versions = versions_held(program)
    held = [versions[s] for s in range(program.num_stages)]
    known = all(costs.of(s).weight_bytes is not None for s in range(program.num_stages))
    weight_bytes = [held[s] * float(costs.of(s).weight_bytes or 0.0) for s in range(program.num_stages)]
    return Simulation(
        program.name,
        program.num_stages,
        program.num_microbatches,
        step_time,
        _bubble(step_time, busy),
        peaks,
        peak_bytes,
        timing,
        held,
        _staleness(program),
        program.num_microbatches / step_time if step_time > 0 else 0.0,
        weight_bytes if known else None,
        rank_span,
        busy,
        program,
        costs,
    )


def _action_cost(costs: CostModel, split: set[tuple[int, int | None]]) -> Callable[[Action], float]:
    def cost(action: Action) -> float:
        c = costs.of(action.stage)
        if action.kind is Kind.FORWARD:
            return c.forward
        if action.kind is Kind.BACKWARD:
            return c.backward if (action.stage, action.mb) in split else c.whole_backward
        if action.kind is Kind.WEIGHT:
            return c.weight
        if action.kind is Kind.REDUCE:
            return c.reduce
        if action.kind is Kind.STEP:
            return c.step
        if action.kind.is_host_copy:
            return 0.0 if costs.copy_stream else c.offload
        return costs.send if action.kind.is_send else costs.recv

    return cost


def _copy_time(costs: CostModel) -> Callable[[Action], float]:
    """How long an offload's or reload's copy keeps its rank's copy stream busy (nothing without one)."""
    return lambda action: costs.of(action.stage).offload if costs.copy_stream else 0.0


def _bubble(span: float, busy: list[float]) -> float:
    """Mean idle share of `span` over the ranks busy for `busy` each."""
    return sum(span - b for b in busy) / (len(busy) * span) if span > 0 and busy else 0.0


def _period(program: Program, costs: CostModel) -> float:
    """Time per step of back-to-back steps (see `Simulation.period`)."""
    half = PERIOD_STEPS // 2
    spans = []
    for steps in (half, PERIOD_STEPS):
        repeated = repeat_steps(program, steps)
        repeated_cost = _action_cost(costs, split_backwards(repeated))
        timing = validate(repeated, repeated_cost, costs.latency, costs.late_recv, _copy_time(costs))
        spans.append(timing.span)
    return (spans[1] - spans[0]) / (PERIOD_STEPS - half)


def repeat_steps(program: Program, steps: int) -> Program:
    """A synchronous `program` run `steps` times on every rank back to back, as one program.

    Step k's micro-batch j becomes micro-batch k m + j; a mini-batch's STEP and REDUCE (no micro-batch) are
    keyed by the step's last micro-batch, so the validator sees `steps` distinct steps.
    """
    if program.asynchronous:
        raise ValueError(f"{program.name or 'the program'} is asynchronous: it is a stream already")
    m = program.num_microbatches

    def shifted(action: Action, k: int) -> Action:
        mb = k * m + (m - 1 if action.mb is None else action.mb)
        return replace(action, mb=mb)

    actions = {rank: [shifted(a, k) for k in range(steps) for a in row] for rank, row in program.actions.items()}
    return Program(program.placement, m * steps, actions, program.name, program.graph, program.forward_only)


def _staleness(program: Program) -> list[int]:
    """Per stage, the most steps between the version a gradient was computed on and the one it updates."""
    versions = program.weight_versions or {}
    most = [0] * program.num_stages
    for actions in program.actions.values():
        steps: dict[int, int] = {}
        applied: dict[int, list[int]] = {}  # stage -> versions of the backwards since its last step
        for action in actions:
            s = action.stage
            if action.kind is Kind.BACKWARD and action.mb is not None:
                applied.setdefault(s, []).append(versions.get((s, action.mb), steps.get(s, 0)))
            elif action.kind is Kind.STEP:
                live = steps.get(s, 0)
                most[s] = max([most[s], *(live - v for v in applied.pop(s, []))])
                steps[s] = live + 1
    return most


def _peak_memory(
    program: Program, costs: CostModel, split: set[tuple[int, int | None]], timing: Timing
) -> tuple[list[int], list[float] | None]:
    """Per rank, the most micro-batches (and bytes) held on the device at once, on the clock of `timing`.

    A forward's activations count from its end to the end of its backward (W, if split); an offload's from
    the end of its copy to the start of its reload, when (its `offload_bytes` of) them are in host memory.
    Events at one time count in program order, the ends of copies still running after their action last.
    """
    known_bytes = all(costs.of(s).activation_bytes is not None for s in range(program.num_stages))
    peaks: list[int] = []
    peak_bytes: list[float] = []
    for rank in range(program.num_ranks):
        actions = program.actions.get(rank, [])
        events: list[tuple[float, int, int, float]] = []  # (time, order, micro-batches, bytes)
        for index, action in enumerate(actions):
            c = costs.of(action.stage)
            whole = float(c.activation_bytes or 0.0)
            moved = whole if c.offload_bytes is None else min(whole, float(c.offload_bytes))
            releases = Kind.WEIGHT if (action.stage, action.mb) in split else Kind.BACKWARD
            if action.kind is Kind.FORWARD:
                events.append((timing.end[rank][index], index, 1, whole))
            elif action.kind is releases:
                events.append((timing.end[rank][index], index, -1, -whole))
            elif action.kind is Kind.OFFLOAD:
                # A copy done when its action ends (the rank copied) frees in program order; one that ends on the
                # copy stream meanwhile frees after whatever else happens at that moment.
                done = timing.copies[rank][index][1]
                late = done > timing.end[rank][index]
                events.append((done, len(actions) + index if late else index, -1, -moved))
            elif action.kind is Kind.RELOAD:
                events.append((timing.start[rank][index], index, 1, moved))
        held, held_bytes, most, most_bytes = 0, 0.0, 0, 0.0
        for _, _, count, size in sorted(events):
            held, held_bytes = held + count, held_bytes + size
            most, most_bytes = max(most, held), max(most_bytes, held_bytes)
        peaks.append(most)
        peak_bytes.append(most_bytes)
    return peaks, peak_bytes if known_bytes else None


def parse_costs(text: str, latency: float | None = None) -> CostModel:
    """Parse ``f=1,b=2,w=1,comm=0.1`` (one set for all stages) or ``f=1,b=2;f=2,b=3`` (one per stage).

    Keys: f, b, w, whole (a backward run whole; default b + w), reduce (offering tied gradients), bytes (held per
    micro-batch), weights (bytes of one version of the stage's weights), offload (copying a micro-batch's
    offloaded activations to host memory or back), offloaded (the bytes an offload moves; default all); and for
    every stage at once comm (latency), send and recv (the time a send, or a receive's post, keeps its rank
    busy), late (a post after its message arrived) and copystream (0: host copies keep the rank busy, as on a
    CPU; 1, the default: they run beside the computes).
    """
    names = {
        "f": "forward",
        "b": "backward",
        "w": "weight",
        "whole": "whole",
        "bytes": "activation_bytes",
        "reduce": "reduce",
        "weights": "weight_bytes",
        "offload": "offload",
        "offloaded": "offload_bytes",
    }
    messages = {"comm": "latency", "send": "send", "recv": "recv", "late": "late_recv"}
    stages: list[StageCosts] = []
    transfers: dict[str, float] = {}
    copy_stream = True
    for part in text.split(";"):
        values: dict[str, float] = {}
        for item in filter(None, (p.strip() for p in part.split(","))):
            key, _, value = item.partition("=")
            if key in messages:
                transfers[messages[key]] = float(value)
            elif key == "copystream":
                copy_stream = float(value) != 0
            elif key in names:
                values[names[key]] = float(value)
            else:
                raise ValueError(
                    f"unknown cost {key!r} in {text!r}; use f, b, w, whole, reduce, bytes, weights, offload,"
                    " offloaded, comm, send, recv, late and copystream"
                )
        stages.append(StageCosts(**values))  # type: ignore[arg-type]
    if latency is not None:
        transfers["latency"] = latency
    return CostModel(tuple(stages), **transfers, copy_stream=copy_stream)


def load_costs(spec: str) -> CostModel:
    """A cost model from a profile JSON file (see `save_costs`) or from the text form of `parse_costs`."""
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        data = json.loads(path.read_text())
        stages = tuple(StageCosts(**stage) for stage in data["stages"])
        transfers = {key: float(data.get(key, 0.0)) for key in ("latency", "send", "recv")}
        late = data.get("late_recv")
        copy_stream = bool(data.get("copy_stream", True))
        return CostModel(stages, **transfers, late_recv=None if late is None else float(late), copy_stream=copy_stream)
    return parse_costs(spec)


def save_costs(costs: CostModel, path: str | Path) -> None:
    data = {
        "stages": [asdict(stage) for stage in costs.stages],
        "latency": costs.latency,
        "send": costs.send,
        "recv": costs.recv,
        "late_recv": costs.late_recv,
        "copy_stream": costs.copy_stream,
    }
    Path(path).write_text(json.dumps(data, indent=2) + "\n")

"""What a split costs: per-layer profiles summed into per-stage costs, and the memory each rank holds.

A split is `layers_per_stage`, the blocks each stage owns (as `manual_split` takes it); the profile's end
layers, if any, join the first and the last stage.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ..observe.host_copy import HostCopy
from ..observe.profile import OPTIMIZER_STATES, LayerCosts, LayerProfile
from ..observe.simulate import CostModel, StageCosts
from ..observe.transfers import with_transfers
from ..schedules import Kind, Program, recomputed_stages, split_backwards

__all__ = ["OFFLOAD_SETTINGS", "MemoryModel", "offload_for", "stage_costs", "stage_layers", "static_bytes"]

OFFLOAD_SETTINGS = ("none", "all")
"""What the planner tries: no offload, or every stage that does not recompute."""


def offload_for(setting: str, recompute: str, num_stages: int) -> str:
    """The `PipelineSpec(offload=...)` of the planner's `setting` under `recompute`: none, or every stage that
    does not recompute (a recomputed stage keeps only its inputs: nothing to offload)."""
    if setting not in OFFLOAD_SETTINGS:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_SETTINGS)}; got {setting!r}")
    kept = [s for s, again in enumerate(recomputed_stages(recompute, num_stages)) if not again]
    return ",".join(map(str, kept)) if setting == "all" and kept else "none"


def stage_layers(profile: LayerProfile, layers_per_stage: Sequence[int]) -> list[list[int]]:
    """For each stage, the indices of the profile's layers it owns."""
    blocks = len(profile.layers) - profile.first - profile.last
    if sum(layers_per_stage) != blocks or any(n < 0 for n in layers_per_stage):
        raise ValueError(f"layers_per_stage {list(layers_per_stage)} must be non-negative and add up to {blocks}")
    owned, at = [], int(profile.first)
    for count in layers_per_stage:
        owned.append(list(range(at, at + count)))
        at += count
    if profile.first:
        owned[0].insert(0, 0)
    if profile.last:
        owned[-1].append(len(profile.layers) - 1)
    for stage, layers in enumerate(owned):
        if not layers:
            raise ValueError(f"stage {stage} would own no layer (layers_per_stage {list(layers_per_stage)})")
    return owned


def stage_costs(
    profile: LayerProfile,
    layers_per_stage: Sequence[int],
    recompute: str = "none",
    offload: Collection[int] = (),
    host_copy: HostCopy | None = None,
) -> CostModel:
    """The simulator's costs of a split: each stage the sum of its layers.

    The first stage has no input gradient, so all of its backward is W (a whole backward), as the runtime
    runs it. A recomputing stage pays its forward once more, in its first backward action, and keeps only its
    input, its output and what its loss saved. A stage in `offload` moves what its layers saved, less its own
    input, to host memory and back, each way taking `host_copy`'s time for those bytes (none if not measured).
    Every time is the profile's scaled by its `slowdown`, if measured: how much slower the layers compute in
    a pipeline's rank than in the profile.
    """
    slower = profile.slowdown or 1.0
    owned = stage_layers(profile, layers_per_stage)
    again = recomputed_stages(recompute, len(owned))
    stages = []
    for s, layers in enumerate(owned):
        parts = [profile.layers[i] for i in layers]
        forward = sum(p.forward for p in parts)
        whole = sum(p.whole for p in parts)
        backward, weight = (0.0, whole) if s == 0 else (sum(p.backward for p in parts), sum(p.weight for p in parts))
        if again[s]:
            whole += forward
            if s == 0:
                weight += forward
            else:
                backward += forward
        moved = _offloadable(profile, layers, s == 0) if s in offload else 0.0
        stages.append(
            StageCosts(
                forward=slower * forward,
                backward=slower * backward,
                weight=slower * weight,
                activation_bytes=_held(profile, layers, s == 0, s == len(owned) - 1, again[s]),
                whole=slower * whole,
                weight_bytes=sum(p.parameter_bytes for p in parts),
                step=slower * sum(p.step for p in parts),
                offload=host_copy.seconds(moved) if host_copy is not None else 0.0,
                offload_bytes=moved,
            )
        )
    copy_stream = host_copy is not None and host_copy.copy_stream
    return with_transfers(CostModel(tuple(stages), copy_stream=copy_stream), profile.transfers)


def _held(profile: LayerProfile, layers: list[int], first: bool, last: bool, recompute: bool) -> float:
    """Bytes one micro-batch keeps on a stage from its forward to its backward."""
    parts: list[LayerCosts] = [profile.layers[i] for i in layers]
    output = 0.0 if last else parts[-1].output_bytes
    if not recompute:
        return sum(p.activation_bytes for p in parts) + output
    stage_input = 0.0 if first else profile.layers[layers[0] - 1].output_bytes
    return stage_input + output + sum(p.recompute_bytes for p in parts)


def _offloadable(profile: LayerProfile, layers: list[int], first: bool) -> float:
    """Bytes of one micro-batch an offload moves off a stage: what its layers saved, but the stage's own input
    (and output), which the stage keeps for its backward."""
    saved = sum(profile.layers[i].activation_bytes for i in layers)
    stage_input = 0.0 if first else profile.layers[layers[0] - 1].output_bytes
    return max(0.0, saved - stage_input)


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes per rank of a program, for any split: weights, gradients and optimizer state of the rank's
    stages, plus the most activations its micro-batches hold at once.

    The activations a rank holds at each point of its program are counts per stage that depend on the
    schedule alone: micro-batches held, and of those how many are offloaded. `held` keeps the distinct count
    vectors of each rank, so a split's peak is a few dot products, no simulation. An offload counts as done
    when its action is (so on a GPU, where its copy runs on beside the computes, this is a lower bound; the
    simulator follows the copies).
    """

    program: Program
    held: dict[int, list[dict[int, tuple[int, int]]]]
    """Per rank, the distinct {stage: (micro-batches held, of which offloaded)} right after a forward or reload."""

    @classmethod
    def of(cls, program: Program) -> MemoryModel:
        split = split_backwards(program)
        held: dict[int, list[dict[int, tuple[int, int]]]] = {}
        for rank in range(program.num_ranks):
            now: dict[int, tuple[int, int]] = {}
            seen: list[dict[int, tuple[int, int]]] = []
            for action in program.actions.get(rank, []):
                releases = Kind.WEIGHT if (action.stage, action.mb) in split else Kind.BACKWARD
                count, away = now.get(action.stage, (0, 0))
                change = {
                    Kind.FORWARD: (1, 0),
                    releases: (-1, 0),
                    Kind.OFFLOAD: (0, 1),
                    Kind.RELOAD: (0, -1),
                }.get(action.kind)
                if change is None:
                    continue
                now[action.stage] = (count + change[0], away + change[1])
                # The peak falls right after a forward or a reload.
                if action.kind in (Kind.FORWARD, Kind.RELOAD) and now not in seen:
                    seen.append(dict(now))
            held[rank] = seen or [{}]
        return cls(program, held)

    def peak(self, costs: CostModel, static: Sequence[float]) -> list[float]:
        """Per rank: `static[s]` for each of its stages plus its peak activation bytes under `costs`."""
        peaks = []
        for rank in range(self.program.num_ranks):
            fixed = sum(static[s] for s in self.program.stages_of(rank))
            activations = max(_bytes(costs, counts) for counts in self.held[rank])
            peaks.append(fixed + activations)
        return peaks


def _bytes(costs: CostModel, counts: dict[int, tuple[int, int]]) -> float:
    """Activation bytes of `counts` held on the device: the offloaded micro-batches without what they moved."""
    total = 0.0
    for s, (held, away) in counts.items():
        c = costs.of(s)
        whole = float(c.activation_bytes or 0.0)
        moved = whole if c.offload_bytes is None else min(whole, float(c.offload_bytes))
        total += held * whole - away * moved
    return total


def static_bytes(profile: LayerProfile, layers_per_stage: Sequence[int]) -> list[float]:
    """Per stage: its parameters, their gradients and the optimizer's state (fp32 state as the parameters)."""
    states = OPTIMIZER_STATES[profile.optimizer]
    return [
        (2 + states) * sum(profile.layers[i].parameter_bytes for i in layers)
        for layers in stage_layers(profile, layers_per_stage)
    ]

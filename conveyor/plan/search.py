"""The whole configuration: over schedules, stages per rank, micro-batch counts and recompute settings, the
plans that train fastest within memory, ranked by predicted step time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..observe.profile import LayerProfile
from ..observe.simulate import simulate
from ..schedules import RECOMPUTE, SCHEDULES, PipelineSpec, build_schedule
from .cost import stage_layers
from .partition import EXACT_LIMIT, PlanError, partition
from .plan_file import Plan, StageSummary

__all__ = ["Refused", "make_plan", "search"]


def make_plan(
    profile: LayerProfile,
    spec: PipelineSpec,
    *,
    method: str = "auto",
    memory_cap: float | None = None,
    exact_limit: int = EXACT_LIMIT,
) -> Plan:
    """Partition `profile` for `spec`'s pipeline (see `partition`) and record the result as a Plan."""
    spec = spec.with_virtual()
    chosen = partition(profile, spec, method=method, memory_cap=memory_cap, exact_limit=exact_limit)
    result = simulate(build_schedule(spec), chosen.costs)
    stages = []
    for s, layers in enumerate(stage_layers(profile, chosen.layers_per_stage)):
        c = chosen.costs.of(s)
        stages.append(
            StageSummary(
                tuple(profile.layers[i].name for i in layers),
                sum(profile.layers[i].parameters for i in layers),
                c.forward,
                c.whole_backward,
                spec.microbatches * (c.forward + c.whole_backward) + c.step,
                0.0 if s == len(chosen.layers_per_stage) - 1 else profile.layers[layers[-1]].output_bytes,
            )
        )
    return Plan(
        profile.fingerprint,
        spec,
        profile.microbatch_size,
        method,
        chosen.layers_per_stage,
        result.step_time,
        result.period,
        result.bubble_fraction,
        chosen.peak_bytes,
        memory_cap,
        chosen.exact,
        tuple(stages),
        profile.split,
        profile.transfers,
    )


@dataclass(frozen=True)
class Refused:
    """A configuration the search could not use, and why."""

    schedule: str
    microbatches: int
    recompute: str
    why: str


def search(
    profile_for: Callable[[int], LayerProfile],
    ranks: int,
    microbatch_counts: Sequence[int],
    *,
    schedules: Sequence[str] | None = None,
    recomputes: Sequence[str] = RECOMPUTE,
    memory_cap: float | None = None,
    exact_limit: int = EXACT_LIMIT,
) -> tuple[list[Plan], list[Refused]]:
    """Every configuration that applies, each with its best split within `memory_cap`, fastest first (predicted
    synchronous step; ties: less peak memory, then the order tried), and those that could not run.

    `profile_for(m)` gives the profile at the micro-batch size `m` micro-batches make (called once per m).
    The synchronous schedules only: an asynchronous one's step is not a step of the same training.
    """
    names = [n for n, info in SCHEDULES.items() if not info.asynchronous] if schedules is None else list(schedules)
    plans: list[Plan] = []
    refused: list[Refused] = []
    for m in microbatch_counts:
        profile: LayerProfile | None = None
        for name in names:
            try:
                build_schedule(PipelineSpec(name, ranks, m))  # the schedule's own constraints on ranks and m
            except ValueError as error:
                refused.append(Refused(name, m, "-", str(error).splitlines()[0]))
                continue
            if profile is None:
                profile = profile_for(m)
            for recompute in recomputes:
                spec = PipelineSpec(name, ranks, m, recompute=recompute)
                try:
                    plans.append(make_plan(profile, spec, memory_cap=memory_cap, exact_limit=exact_limit))
                except PlanError as error:
                    refused.append(Refused(name, m, recompute, str(error).splitlines()[0]))
    order = {id(p): i for i, p in enumerate(plans)}
    plans.sort(key=lambda p: (p.step_time, max(p.peak_bytes), order[id(p)]))
    return plans, refused

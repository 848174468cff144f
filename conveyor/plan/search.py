"""Choosing a whole configuration: each schedule, micro-batch count, recompute and offload setting, with its
best split."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ..observe.host_copy import HostCopy
from ..observe.profile import LayerProfile
from ..observe.simulate import simulate
from ..schedules import RECOMPUTE, SCHEDULES, PipelineSpec, build_schedule, offloaded
from .cost import OFFLOAD_SETTINGS, offload_for, stage_layers
from .partition import EXACT_LIMIT, PlanError, partition
from .plan_file import Plan, StageSummary

__all__ = ["Refused", "make_plan", "search", "trade"]


def make_plan(
    profile: LayerProfile,
    spec: PipelineSpec,
    *,
    method: str = "auto",
    memory_cap: float | None = None,
    host_copy: HostCopy | None = None,
    exact_limit: int = EXACT_LIMIT,
) -> Plan:
    """Partition `profile` for `spec`'s pipeline (see `partition`) and record the result as a Plan. The stages
    `spec.offload` names move activations to host memory, each copy costing `host_copy`'s time.

    Raises PlanError when nothing fits, or when offloading would move nothing under this schedule (no
    micro-batch has enough computes between its forward and its backward)."""
    spec = spec.with_virtual()
    program = build_schedule(spec)
    if spec.offload != "none" and not offloaded(program):
        raise PlanError(
            f"offload moves nothing under {spec.schedule} on {spec.ranks} ranks with {spec.microbatches}"
            f" micro-batches and recompute {spec.recompute}: no micro-batch of stages {spec.offload} has 3 computes"
            " between its forward and its backward"
        )
    chosen = partition(
        profile, spec, method=method, memory_cap=memory_cap, host_copy=host_copy, exact_limit=exact_limit
    )
    result = simulate(program, chosen.costs)
    summaries = []
    for s, layers in enumerate(stage_layers(profile, chosen.layers_per_stage)):
        c = chosen.costs.of(s)
        summaries.append(
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
        tuple(summaries),
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
    offload: str = "-"


def search(
    profile_for: Callable[[int], LayerProfile],
    ranks: int,
    microbatch_counts: Sequence[int],
    *,
    schedules: Sequence[str] | None = None,
    recomputes: Sequence[str] = RECOMPUTE,
    offloads: Sequence[str] = OFFLOAD_SETTINGS,
    host_copy: HostCopy | None = None,
    memory_cap: float | None = None,
    exact_limit: int = EXACT_LIMIT,
) -> tuple[list[Plan], list[Refused]]:
    """Every configuration that applies, each with its best split within `memory_cap`, fastest first (predicted
    synchronous step; ties: less peak memory, then the order tried), and those that could not run.

    `profile_for(m)` gives the profile at the micro-batch size `m` micro-batches make (called once per m).
    The synchronous schedules only: an asynchronous one's step is not a step of the same training. Offload is
    tried beside each recompute setting (on the stages that do not recompute), its copies costing `host_copy`'s
    time (none if not measured).
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
                tried: set[str] = set()
                for setting in offloads:
                    spec = PipelineSpec(name, ranks, m, recompute=recompute)
                    spec = replace(spec, offload=offload_for(setting, recompute, spec.num_stages))
                    if spec.offload in tried:  # "all" offloads nothing when every stage recomputes
                        continue
                    tried.add(spec.offload)
                    try:
                        plan = make_plan(
                            profile, spec, memory_cap=memory_cap, host_copy=host_copy, exact_limit=exact_limit
                        )
                    except PlanError as error:
                        refused.append(Refused(name, m, recompute, str(error).splitlines()[0], setting))
                        continue
                    plans.append(plan)
    order = {id(p): i for i, p in enumerate(plans)}
    plans.sort(key=lambda p: (p.step_time, max(p.peak_bytes), order[id(p)]))
    return plans, refused


def trade(plan: Plan, fastest: Plan) -> str:
    """What `plan` gives up against `fastest` (the fastest plan regardless of memory) for its memory: step time,
    bubble and the busiest rank's bytes, in a sentence."""
    if plan is fastest or (plan.step_time, max(plan.peak_bytes)) == (fastest.step_time, max(fastest.peak_bytes)):
        return "the fastest configuration fits: nothing traded"
    slower = plan.step_time / fastest.step_time - 1
    saved = 1 - max(plan.peak_bytes) / max(fastest.peak_bytes)
    return (
        f"traded {slower:+.1%} step time ({fastest.step_time * 1e3:.1f} -> {plan.step_time * 1e3:.1f} ms) and"
        f" bubble {fastest.bubble:.3f} -> {plan.bubble:.3f} for {saved:.1%} less memory on the busiest rank"
        f" ({max(fastest.peak_bytes) / 2**20:.0f} -> {max(plan.peak_bytes) / 2**20:.0f} MiB), against the fastest"
        f" configuration: {_describe(fastest)}"
    )


def _describe(plan: Plan) -> str:
    spec = plan.spec
    return f"{spec.schedule}, {spec.microbatches} micro-batches, recompute {spec.recompute}, offload {spec.offload}"

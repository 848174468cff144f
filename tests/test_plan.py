"""The planner on made-up per-layer costs: its split is the brute-force optimum, within the memory cap, and the
same every time; stage costs add up layers as the runtime runs them; bad requests fail naming what would fit."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.observe.profile import OPTIMIZER_STATES, LayerCosts, LayerProfile, timed_rounds
from conveyor.observe.simulate import simulate
from conveyor.observe.transfers import TransferCosts
from conveyor.plan import MemoryModel, PlanError, count_splits, partition, splits, stage_costs
from conveyor.plan.cost import stage_layers
from conveyor.schedules import PipelineSpec, build_schedule

# (schedule, ranks, micro-batches, stages per rank): cheap to simulate, and every kind of placement
SETUPS = [
    PipelineSpec("1f1b", 2, 4, 1),
    PipelineSpec("1f1b", 3, 3, 1),
    PipelineSpec("gpipe", 2, 3, 1),
    PipelineSpec("zb-h1", 2, 4, 1),
    PipelineSpec("zbv", 2, 3, 2),
    PipelineSpec("interleaved-1f1b", 2, 2, 2),
    PipelineSpec("1f1b", 1, 2, 1),
]


def layer(name: str, f: float, b: float, w: float, whole: float, params: int, held: float, out: float) -> LayerCosts:
    return LayerCosts(
        name,
        f,
        b,
        w,
        whole,
        step=0.1 * params,
        parameters=params,
        parameter_bytes=4.0 * params,
        activation_bytes=held,
        output_bytes=out,
        recompute_bytes=0.0,
    )


@st.composite
def profiles(draw: st.DrawFn, most_blocks: int = 5) -> LayerProfile:
    first, last = draw(st.booleans()), draw(st.booleans())
    blocks = draw(st.integers(1, most_blocks))
    count = blocks + first + last
    small = st.integers(1, 9).map(float)  # integers: exact sums, so ties are ties
    layers = []
    for i in range(count):
        b = 0.0 if (i == 0 and first) else draw(small)
        w = draw(small)
        whole = draw(st.floats(0.6, 1.0).map(lambda x, b=b, w=w: round(x * (b + w), 1)))
        layers.append(layer(f"l{i}", draw(small), b, w, whole, draw(st.integers(0, 50)), draw(small), draw(small)))
    optimizer = draw(st.sampled_from(sorted(OPTIMIZER_STATES)))
    transfers = draw(st.sampled_from([None, TransferCosts(0.5, 0.2, 0.1)]))
    return LayerProfile("test", 1, optimizer, tuple(layers), transfers, first, last)


def peak_per_rank(profile: LayerProfile, program, split: tuple[int, ...], recompute: str = "none") -> list[float]:  # type: ignore[no-untyped-def]
    """Memory per rank from the simulator's own walk of the program, plus weights, gradients and state."""
    costs = stage_costs(profile, split, recompute)
    active = simulate(program, costs).peak_activation_bytes
    assert active is not None
    factor = 2 + OPTIMIZER_STATES[profile.optimizer]
    owned = stage_layers(profile, split)
    return [
        active[r] + factor * sum(profile.layers[i].parameter_bytes for s in program.stages_of(r) for i in owned[s])
        for r in range(program.num_ranks)
    ]


def brute_force(profile: LayerProfile, setup: PipelineSpec, cap: float | None) -> float | None:
    """The least simulated step time over every split within `cap` (None: nothing fits)."""
    program = build_schedule(setup)
    times = [
        simulate(program, stage_costs(profile, split)).step_time
        for split in splits(profile, program.num_stages)
        if cap is None or max(peak_per_rank(profile, program, split)) <= cap
    ]
    return min(times, default=None)


def fits(profile: LayerProfile, setup: PipelineSpec) -> bool:
    return count_splits(profile, build_schedule(setup).num_stages) > 0


@settings(max_examples=40)
@given(profiles(), st.sampled_from(SETUPS), st.floats(0.3, 1.2))
def test_auto_is_the_brute_force_optimum_within_the_cap(profile: LayerProfile, setup, share: float) -> None:  # type: ignore[no-untyped-def]
    if not fits(profile, setup):
        return
    program = build_schedule(setup)
    peaks = [max(peak_per_rank(profile, program, s)) for s in splits(profile, program.num_stages)]
    cap = min(peaks) + share * (max(peaks) - min(peaks))  # from the tightest cap that fits to none at all
    best = brute_force(profile, setup, cap)
    chosen = partition(profile, setup, method="auto", memory_cap=cap)
    assert best is not None
    assert chosen.exact
    assert chosen.step_time == pytest.approx(best, rel=1e-12)
    assert max(chosen.peak_bytes) <= cap
    assert list(chosen.peak_bytes) == pytest.approx(peak_per_rank(profile, program, chosen.layers_per_stage))
    again = partition(profile, setup, method="auto", memory_cap=cap)
    assert again == chosen  # deterministic


@settings(max_examples=30)
@given(profiles(), st.sampled_from(SETUPS))
def test_time_memory_and_params_are_the_brute_force_optima(profile: LayerProfile, setup) -> None:  # type: ignore[no-untyped-def]
    if not fits(profile, setup):
        return
    program = build_schedule(setup)
    every = list(splits(profile, program.num_stages))
    assert partition(profile, setup, method="time").step_time == pytest.approx(brute_force(profile, setup, None))
    least_memory = min(max(peak_per_rank(profile, program, s)) for s in every)
    assert max(partition(profile, setup, method="memory").peak_bytes) == pytest.approx(least_memory)
    stage_params = [[sum(profile.layers[i].parameters for i in ls) for ls in stage_layers(profile, s)] for s in every]
    chosen = partition(profile, setup, method="params").layers_per_stage
    chosen_params = [sum(profile.layers[i].parameters for i in ls) for ls in stage_layers(profile, chosen)]
    assert max(chosen_params) == min(max(p) for p in stage_params)


@settings(max_examples=30)
@given(profiles(), st.sampled_from(SETUPS))
def test_a_cap_nothing_fits_names_the_smallest_that_does(profile: LayerProfile, setup) -> None:  # type: ignore[no-untyped-def]
    if not fits(profile, setup):
        return
    program = build_schedule(setup)
    least = min(max(peak_per_rank(profile, program, s)) for s in splits(profile, program.num_stages))
    with pytest.raises(PlanError, match=f"the smallest peak is {least:,.0f} bytes"):
        partition(profile, setup, memory_cap=least * 0.999)
    assert max(partition(profile, setup, memory_cap=least).peak_bytes) <= least


@settings(max_examples=30)
@given(profiles(most_blocks=6), st.sampled_from(SETUPS[:4]), st.floats(0.0, 1.0))
def test_the_local_search_stays_within_the_cap_and_never_beats_the_optimum(
    profile: LayerProfile, setup, share: float
) -> None:  # type: ignore[no-untyped-def]
    if not fits(profile, setup):
        return
    program = build_schedule(setup)
    peaks = [max(peak_per_rank(profile, program, s)) for s in splits(profile, program.num_stages)]
    cap = min(peaks) + share * (max(peaks) - min(peaks))
    exact = partition(profile, setup, memory_cap=cap)
    try:
        local = partition(profile, setup, memory_cap=cap, exact_limit=0)
    except PlanError:
        return  # a local search may miss the few splits that fit; it says so
    assert not local.exact
    assert local.step_time >= exact.step_time - 1e-9
    assert max(local.peak_bytes) <= cap


def test_a_profile_keeps_its_transfers_and_one_from_before_them_loads_without(tmp_path) -> None:  # type: ignore[no-untyped-def]
    layers = (layer("a", 1, 0, 1, 2, 0, 10.0, 1), layer("b", 1, 1, 1, 2, 0, 3.0, 1))
    measured = LayerProfile("t", 1, "sgd", layers, TransferCosts(1e-4, 3e-4, 2e-4, 4096, late_recv=9e-4))
    measured.save(tmp_path / "p.json")
    assert LayerProfile.load(tmp_path / "p.json") == measured
    early_only = measured.to_json()
    del early_only["transfers"]["late_recv"]  # type: ignore[index]  # as written before late posts were measured
    (tmp_path / "early.json").write_text(json.dumps(early_only))
    assert LayerProfile.load(tmp_path / "early.json").transfers == TransferCosts(1e-4, 3e-4, 2e-4, 4096)
    older = {**measured.to_json(), "latency": 1e-4}  # a latency alone, as profiles were written before
    del older["transfers"]
    (tmp_path / "old.json").write_text(json.dumps(older))
    assert LayerProfile.load(tmp_path / "old.json") == dataclasses.replace(measured, transfers=None)


def test_a_profile_warms_up_then_times_until_it_has_its_repeats_and_its_seconds() -> None:
    assert list(timed_rounds(2, 3)) == [False, False, True, True, True]
    ends: list[float] = []  # when each timed round ended, from the first timed round's start
    start = None
    for is_timed in timed_rounds(1, 1, min_seconds=0.05):
        if is_timed and start is None:
            start = time.perf_counter()
        time.sleep(0.01)  # a round of about 10 ms (more on a busy machine): about 5 of them fill the 50 ms
        if is_timed:
            ends.append(time.perf_counter())
    assert start is not None and len(ends) >= 2
    # It stopped as soon as 50 ms had passed: after the round that crossed them, not before, not later.
    assert ends[-1] - start >= 0.05 and ends[-2] - start < 0.05, [end - start for end in ends]


def test_memory_model_counts_each_schedules_micro_batches_in_flight() -> None:
    program = build_schedule(PipelineSpec("1f1b", 2, 8))
    model = MemoryModel.of(program)
    profile = LayerProfile("t", 1, "sgd", (layer("a", 1, 0, 1, 2, 0, 10.0, 1), layer("b", 1, 1, 1, 2, 0, 3.0, 1)))
    costs = stage_costs(profile, (1, 1))
    # 1F1B on 2 ranks holds 2 micro-batches on rank 0 (10 + its 1-byte output each) and 1 on rank 1.
    assert model.peak(costs, [0.0, 0.0]) == [22.0, 3.0]
    gpipe = MemoryModel.of(build_schedule(PipelineSpec("gpipe", 2, 8)))
    assert gpipe.peak(costs, [5.0, 0.0]) == [5.0 + 8 * 11.0, 8 * 3.0]


def test_stage_costs_add_layers_up_as_the_runtime_runs_them() -> None:
    layers = (
        layer("emb", 1, 0, 2, 2, 10, 1, 4),
        layer("b0", 3, 4, 5, 8, 20, 6, 4),
        layer("b1", 3, 4, 5, 8, 20, 6, 4),
        layer("head", 7, 6, 5, 10, 30, 9, 0),
    )
    profile = LayerProfile("t", 1, "adam", layers, TransferCosts(0.25, 0.5, 0.125), first=True, last=True)
    costs = stage_costs(profile, (1, 1))
    first, last = costs.stages
    # The first stage has no input gradient: its backward is all W, a whole backward.
    assert (first.forward, first.backward, first.weight, first.whole) == (4, 0, 10, 10)
    assert (last.forward, last.backward, last.weight, last.whole) == (10, 10, 10, 18)
    assert first.activation_bytes == 1 + 6 + 4  # both layers' held bytes and the output it sends
    assert last.activation_bytes == 6 + 9
    assert first.step == pytest.approx(3.0)
    assert (costs.latency, costs.send, costs.recv) == (0.25, 0.5, 0.125)
    again = stage_costs(profile, (1, 1), "full").stages
    assert (again[0].weight, again[0].whole, again[1].backward, again[1].whole) == (14, 14, 20, 28)
    assert again[0].activation_bytes == 4  # a recomputing stage keeps its output (and input, past the first)
    assert again[1].activation_bytes == 4
    part = stage_costs(profile, (1, 1), "all-but-last-stage").stages
    assert part[0].whole == 14 and part[1].whole == 18


def test_more_stages_than_layers_is_refused() -> None:
    profile = LayerProfile("t", 1, "sgd", (layer("a", 1, 1, 1, 2, 1, 1, 1), layer("b", 1, 1, 1, 2, 1, 1, 1)))
    with pytest.raises(PlanError, match="4 stages need at least 4 layers to own; the model has 2"):
        partition(profile, PipelineSpec("1f1b", 4, 4))


def test_uniform_is_the_even_split_by_layer_count() -> None:
    layers = tuple(layer(f"l{i}", 1, 1, 1, 2, 1, 1, 1) for i in range(7))
    profile = LayerProfile("t", 1, "sgd", layers, first=True, last=True)
    assert partition(profile, PipelineSpec("1f1b", 2, 4), method="uniform").layers_per_stage == (3, 2)


def test_splits_are_every_composition_once() -> None:
    layers = tuple(layer(f"l{i}", 1, 1, 1, 2, 1, 1, 1) for i in range(5))
    ends = LayerProfile("t", 1, "sgd", layers, first=True, last=True)  # 3 blocks; the end stages may own none
    assert list(splits(ends, 2)) == [(0, 3), (1, 2), (2, 1), (3, 0)]
    assert count_splits(ends, 3) == len(list(splits(ends, 3))) == 6  # the middle stage owns one or more
    plain = LayerProfile("t", 1, "sgd", layers)  # every stage owns a block
    assert list(splits(plain, 4)) == [(1, 1, 1, 2), (1, 1, 2, 1), (1, 2, 1, 1), (2, 1, 1, 1)]


def test_stage_costs_scale_every_compute_by_the_profiles_slowdown_in_a_pipeline(tmp_path) -> None:  # type: ignore[no-untyped-def]
    layers = (layer("a", 1, 0, 1, 2, 3, 10.0, 1), layer("b", 1, 1, 1, 2, 5, 3.0, 1))
    plain = LayerProfile("t", 1, "sgd", layers)
    slower = dataclasses.replace(plain, slowdown=1.25)
    slower.save(tmp_path / "p.json")
    assert LayerProfile.load(tmp_path / "p.json") == slower
    for recompute in ("none", "full"):
        base, scaled = stage_costs(plain, (1, 1), recompute), stage_costs(slower, (1, 1), recompute)
        for s in (0, 1):
            for kind in ("forward", "backward", "weight", "whole", "step"):
                assert getattr(scaled.of(s), kind) == pytest.approx(1.25 * getattr(base.of(s), kind))
            assert scaled.of(s).activation_bytes == base.of(s).activation_bytes

"""The planner trading bubble for memory: V-Half and V-Min, and offload beside recompute, under a memory cap."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_plan import layer, peak_per_rank, profiles

from conveyor.cli import main
from conveyor.observe.host_copy import HostCopy, measure_host_copy
from conveyor.observe.profile import LayerProfile
from conveyor.observe.simulate import simulate
from conveyor.plan import MemoryModel, Plan, PlanError, make_plan, search, splits, stage_costs
from conveyor.plan.cost import offload_for, static_bytes
from conveyor.plan.search import trade
from conveyor.schedules import PipelineSpec, build_schedule

COPY = HostCopy(seconds_per_byte=0.01, copy_stream=False, nbytes=1, device="cpu")


def test_an_offloaded_stage_moves_what_its_layers_saved_but_its_input() -> None:
    layers = (
        layer("emb", 1, 0, 2, 2, 10, 1, 4),
        layer("b0", 3, 4, 5, 8, 20, 6, 4),
        layer("b1", 3, 4, 5, 8, 20, 6, 4),
        layer("head", 7, 6, 5, 10, 30, 9, 0),
    )
    profile = LayerProfile("t", 1, "adam", layers, first=True, last=True)
    first, last = stage_costs(profile, (1, 1), offload={0, 1}, host_copy=COPY).stages
    assert (first.offload_bytes, last.offload_bytes) == (1 + 6, 6 + 9 - 4)  # the last stage keeps its input
    assert (first.offload, last.offload) == pytest.approx((0.07, 0.11))
    plain = stage_costs(profile, (1, 1)).stages
    assert plain[0].offload == 0 and plain[0].offload_bytes == 0
    assert not stage_costs(profile, (1, 1), offload={0}, host_copy=COPY).copy_stream
    gpu = dataclasses.replace(COPY, copy_stream=True)
    assert stage_costs(profile, (1, 1), offload={0}, host_copy=gpu).copy_stream


def test_offload_settings_are_the_stages_that_do_not_recompute() -> None:
    assert offload_for("all", "none", 4) == "0,1,2,3"
    assert PipelineSpec("1f1b", 4, 8, offload=offload_for("all", "none", 4)).offload == "all"  # as a spec writes it
    assert offload_for("all", "all-but-last-stage", 4) == "3"
    assert offload_for("all", "full", 4) == "none"
    assert offload_for("none", "none", 4) == "none"
    with pytest.raises(ValueError, match="offload must be one of none, all; got 'some'"):
        offload_for("some", "none", 4)


SETUPS = [("1f1b", 4, 8, 1), ("v-half", 2, 4, 2), ("v-min", 3, 6, 2), ("zbv", 2, 4, 2), ("gpipe", 2, 4, 1)]


@settings(max_examples=40, deadline=None)
@given(profiles(most_blocks=6), st.sampled_from(SETUPS), st.sampled_from(["none", "all-but-last-stage"]))
def test_the_memory_model_with_offload_is_the_simulators_walk(profile: LayerProfile, setup, recompute: str) -> None:  # type: ignore[no-untyped-def]
    name, ranks, m, v = setup
    stages = ranks * v
    if len(profile.layers) - profile.first - profile.last < stages:
        return
    spec = PipelineSpec(name, ranks, m, v, recompute=recompute, offload=offload_for("all", recompute, stages))
    offload = spec.offloaded
    program = build_schedule(spec)
    split = next(iter(splits(profile, stages)))
    costs = stage_costs(profile, split, recompute, offload, COPY)  # copies keep the rank busy: order is all
    simulated = simulate(program, costs).peak_activation_bytes
    assert simulated is not None
    static = static_bytes(profile, split)
    expected = [simulated[r] + sum(static[s] for s in program.stages_of(r)) for r in range(ranks)]
    assert MemoryModel.of(program).peak(costs, static) == pytest.approx(expected)
    if not offload:
        assert expected == pytest.approx(peak_per_rank(profile, program, split, recompute))


def heavy_activations(blocks: int = 8) -> LayerProfile:
    """Blocks whose activations outweigh their weights 10 to 1, costing 1 s forward, 1 s B, 1 s W."""
    return LayerProfile("heavy", 4, "sgd", tuple(layer(f"b{i}", 1, 1, 1, 2, 25, 1000.0, 100.0) for i in range(blocks)))


def test_under_a_cap_the_search_picks_a_v_schedule_or_offload_and_says_what_it_traded() -> None:
    profile = heavy_activations()
    free, _ = search(lambda m: profile, 4, [8], recomputes=("none",), offloads=("none",))
    fastest = free[0]
    plans, refused = search(lambda m: profile, 4, [8], host_copy=COPY)
    names = {p.spec.schedule for p in plans}
    assert {"v-half", "v-min"} <= names
    assert any(p.spec.offload != "none" for p in plans)
    assert any("offload moves nothing" in r.why for r in refused)  # recompute full leaves nothing to offload
    one_f_one_b = min(
        (p for p in plans if p.spec.schedule == "1f1b" and p.spec.recompute == "none"), key=lambda p: p.spec.offload
    )
    # A cap below what 1F1B holds without help, above what V-Min holds.
    v_min = next(
        p for p in plans if p.spec.schedule == "v-min" and (p.spec.recompute, p.spec.offload) == ("none", "none")
    )
    assert max(v_min.peak_bytes) < max(one_f_one_b.peak_bytes)
    cap = (max(v_min.peak_bytes) + max(one_f_one_b.peak_bytes)) / 2
    capped, _ = search(lambda m: profile, 4, [8], host_copy=COPY, memory_cap=cap)
    best = capped[0]
    assert max(best.peak_bytes) <= cap
    assert (best.spec.schedule, best.spec.recompute, best.spec.offload) != ("1f1b", "none", "none")
    assert best.step_time >= fastest.step_time
    sentence = trade(best, fastest)
    assert sentence.startswith("traded +") and "less memory on the busiest rank" in sentence
    assert f"bubble {fastest.bubble:.3f} -> {best.bubble:.3f}" in sentence
    assert trade(fastest, fastest) == "the fastest configuration fits: nothing traded"


def test_offload_that_moves_nothing_is_refused() -> None:
    with pytest.raises(PlanError, match="offload moves nothing under 1f1b on 2 ranks"):
        make_plan(heavy_activations(), PipelineSpec("1f1b", 2, 4, offload="all"), host_copy=COPY)


def test_a_plan_keeps_its_offload_and_training_must_use_it(tmp_path: Path) -> None:
    plan = make_plan(heavy_activations(), PipelineSpec("1f1b", 4, 8, offload="all"), host_copy=COPY)
    assert plan.spec.offload == "all"
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    plan.check_spec(PipelineSpec("1f1b", 4, 8, offload="0,1,2,3"), 4)  # the same stages, written out
    with pytest.raises(ValueError, match="use --offload all"):
        plan.check_spec(PipelineSpec("1f1b", 4, 8), 4)
    older = json.loads((tmp_path / "plan.json").read_text())
    del older["spec"]["offload"]  # a plan written before offload
    (tmp_path / "old.json").write_text(json.dumps(older))
    assert Plan.load(tmp_path / "old.json").spec.offload == "none"


def test_host_copies_are_measured_as_the_cpu_runs_them() -> None:
    copy = measure_host_copy("cpu", nbytes=2**20, repeats=3)
    assert not copy.copy_stream and copy.device == "cpu"
    assert 1e-13 < copy.seconds_per_byte < 1e-6  # between 1 MB/s and 10 TB/s
    assert copy.seconds(2**20) == pytest.approx(copy.seconds_per_byte * 2**20)


def test_plan_search_under_memory_says_what_it_traded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = ["--layers", "4", "--dim", "32", "--heads", "2", "--context", "16", "--batch-size", "8", "--ranks", "2"]
    base = ["plan", *tiny, "--profile", str(tmp_path / "profile.json"), "--out", str(tmp_path / "plan.json")]
    assert main([*base, "--search", "--microbatch-counts", "4", "--no-transfers", "--top", "99"]) == 0
    out = capsys.readouterr().out
    assert "offload" in next(line for line in out.splitlines() if line.startswith("#"))
    assert "v-half" in out and "v-min" in out
    fastest = Plan.load(tmp_path / "plan.json")
    cap = 0.9 * max(fastest.peak_bytes)
    assert main([*base, "--search", "--microbatch-counts", "4", "--no-transfers", "--memory", f"{cap:.0f}"]) == 0
    out = capsys.readouterr().out
    chosen = Plan.load(tmp_path / "plan.json")
    assert max(chosen.peak_bytes) <= cap
    assert "traded +" in out and "against the fastest configuration" in out
    assert f"--offload {chosen.spec.offload}" in out

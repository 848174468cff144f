"""PipeDream's asynchronous schedules as data: programs, weight versions, staleness and throughput."""

from __future__ import annotations

import pytest

from conveyor.observe.simulate import parse_costs, simulate
from conveyor.schedules import Kind, PipelineSpec, build_schedule, noam, pipedream, pipedream_2bw, versions_held


def test_pipedream_is_one_f_one_b_with_a_step_after_every_backward_and_no_flush() -> None:
    # Two mini-batches of 2: the second enters while the first is still in flight; one drain, at the end.
    assert pipedream(3, 2, 2).to_strings() == [
        "0F0 0F1 0F2 0B0 0STEP0 0F3 0B1 0STEP1 0B2 0STEP2 0B3 0STEP3",
        "1F0 1F1 1B0 1STEP0 1F2 1B1 1STEP1 1F3 1B2 1STEP2 1B3 1STEP3",
        "2F0 2B0 2STEP0 2F1 2B1 2STEP1 2F2 2B2 2STEP2 2F3 2B3 2STEP3",
    ]


def test_the_input_stage_admits_noam_micro_batches_before_its_first_backward() -> None:
    for ranks in range(1, 7):
        actions = pipedream(ranks, 4, 3).actions[0]
        first_backward = next(i for i, a in enumerate(actions) if a.kind is Kind.BACKWARD)
        assert first_backward == noam(ranks) == ranks
    assert noam(5, input_replicas=2) == 3


def test_pipedream_2bw_steps_once_per_mini_batch_and_uses_the_version_before_the_last() -> None:
    program = pipedream_2bw(2, 2, 3)
    assert program.to_strings() == [
        "0F0 0F1 0B0 0F2 0B1 0STEP1 0F3 0B2 0F4 0B3 0STEP3 0F5 0B4 0B5 0STEP5",
        "1F0 1B0 1F1 1B1 1STEP1 1F2 1B2 1F3 1B3 1STEP3 1F4 1B4 1F5 1B5 1STEP5",
    ]
    # Mini-batch t (micro-batches 2t, 2t + 1) uses version t - 1: W(t+1) = W(t) - lr grad f(W(t-1)).
    assert {k: program.weight_versions[(0, k)] for k in range(6)} == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1}
    with pytest.raises(ValueError, match="needs at least P - 1 = 3 micro-batches per mini-batch"):
        pipedream_2bw(4, 2, 2)


@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_versions_and_staleness_are_what_the_catalog_says(ranks: int) -> None:
    costs = parse_costs("f=1,whole=2")  # backwards run whole here: f + b = 3
    for m in (max(1, ranks - 1), ranks + 2):
        plain = simulate(build_schedule(PipelineSpec("pipedream", ranks, m), mini_batches=4), costs)
        vertical = simulate(
            build_schedule(PipelineSpec("pipedream", ranks, m, vertical_sync=True), mini_batches=4), costs
        )
        double = simulate(build_schedule(PipelineSpec("pipedream-2bw", ranks, m), mini_batches=4), costs)
        assert plain.weight_versions == [min(ranks - r, 4 * m) for r in range(ranks)], m
        assert plain.staleness == [ranks - 1 - r for r in range(ranks)], m
        assert vertical.staleness == [ranks - 1] * ranks, m
        assert vertical.weight_versions == [ranks] * ranks, m
        assert double.weight_versions == [2] * ranks and double.staleness == [1] * ranks, m
        synchronous = simulate(build_schedule(PipelineSpec("1f1b", ranks, m)), costs)
        assert synchronous.weight_versions == [1] * ranks and synchronous.staleness == [0] * ranks


def test_a_long_stream_has_no_bubble_unlike_a_flush_per_mini_batch() -> None:
    costs = parse_costs("f=1,whole=2")  # backwards run whole here: f + b = 3
    ranks, m = 4, 4
    flushed = simulate(build_schedule(PipelineSpec("1f1b", ranks, m)), costs)
    for name in ("pipedream", "pipedream-2bw"):
        stream = simulate(build_schedule(PipelineSpec(name, ranks, m), mini_batches=32), costs)
        # 1F1B's step takes (m + P - 1)(f + b); a stream approaches one micro-batch every f + b.
        assert flushed.throughput == pytest.approx(m / ((m + ranks - 1) * 3))
        assert stream.throughput > 0.95 / 3 > flushed.throughput * 1.5, name


def test_versions_held_bound() -> None:
    """A stage holds at most its in-flight micro-batches + 1 versions (with vertical sync: the pipeline's)."""
    for ranks in range(1, 6):
        for m in range(max(1, ranks - 1), 7):
            for vertical in (False, True):
                held = versions_held(
                    build_schedule(PipelineSpec("pipedream", ranks, m, vertical_sync=vertical), mini_batches=3)
                )
                for stage, count in held.items():
                    in_flight = min(ranks if vertical else ranks - stage, 3 * m)
                    assert count <= in_flight + 1, (ranks, m, vertical, stage)

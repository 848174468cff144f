"""V-shaped building blocks (V-Half, V-Min): literal programs, the paper's memory, bubbles against 1F1B."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.cli import main
from conveyor.observe.simulate import parse_costs, simulate
from conveyor.schedules import (
    PipelineSpec,
    build_schedule,
    lower,
    v_block,
    v_half,
    v_min,
    v_schedule,
    validate,
)
from conveyor.schedules.building_block import PERIOD, _peaks, _repeat

EQUAL = parse_costs("f=1,b=1,w=1")


def test_v_half_on_two_ranks() -> None:
    # Rank 0 holds stages 0 and 3, rank 1 stages 1 and 2; each W fills a wait or makes room for a forward.
    assert v_half(2, 4).to_strings() == [
        "0F0 0F1 0F2 3F0 3B0 3W0 3F1 3B1 0B0 3W1 0W0 3F2 0F3 3B2 0B1 3W2 0W1 3F3 3B3 0B2 3W3 0B3 0W2 0W3 0STEP 3STEP",
        "1F0 2F0 1F1 2F1 2B0 1B0 2W0 1F2 1W0 2F2 2B1 1B1 2W1 1F3 1W1 2F3 2B2 1B2 2B3 1B3 2W2 1W2 2W3 1W3 1STEP 2STEP",
    ]


def test_blocks_start_each_pass_after_its_inputs_and_never_collide() -> None:
    # V-Min: one slot between ranks on every leg; rank 0's up stage turns around at once.
    assert v_block(2, 1).starts == ((0, 3, 4, 7), (1, 2, 5, 6))
    for p in range(1, 9):
        for spacing in (1, 2, 3, 5):
            starts = v_block(p, spacing).starts
            for rank, (down_f, up_f, up_b, down_b) in enumerate(starts):
                assert len({s % PERIOD for s in starts[rank]}) == 4, (p, spacing, rank)
                assert down_f < up_f < up_b < down_b
                if rank:
                    assert down_f == starts[rank - 1][0] + spacing and up_b == starts[rank - 1][2] + spacing
                    assert up_f == starts[rank - 1][1] - 1 and down_b == starts[rank - 1][3] - 1
            assert starts[-1][1] == starts[-1][0] + 1  # the bottom of the V turns at once


def test_a_spacing_that_collides_names_those_that_fit() -> None:
    with pytest.raises(ValueError, match="no V-shaped block with spacing 4 fits 8 ranks.*use spacing 1, 2, 3 or 5"):
        v_block(8, 4)
    with pytest.raises(ValueError, match="spacing is 1 \\(V-Min\\) to 5 slots; got 6"):
        v_block(2, 6)
    with pytest.raises(ValueError, match="v-half needs at least 1 micro-batch; got 0"):
        v_half(2, 0)


@settings(max_examples=60, deadline=None)
@given(p=st.integers(1, 12), m=st.integers(1, 40), spacing=st.sampled_from([1, 2, 3, 5]))
def test_every_size_validates_and_holds_the_repeated_blocks_peak(p: int, m: int, spacing: int) -> None:
    program = lower(v_schedule(p, m, spacing))
    validate(program)  # raises ScheduleError (DeadlockError for a hang) if the program cannot run
    assert program.stages_of(0) == [0, 2 * p - 1]
    repeated = _repeat(v_block(p, spacing), m)
    result = simulate(program, EQUAL)
    assert max(result.peak_activations) == max(_peaks(repeated).values())
    # Tightening never ends a program later than the repeated blocks end on the unit clock.
    assert result.step_time <= max(max(slots) for slots in repeated.values()) + 1


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 16), m=st.integers(1, 48))
def test_simulated_peaks_are_the_papers(p: int, m: int) -> None:
    """Qi et al. (2024): V-Half holds (p + 2) // 2 and V-Min (p + 4) // 3 micro-batches of a full-size stage
    (two half-size stages per rank here, so twice as many of ours), or all m when fewer."""
    for generator, full_size in ((v_half, (p + 2) // 2), (v_min, (p + 4) // 3)):
        result = simulate(lower(generator(p, m)), EQUAL)
        assert max(result.peak_activations) == 2 * min(m, full_size), (generator.__name__, p, m)
        assert result.peak_full_stages == min(m, full_size) * 1.0


def test_on_8_ranks_and_16_micro_batches_the_memory_and_bubble_the_issue_asks() -> None:
    one_f_one_b = simulate(build_schedule(PipelineSpec("1f1b", 8, 16)), EQUAL)
    half = simulate(build_schedule(PipelineSpec("v-half", 8, 16)), EQUAL)
    third = simulate(build_schedule(PipelineSpec("v-min", 8, 16)), EQUAL)
    assert one_f_one_b.peak_full_stages == 8
    assert half.peak_full_stages / one_f_one_b.peak_full_stages == 5 / 8  # at most 0.65
    assert third.peak_full_stages / one_f_one_b.peak_full_stages == 4 / 8  # at most 0.55
    assert half.bubble_fraction <= one_f_one_b.bubble_fraction
    assert third.bubble_fraction <= one_f_one_b.bubble_fraction + 0.05


@pytest.mark.parametrize("p", [2, 4, 6, 8])
@pytest.mark.parametrize("rounds", [1, 2, 3, 4])
def test_v_half_idles_about_half_and_v_min_about_two_thirds_of_1f1b(p: int, rounds: int) -> None:
    m = p * rounds
    one_f_one_b = simulate(build_schedule(PipelineSpec("1f1b", p, m)), EQUAL).bubble_fraction
    assert simulate(build_schedule(PipelineSpec("v-half", p, m)), EQUAL).bubble_fraction <= 0.6 * one_f_one_b
    assert simulate(build_schedule(PipelineSpec("v-min", p, m)), EQUAL).bubble_fraction <= 0.8 * one_f_one_b


def test_spacing_5_holds_what_zbv_holds_with_its_bubble() -> None:
    wide = simulate(lower(v_schedule(8, 16, 5)), EQUAL)
    zbv = simulate(build_schedule(PipelineSpec("zbv", 8, 16)), EQUAL)
    assert wide.peak_activations == zbv.peak_activations == [16] * 8
    assert wide.bubble_fraction == pytest.approx(zbv.bubble_fraction)


def test_simulate_prints_the_full_size_peak(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "--schedule", "v-half", "--ranks", "8", "--microbatches", "16", "--costs", "f=1,b=1,w=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "peak activations [10, 10, 10, 10, 10, 10, 10, 10]" in out
    assert "peak, full-size  5 (busiest rank, in micro-batches of a 1/P share)" in out

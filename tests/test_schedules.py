"""Schedule generators: literal programs for small cases, and invariants over the whole (p, m) grid."""

from __future__ import annotations

import pytest

from conveyor.schedules import SCHEDULES, Kind, Program, build_schedule, gpipe, lower, one_f_one_b, validate

MAX_STAGES, MAX_MICROBATCHES = 8, 32


def test_gpipe_three_stages_three_microbatches() -> None:
    assert gpipe(3, 3).to_strings() == [
        "0F0 0F1 0F2 0B0 0B1 0B2 0STEP",
        "1F0 1F1 1F2 1B0 1B1 1B2 1STEP",
        "2F0 2F1 2F2 2B0 2B1 2B2 2STEP",
    ]


def test_one_f_one_b_three_stages_three_microbatches() -> None:
    # Rank i warms up with p - 1 - i forwards, then alternates F and B, then drains.
    assert one_f_one_b(3, 3).to_strings() == [
        "0F0 0F1 0F2 0B0 0B1 0B2 0STEP",
        "1F0 1F1 1B0 1F2 1B1 1B2 1STEP",
        "2F0 2B0 2F1 2B1 2F2 2B2 2STEP",
    ]


def test_one_f_one_b_with_more_microbatches_than_stages() -> None:
    assert one_f_one_b(2, 4).to_strings() == [
        "0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3 0STEP",
        "1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3 1STEP",
    ]


def test_one_f_one_b_with_fewer_microbatches_than_stages_cuts_the_warmup() -> None:
    assert one_f_one_b(4, 2).to_strings() == [
        "0F0 0F1 0B0 0B1 0STEP",
        "1F0 1F1 1B0 1B1 1STEP",
        "2F0 2F1 2B0 2B1 2STEP",
        "3F0 3B0 3F1 3B1 3STEP",
    ]


def test_generators_place_one_stage_per_rank_and_name_the_program() -> None:
    for name, generator in SCHEDULES.items():
        program = generator(3, 2)
        assert program.placement == (0, 1, 2)
        assert program.num_microbatches == 2
        assert program.name == name


@pytest.mark.parametrize("generator", [gpipe, one_f_one_b])
def test_generators_reject_empty_sizes(generator) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="at least 1 stage; got 0"):
        generator(0, 4)
    with pytest.raises(ValueError, match="at least 1 micro-batch; got 0"):
        generator(2, 0)


def test_build_schedule_names_the_known_schedules_on_a_typo() -> None:
    with pytest.raises(ValueError, match="unknown schedule '1f1f'; choose one of gpipe, 1f1b"):
        build_schedule("1f1f", 2, 2)


def test_build_schedule_returns_the_lowered_program() -> None:
    assert build_schedule("gpipe", 2, 2).to_strings() == lower(gpipe(2, 2)).to_strings()
    assert build_schedule("gpipe", 2, 2, prefetch=False).to_strings() == lower(gpipe(2, 2), prefetch=False).to_strings()


def peak_in_flight(program: Program, rank: int) -> int:
    """The most forwards on `rank` whose backward has not run yet: the activations it must keep."""
    held = peak = 0
    for action in program.actions[rank]:
        if action.kind is Kind.FORWARD:
            held += 1
            peak = max(peak, held)
        elif action.kind is Kind.BACKWARD:
            held -= 1
    return peak


EXPECTED_PEAK = {
    "gpipe": lambda p, rank, m: m,
    "1f1b": lambda p, rank, m: min(p - rank, m),
}


def test_every_schedule_has_a_stated_memory_bound() -> None:
    # A new schedule must state its activation bound here to be covered by the sweep below.
    assert set(EXPECTED_PEAK) == set(SCHEDULES)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_size_builds_validates_and_keeps_its_invariants(name: str) -> None:
    """All p in 1..8 and m in 1..32 (exhaustive: cheaper than sampling, and it misses nothing)."""
    for p in range(1, MAX_STAGES + 1):
        for m in range(1, MAX_MICROBATCHES + 1):
            where = f"{name} p={p} m={m}"
            program = build_schedule(name, p, m)  # raises if the program does not validate
            timing = validate(program)
            # Unit costs: (m + p - 1) forward ticks plus as many backward ticks,
            # i.e. the documented bubble fraction (p - 1) / (m + p - 1).
            assert timing.makespan == 2 * (m + p - 1), where
            # Prefetching moves free receives only: it must not change the timing.
            assert validate(lower(SCHEDULES[name](p, m), prefetch=False)).makespan == timing.makespan, where
            for rank in range(p):
                assert peak_in_flight(program, rank) == EXPECTED_PEAK[name](p, rank, m), f"{where} rank {rank}"
                steps = [a for a in program.actions[rank] if a.kind is Kind.STEP]
                assert program.actions[rank][-1].kind is Kind.STEP and len(steps) == 1, f"{where} rank {rank}"

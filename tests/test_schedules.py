"""Schedule generators: literal programs for small cases, and invariants over the whole (p, m) grid."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from conveyor.schedules import (
    SCHEDULES,
    Kind,
    Link,
    PipelineSpec,
    Program,
    build_schedule,
    gpipe,
    lower,
    one_f_one_b,
    schedule_info,
    split_backwards,
    validate,
)

MAX_RANKS, MAX_MICROBATCHES = 8, 32


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


@pytest.mark.parametrize("generator", [gpipe, one_f_one_b])
def test_single_stage_generators_place_one_stage_per_rank(generator: Callable[[int, int], Program]) -> None:
    program = generator(3, 2)
    assert program.placement == ((0,), (1,), (2,))
    assert program.num_microbatches == 2
    assert program.name == {gpipe: "gpipe", one_f_one_b: "1f1b"}[generator]


@pytest.mark.parametrize("generator", [gpipe, one_f_one_b])
def test_generators_reject_empty_sizes(generator: Callable[[int, int], Program]) -> None:
    with pytest.raises(ValueError, match="at least 1 rank; got 0"):
        generator(0, 4)
    with pytest.raises(ValueError, match="at least 1 micro-batch; got 0"):
        generator(2, 0)


def test_build_schedule_names_the_known_schedules_on_a_typo() -> None:
    with pytest.raises(ValueError, match="unknown schedule '1f1f'; choose one of gpipe, 1f1b"):
        build_schedule(PipelineSpec("1f1f", 2, 2))


def test_build_schedule_returns_the_lowered_program() -> None:
    assert build_schedule(PipelineSpec("gpipe", 2, 2)).to_strings() == lower(gpipe(2, 2)).to_strings()
    assert (
        build_schedule(PipelineSpec("gpipe", 2, 2), prefetch=False).to_strings()
        == lower(gpipe(2, 2), prefetch=False).to_strings()
    )


def test_single_stage_schedules_refuse_virtual_stages() -> None:
    with pytest.raises(ValueError, match="1f1b runs 1 stages? per rank; got 2"):
        build_schedule(PipelineSpec("1f1b", 2, 4, virtual=2))


# What each schedule accepts, and the peak activations its busiest rank holds (in micro-batches
# of one stage, released by B, or by W where the backward is split), as the catalog states them.
ACCEPTS: dict[str, Callable[[int, int], bool]] = {
    "interleaved-1f1b": lambda p, m: m % p == 0,
    "zbv": lambda p, m: m >= 2 * p - 1,
    "dualpipev": lambda p, m: m >= 2 * p,
    "pipedream-2bw": lambda p, m: m >= p - 1,
}
PEAK: dict[str, Callable[[int, int, int], int]] = {
    "gpipe": lambda p, m, v: m,
    "1f1b": lambda p, m, v: min(p, m),
    "interleaved-1f1b": lambda p, m, v: min(v * m, v * p + p - 1),
    "looped-bfs": lambda p, m, v: v * m,
    "zb-h1": lambda p, m, v: min(p, m),
    "zb-h2": lambda p, m, v: min(2 * p - 1, m),
    "zbv": lambda p, m, v: 2 * p,
    "dualpipev": lambda p, m, v: 2 * p + 1,
    "v-half": lambda p, m, v: 2 * min(m, (p + 2) // 2),  # Qi et al.'s (p + 2) // 2 full-size micro-batches
    "v-min": lambda p, m, v: 2 * min(m, (p + 4) // 3),  # and (p + 4) // 3
    "pipedream": lambda p, m, v: min(p, m),
    "pipedream-2bw": lambda p, m, v: min(p, m),
}


def peaks_held(program: Program) -> list[int]:
    """Per rank, the most micro-batch activations held at once (summed over the rank's stages)."""
    split = split_backwards(program)
    peaks = []
    for rank in range(program.num_ranks):
        held: Counter[int] = Counter()
        peak = 0
        for action in program.actions[rank]:
            if action.kind is Kind.FORWARD:
                held[action.stage] += 1
            elif action.kind is (Kind.WEIGHT if (action.stage, action.mb) in split else Kind.BACKWARD):
                held[action.stage] -= 1
            peak = max(peak, sum(held.values()))
        peaks.append(peak)
    return peaks


def test_every_schedule_states_its_invariants() -> None:
    # A new schedule must state its memory bound here to be covered by the sweep below.
    assert set(PEAK) == set(SCHEDULES)


def virtual_counts(name: str) -> tuple[int, ...]:
    allowed = schedule_info(name).allowed_virtual
    return allowed if allowed is not None else (2, 3)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_size_builds_validates_and_keeps_its_invariants(name: str) -> None:
    """All p in 1..8 and m in 1..32 (exhaustive: cheaper than sampling, and it misses nothing)."""
    accepts = ACCEPTS.get(name, lambda p, m: True)
    for v in virtual_counts(name):
        for p in range(1, MAX_RANKS + 1):
            for m in range(1, MAX_MICROBATCHES + 1):
                where = f"{name} p={p} m={m} v={v}"
                if not accepts(p, m):
                    with pytest.raises(ValueError, match=name):
                        build_schedule(PipelineSpec(name, p, m, v))
                    continue
                program = build_schedule(
                    PipelineSpec(name, p, m, v)
                )  # raises ScheduleError if the program does not validate
                assert program.num_ranks == p and program.num_stages == p * v, where
                assert all(len(program.stages_of(rank)) == v for rank in range(p)), where
                assert max(peaks_held(program)) == PEAK[name](p, m, v), where
                # One step per stage, or (asynchronous) one per micro-batches_per_step micro-batches.
                updates = m // (program.microbatches_per_step or m)
                for rank in range(p):
                    steps = Counter(a.stage for a in program.actions[rank] if a.kind is Kind.STEP)
                    assert steps == dict.fromkeys(program.stages_of(rank), updates), f"{where} rank {rank}: {steps}"


def test_one_f_one_b_rank_peaks_and_makespan() -> None:
    """Rank i holds min(p - i, m) activations (GPipe: m), and both take 2(m + p - 1) unit ticks,
    i.e. the documented bubble (p - 1) / (m + p - 1)."""
    for p in range(1, MAX_RANKS + 1):
        for m in range(1, MAX_MICROBATCHES + 1):
            one_f_one_b_program, gpipe_program = (
                build_schedule(PipelineSpec("1f1b", p, m)),
                build_schedule(PipelineSpec("gpipe", p, m)),
            )
            assert peaks_held(one_f_one_b_program) == [min(p - rank, m) for rank in range(p)], (p, m)
            assert peaks_held(gpipe_program) == [m] * p, (p, m)
            assert validate(one_f_one_b_program).makespan == 2 * (m + p - 1), (p, m)
            assert validate(gpipe_program).makespan == 2 * (m + p - 1), (p, m)


def _receive_posting(program: Program) -> tuple[dict[tuple[Link, int], float], int]:
    """When each receive is posted on the validator's clock, and how many are posted no later than their send.

    A receive posted after its send arrived is what prefetching is for: with gloo the sender then waits for
    a handshake (docs/benchmarks.md).
    """
    timing = validate(program)
    sent, posted = {}, {}
    for rank, actions in program.actions.items():
        for action, start in zip(actions, timing.start[rank], strict=True):
            if action.kind.is_send:
                sent[(action.link, action.mb)] = start
            elif action.kind.is_recv:
                posted[(action.link, action.mb)] = start
    return posted, sum(start <= sent[key] for key, start in posted.items())


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_prefetching_posts_receives_before_their_sends_without_changing_the_timing(name: str) -> None:
    info = schedule_info(name)
    for p in (2, 3, 4):
        m = 2 * p
        generated = info.generate(p, m, info.default_virtual)
        prefetched, plain = lower(generated), lower(generated, prefetch=False)
        assert validate(prefetched).makespan == validate(plain).makespan, (p, m)
        early_posting, early = _receive_posting(prefetched)
        late_posting, late = _receive_posting(plain)
        assert all(early_posting[key] <= late_posting[key] for key in late_posting), (
            f"{name} p={p}: a receive moved later"
        )
        # Where a receive waits behind a compute, prefetching posts it before its send (GPipe and looped BFS
        # post theirs early anyway: their ranks wait for the forwards with nothing else to do).
        if name in ("gpipe", "looped-bfs"):
            assert early == late, (name, p, early, late)
        else:
            assert early > late, f"{name} p={p}: prefetching posted {early} receives early, without it {late}"

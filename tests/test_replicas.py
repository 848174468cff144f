"""1F1B-RR as data: replicated stages take micro-batches round-robin, admit NOAM, and step together."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.observe.simulate import CostModel, StageCosts, simulate
from conveyor.schedules import (
    Action,
    Kind,
    PipelineSpec,
    Program,
    ScheduleError,
    build_schedule,
    gpipe,
    noam,
    one_f_one_b,
    pipedream,
    pipedream_2bw,
    validate,
)

REPLICATING = ("gpipe", "1f1b", "pipedream", "pipedream-2bw")


def test_one_replica_per_stage_is_the_plain_schedule() -> None:
    for ranks in range(1, 5):
        for m in (1, 3, 6):
            ones = (1,) * ranks
            assert one_f_one_b(ranks, m, ones).actions == one_f_one_b(ranks, m).actions
            assert gpipe(ranks, m, ones).actions == gpipe(ranks, m).actions
            assert pipedream(ranks, m, 2, replicas=ones).actions == pipedream(ranks, m, 2).actions
            if m >= ranks - 1:
                assert pipedream_2bw(ranks, m, 2, ones).actions == pipedream_2bw(ranks, m, 2).actions


def test_pipedream_2_1_is_the_papers_hybrid_configuration() -> None:
    # Stage 0 on ranks 0 and 1 (even and odd micro-batches), stage 1 on rank 2. Each input replica
    # admits NOAM = ceil(3 workers / 2 replicas) = 2 micro-batches; the replicas step together after
    # each pair, the step named by the pair's last micro-batch.
    program = build_schedule(PipelineSpec("pipedream", 3, 2, replicas=(2, 1)), mini_batches=2, prefetch=False)
    assert program.to_strings() == [
        "0F0 0SF0>1 0F2 0SF2>1 0RB0<1 0B0 0RD1 0STEP1 0RB2<1 0B2 0RD3 0STEP3",
        "0F1 0SF1>1 0F3 0SF3>1 0RB1<1 0B1 0RD1 0STEP1 0RB3<1 0B3 0RD3 0STEP3",
        "1RF0<0 1F0 1B0 1SB0>0 1STEP0 1RF1<0 1F1 1B1 1SB1>0 1STEP1"
        " 1RF2<0 1F2 1B2 1SB2>0 1STEP2 1RF3<0 1F3 1B3 1SB3>0 1STEP3",
    ]
    assert program.placement == ((0, 1), (2,))
    assert program.rank_of(0, 3) == 1 and program.rank_of(1, 3) == 2
    # Micro-batches from each replica travel on a channel of their own pair of ranks.
    assert program.channel(("act", 0, 1), 3) == ("act", 0, 1, 1, 2)
    assert program.channel(("grad", 0, 1), 2) == ("grad", 0, 1, 2, 0)
    assert set(program.channels()) == {
        ("act", 0, 1, 0, 2),
        ("act", 0, 1, 1, 2),
        ("grad", 0, 1, 2, 0),
        ("grad", 0, 1, 2, 1),
    }
    with pytest.raises(ValueError, match=r"stage 0 is replicated on ranks \[0, 1\]"):
        program.rank_of(0)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(REPLICATING),
    replicas=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    per_replica=st.integers(1, 3),
    extra=st.integers(0, 2),
)
def test_every_replicated_configuration_is_sound(name: str, replicas: list[int], per_replica: int, extra: int) -> None:
    ranks = sum(replicas)
    # Asynchronous ones need a multiple of every replica count; synchronous ones take any m >= replicas.
    lcm = 1
    for r in replicas:
        lcm = lcm * r // _gcd(lcm, r)
    asynchronous = name.startswith("pipedream")
    m = lcm * per_replica if asynchronous else max(replicas) + extra
    if name == "pipedream-2bw" and m < ranks - 1:
        m = lcm * -(-(ranks - 1) // lcm)
    kwargs = {"mini_batches": 2} if asynchronous else {}
    if asynchronous and replicas[-1] > 1:  # its rank streams each micro-batch's loss: one rank holds it
        with pytest.raises(ValueError, match="does not replicate the last stage"):
            PipelineSpec(name, ranks, m, replicas=tuple(replicas))
        return
    program = build_schedule(PipelineSpec(name, ranks, m, replicas=tuple(replicas)), **kwargs)  # validates
    for stage, count in enumerate(replicas):
        for k in range(program.num_microbatches):
            rank = program.rank_of(stage, k)
            assert rank == sum(replicas[:stage]) + k % count
            assert Action(stage, Kind.FORWARD, k) in program.actions[rank]
    # PipeDream's NOAM: each input replica admits ceil(workers / input replicas) micro-batches
    # before its first backward (fewer if it has fewer).
    if name != "gpipe":
        for rank in program.replicas_of(0):
            actions = program.actions[rank]
            first_backward = next(a for a in actions if a.kind is Kind.BACKWARD)
            admitted = [a for a in actions[: actions.index(first_backward)] if a.kind is Kind.FORWARD]
            mine = len([k for k in range(program.num_microbatches) if program.rank_of(0, k) == rank])
            assert len(admitted) == min(noam(ranks, replicas[0]), mine)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def test_a_replica_that_skips_its_reduction_or_step_is_caught() -> None:
    program = build_schedule(PipelineSpec("1f1b", 3, 4, replicas=(2, 1)))

    def without(kinds: tuple[Kind, ...]) -> Program:
        return program.derive(
            {r: [a for a in acts if r != 1 or a.kind not in kinds] for r, acts in program.actions.items()}
        )

    with pytest.raises(ScheduleError, match="rank 0 runs 0RD but rank 1, another replica of stage 0, does not"):
        validate(without((Kind.REDUCE,)))
    with pytest.raises(ScheduleError, match="rank 0 runs 0STEP but rank 1, another replica of stage 0, does not"):
        validate(without((Kind.STEP,)))
    wrong = Program.from_strings(["0F1 0B1 0STEP", "0F0 0B0 0STEP"], placement=[(0, 1)], num_microbatches=2)
    with pytest.raises(ScheduleError, match="micro-batch 1 of stage 0 runs on rank 1, not rank 0"):
        validate(wrong)


def test_replicas_are_offered_only_by_the_schedules_that_deal_round_robin() -> None:
    with pytest.raises(
        ValueError, match="zbv does not replicate stages; the schedules that do: gpipe, 1f1b, pipedream"
    ):
        build_schedule(PipelineSpec("zbv", 3, 6, replicas=(2, 1)))
    with pytest.raises(ValueError, match="replicas=2,1 holds 3 ranks: use ranks=3"):
        build_schedule(PipelineSpec("1f1b", 4, 4, replicas=(2, 1)))
    with pytest.raises(ValueError, match="stage 0 has 3 replicas but a mini-batch has only 2 micro-batches"):
        build_schedule(PipelineSpec("gpipe", 4, 2, replicas=(3, 1)))


def test_a_replicated_input_stage_raises_throughput_where_it_is_the_bottleneck() -> None:
    # Stage 0 twice as slow as stage 1: two replicas of it keep stage 1 busy (PipeDream's reason for 2-1).
    costs = CostModel((StageCosts(forward=2.0, whole=4.0), StageCosts(forward=1.0, whole=2.0)))
    plain = simulate(build_schedule(PipelineSpec("pipedream", 2, 4), mini_batches=8), costs)
    hybrid = simulate(build_schedule(PipelineSpec("pipedream", 3, 4, replicas=(2, 1)), mini_batches=8), costs)
    assert hybrid.throughput > 1.5 * plain.throughput, (plain.throughput, hybrid.throughput)

"""Lowering passes: whole backwards where a split gains nothing, transfers around computes, receives posted early."""

from __future__ import annotations

import pytest

from conveyor.observe.simulate import CostModel, StageCosts, simulate
from conveyor.schedules import (
    SCHEDULES,
    Edge,
    Kind,
    PipelineSpec,
    Program,
    StageGraph,
    Tie,
    build_schedule,
    forward_only,
    fuse_backwards,
    gpipe,
    insert_reductions,
    insert_transfers,
    lower,
    one_f_one_b,
    prefetch_receives,
    validate,
)


def test_insert_transfers_gpipe() -> None:
    assert insert_transfers(gpipe(3, 2)).to_strings() == [
        "0F0 0SF0>1 0F1 0SF1>1 0RB0<1 0B0 0RB1<1 0B1 0STEP",
        "1RF0<0 1F0 1SF0>2 1RF1<0 1F1 1SF1>2 1RB0<2 1B0 1SB0>0 1RB1<2 1B1 1SB1>0 1STEP",
        "2RF0<1 2F0 2RF1<1 2F1 2B0 2SB0>1 2B1 2SB1>1 2STEP",
    ]


def test_insert_transfers_one_f_one_b() -> None:
    assert insert_transfers(one_f_one_b(3, 3)).to_strings() == [
        "0F0 0SF0>1 0F1 0SF1>1 0F2 0SF2>1 0RB0<1 0B0 0RB1<1 0B1 0RB2<1 0B2 0STEP",
        "1RF0<0 1F0 1SF0>2 1RF1<0 1F1 1SF1>2 1RB0<2 1B0 1SB0>0"
        " 1RF2<0 1F2 1SF2>2 1RB1<2 1B1 1SB1>0 1RB2<2 1B2 1SB2>0 1STEP",
        "2RF0<1 2F0 2B0 2SB0>1 2RF1<1 2F1 2B1 2SB1>1 2RF2<1 2F2 2B2 2SB2>1 2STEP",
    ]


def test_insert_transfers_single_stage_needs_none() -> None:
    assert insert_transfers(gpipe(1, 2)).to_strings() == ["0F0 0F1 0B0 0B1 0STEP"]


def test_insert_transfers_hands_over_in_memory_between_stages_on_one_rank() -> None:
    # Stages 0 and 1 share rank 0: only the 1 -> 2 link is a transfer.
    program = Program.from_strings(
        ["0F0 1F0 0F1 1F1 1B0 0B0 1B1 0B1", "2F0 2B0 2F1 2B1"], placement=(0, 0, 1), num_microbatches=2
    )
    assert insert_transfers(program).to_strings() == [
        "0F0 1F0 1SF0>2 0F1 1F1 1SF1>2 1RB0<2 1B0 0B0 1RB1<2 1B1 0B1",
        "2RF0<1 2F0 2B0 2SB0>1 2RF1<1 2F1 2B1 2SB1>1",
    ]


def test_insert_transfers_with_two_stages_per_rank() -> None:
    # Looped placement: rank 0 holds stages 0 and 2, rank 1 holds 1 and 3.
    program = Program.from_strings(["0F0 2F0 2B0 0B0", "1F0 3F0 3B0 1B0"], placement=(0, 1, 0, 1), num_microbatches=1)
    lowered = insert_transfers(program)
    assert lowered.to_strings() == [
        "0F0 0SF0>1 2RF0<1 2F0 2SF0>3 2RB0<3 2B0 2SB0>1 0RB0<1 0B0",
        "1RF0<0 1F0 1SF0>2 3RF0<2 3F0 3B0 3SB0>2 1RB0<2 1B0 1SB0>0",
    ]
    validate(lowered)


def test_prefetch_posts_each_receive_one_compute_earlier() -> None:
    assert prefetch_receives(insert_transfers(gpipe(3, 3))).to_strings() == [
        "0F0 0SF0>1 0F1 0SF1>1 0RB0<1 0F2 0SF2>1 0RB1<1 0B0 0RB2<1 0B1 0B2 0STEP",
        "1RF0<0 1RF1<0 1F0 1SF0>2 1RF2<0 1F1 1SF1>2 1RB0<2 1F2"
        " 1SF2>2 1RB1<2 1B0 1SB0>0 1RB2<2 1B1 1SB1>0 1B2 1SB2>0 1STEP",
        "2RF0<1 2RF1<1 2F0 2RF2<1 2F1 2F2 2B0 2SB0>1 2B1 2SB1>1 2B2 2SB2>1 2STEP",
    ]


def test_prefetch_one_f_one_b() -> None:
    assert lower(one_f_one_b(3, 3)).to_strings() == [
        "0F0 0SF0>1 0F1 0SF1>1 0RB0<1 0F2 0SF2>1 0RB1<1 0B0 0RB2<1 0B1 0B2 0STEP",
        "1RF0<0 1RF1<0 1F0 1SF0>2 1RB0<2 1F1 1SF1>2 1RF2<0 1B0"
        " 1SB0>0 1RB1<2 1F2 1SF2>2 1RB2<2 1B1 1SB1>0 1B2 1SB2>0 1STEP",
        "2RF0<1 2F0 2RF1<1 2B0 2SB0>1 2F1 2RF2<1 2B1 2SB1>1 2F2 2B2 2SB2>1 2STEP",
    ]


def test_prefetch_keeps_a_gradient_receive_behind_the_forward_that_shapes_it() -> None:
    program = Program.from_strings(
        ["0F0 0SF0>1 0RB0<1 0B0", "1RF0<0 1F0 1B0 1SB0>0"], placement=(0, 1), num_microbatches=1
    )
    # 0RB0<1 needs 0F0's output shapes, so it cannot move before 0F0; 1RF0<0 has no compute before it.
    assert prefetch_receives(program).to_strings() == ["0F0 0SF0>1 0RB0<1 0B0", "1RF0<0 1F0 1B0 1SB0>0"]


def test_prefetch_moves_a_gradient_receive_past_an_unrelated_forward() -> None:
    program = Program.from_strings(["0F0 0F1 0RB0<1 0B0 0RB1<1 0B1"], placement=(0, 1), num_microbatches=2)
    assert prefetch_receives(program).to_strings()[0] == "0F0 0RB0<1 0F1 0RB1<1 0B0 0B1"


def test_prefetch_with_two_stages_per_rank() -> None:
    program = Program.from_strings(["0F0 2F0 2B0 0B0", "1F0 3F0 3B0 1B0"], placement=(0, 1, 0, 1), num_microbatches=1)
    prefetched = prefetch_receives(insert_transfers(program))
    assert prefetched.to_strings() == [
        "2RF0<1 0F0 0SF0>1 2F0 2SF0>3 2RB0<3 0RB0<1 2B0 2SB0>1 0B0",
        "1RF0<0 3RF0<2 1F0 1SF0>2 3F0 1RB0<2 3B0 3SB0>2 1B0 1SB0>0",
    ]
    validate(prefetched)


def test_lower_without_prefetch_is_insert_transfers() -> None:
    program = one_f_one_b(4, 5)
    assert lower(program, prefetch=False).to_strings() == insert_transfers(program).to_strings()
    assert lower(program).to_strings() == prefetch_receives(insert_transfers(program)).to_strings()


def test_passes_do_not_modify_their_input() -> None:
    program = gpipe(2, 2)
    before = program.to_strings()
    lower(program)
    assert program.to_strings() == before


def test_fuse_backwards_drops_a_w_right_after_its_own_b() -> None:
    program = Program.from_strings(["0F0 0F1 0B0 0W0 0B1 0W1 0STEP"], [0], 2)
    fused = fuse_backwards(Program.from_strings(["0F0 0F1 0B1 0B0 0W0 0W1 0STEP"], [0], 2))
    assert fused.to_strings() == ["0F0 0F1 0B1 0B0 0W1 0STEP"]
    assert fuse_backwards(program).to_strings() == ["0F0 0F1 0B0 0B1 0STEP"]


def test_fuse_backwards_keeps_the_split_when_the_gradient_goes_to_another_rank() -> None:
    # Stage 1's input gradient goes to rank 0: its W stays, so the gradient is sent before W runs.
    program = Program.from_strings(["0F0 0B0 0W0", "1F0 1B0 1W0"], [0, 1], 1)
    assert fuse_backwards(program).to_strings() == ["0F0 0B0", "1F0 1B0 1W0"]


def test_fuse_backwards_at_the_bottom_of_a_v() -> None:
    # Rank 1 holds stages 1 and 2: stage 2 hands its input gradient to stage 1 on the same rank.
    program = Program.from_strings(["0F0 3F0 3B0 3W0 0B0 0W0", "1F0 2F0 2B0 2W0 1B0 1W0"], [0, 1, 1, 0], 1)
    assert fuse_backwards(program).to_strings() == ["0F0 3F0 3B0 3W0 0B0", "1F0 2F0 2B0 1B0 1W0"]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_fusing_never_makes_a_schedule_slower(name: str) -> None:
    """A fused backward costs B + W here, the split's price being left out: no action may end later."""
    costs = CostModel((StageCosts(forward=1.0, backward=1.2, weight=0.8),), latency=0.1)
    for ranks in (1, 2, 3, 4):
        for m in (ranks, 2 * ranks, 2 * ranks + 1):
            v = SCHEDULES[name].default_virtual
            try:
                generated = SCHEDULES[name].generate(ranks, m, v)
            except ValueError:
                continue  # sizes the schedule refuses
            fused, split = lower(generated), lower(generated, fuse=False)
            validate(fused)
            fused_time = simulate(fused, costs).step_time
            assert fused_time <= simulate(split, costs).step_time + 1e-9, f"{name} p={ranks} m={m}"


SKIP = StageGraph(3, (Edge(0, 1), Edge(1, 2), Edge(0, 2, (1,))))  # stage 0's second output skips stage 1


def test_insert_transfers_sends_a_skipped_value_straight_to_its_stage() -> None:
    program = gpipe(3, 1)
    program.graph = SKIP
    assert insert_transfers(program).to_strings() == [
        "0F0 0SF0>1 0SF0>2 0RB0<1 0RB0<2 0B0 0STEP",
        "1RF0<0 1F0 1SF0>2 1RB0<2 1B0 1SB0>0 1STEP",
        "2RF0<0 2RF0<1 2F0 2B0 2SB0>0 2SB0>1 2STEP",
    ]


def test_an_edge_without_gradient_has_no_backward_transfer() -> None:
    program = gpipe(3, 1)
    program.graph = StageGraph(3, (Edge(0, 1), Edge(1, 2), Edge(0, 2, (1,), grad=False)))
    assert insert_transfers(program).to_strings() == [
        "0F0 0SF0>1 0SF0>2 0RB0<1 0B0 0STEP",
        "1RF0<0 1F0 1SF0>2 1RB0<2 1B0 1SB0>0 1STEP",
        "2RF0<0 2RF0<1 2F0 2B0 2SB0>1 2STEP",
    ]


def test_insert_reductions_offers_shared_gradients_after_the_last_backward() -> None:
    program = one_f_one_b(3, 2)
    program.graph = StageGraph.chain(3, [Tie(((0, "embed.weight"), (2, "head.weight")))])
    assert insert_reductions(program).to_strings() == [
        "0F0 0F1 0B0 0B1 0RD 0STEP",
        "1F0 1F1 1B0 1B1 1STEP",
        "2F0 2B0 2F1 2B1 2RD 2STEP",
    ]
    validate(lower(program))


def test_insert_reductions_follows_the_weight_gradients_of_a_split_backward() -> None:
    program = Program.from_strings(
        ["0F0 0B0 0W0 0STEP", "1F0 1B0 1W0 1STEP"],
        placement=(0, 1),
        num_microbatches=1,
        graph=StageGraph.chain(2, [Tie(((0, "w"), (1, "w")))]),
    )
    assert insert_reductions(program).to_strings() == ["0F0 0B0 0W0 0RD 0STEP", "1F0 1B0 1W0 1RD 1STEP"]


def test_forward_only_keeps_the_forwards_in_the_schedules_order() -> None:
    assert lower(forward_only(one_f_one_b(3, 2))).to_strings() == [
        "0F0 0SF0>1 0F1 0SF1>1",
        "1RF0<0 1RF1<0 1F0 1SF0>2 1F1 1SF1>2",
        "2RF0<1 2RF1<1 2F0 2F1",
    ]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_forward_only_programs_of_every_schedule_are_sound(name: str) -> None:
    program = build_schedule(PipelineSpec(name, 3, 6), forward_only=True)
    assert program.forward_only
    assert {a.kind for acts in program.actions.values() for a in acts} <= {Kind.FORWARD, Kind.SEND_F, Kind.RECV_F}

"""Lowering passes: whole backwards where a split gains nothing, transfers around computes, receives posted early."""

from __future__ import annotations

import pytest

from conveyor.observe.simulate import CostModel, StageCosts, simulate
from conveyor.schedules import (
    SCHEDULES,
    Program,
    fuse_backwards,
    gpipe,
    insert_transfers,
    lower,
    one_f_one_b,
    prefetch_receives,
    validate,
)


def test_insert_transfers_gpipe() -> None:
    assert insert_transfers(gpipe(3, 2)).to_strings() == [
        "0F0 0SF0 0F1 0SF1 0RB0 0B0 0RB1 0B1 0STEP",
        "1RF0 1F0 1SF0 1RF1 1F1 1SF1 1RB0 1B0 1SB0 1RB1 1B1 1SB1 1STEP",
        "2RF0 2F0 2RF1 2F1 2B0 2SB0 2B1 2SB1 2STEP",
    ]


def test_insert_transfers_one_f_one_b() -> None:
    assert insert_transfers(one_f_one_b(3, 3)).to_strings() == [
        "0F0 0SF0 0F1 0SF1 0F2 0SF2 0RB0 0B0 0RB1 0B1 0RB2 0B2 0STEP",
        "1RF0 1F0 1SF0 1RF1 1F1 1SF1 1RB0 1B0 1SB0 1RF2 1F2 1SF2 1RB1 1B1 1SB1 1RB2 1B2 1SB2 1STEP",
        "2RF0 2F0 2B0 2SB0 2RF1 2F1 2B1 2SB1 2RF2 2F2 2B2 2SB2 2STEP",
    ]


def test_insert_transfers_single_stage_needs_none() -> None:
    assert insert_transfers(gpipe(1, 2)).to_strings() == ["0F0 0F1 0B0 0B1 0STEP"]


def test_insert_transfers_hands_over_in_memory_between_stages_on_one_rank() -> None:
    # Stages 0 and 1 share rank 0: only the 1 -> 2 link is a transfer.
    program = Program.from_strings(
        ["0F0 1F0 0F1 1F1 1B0 0B0 1B1 0B1", "2F0 2B0 2F1 2B1"], placement=(0, 0, 1), num_microbatches=2
    )
    assert insert_transfers(program).to_strings() == [
        "0F0 1F0 1SF0 0F1 1F1 1SF1 1RB0 1B0 0B0 1RB1 1B1 0B1",
        "2RF0 2F0 2B0 2SB0 2RF1 2F1 2B1 2SB1",
    ]


def test_insert_transfers_with_two_stages_per_rank() -> None:
    # Looped placement: rank 0 holds stages 0 and 2, rank 1 holds 1 and 3.
    program = Program.from_strings(["0F0 2F0 2B0 0B0", "1F0 3F0 3B0 1B0"], placement=(0, 1, 0, 1), num_microbatches=1)
    lowered = insert_transfers(program)
    assert lowered.to_strings() == [
        "0F0 0SF0 2RF0 2F0 2SF0 2RB0 2B0 2SB0 0RB0 0B0",
        "1RF0 1F0 1SF0 3RF0 3F0 3B0 3SB0 1RB0 1B0 1SB0",
    ]
    validate(lowered)


def test_prefetch_posts_each_receive_one_compute_earlier() -> None:
    assert prefetch_receives(insert_transfers(gpipe(3, 3))).to_strings() == [
        "0F0 0SF0 0F1 0SF1 0RB0 0F2 0SF2 0RB1 0B0 0RB2 0B1 0B2 0STEP",
        "1RF0 1RF1 1F0 1SF0 1RF2 1F1 1SF1 1RB0 1F2 1SF2 1RB1 1B0 1SB0 1RB2 1B1 1SB1 1B2 1SB2 1STEP",
        "2RF0 2RF1 2F0 2RF2 2F1 2F2 2B0 2SB0 2B1 2SB1 2B2 2SB2 2STEP",
    ]


def test_prefetch_one_f_one_b() -> None:
    assert lower(one_f_one_b(3, 3)).to_strings() == [
        "0F0 0SF0 0F1 0SF1 0RB0 0F2 0SF2 0RB1 0B0 0RB2 0B1 0B2 0STEP",
        "1RF0 1RF1 1F0 1SF0 1RB0 1F1 1SF1 1RF2 1B0 1SB0 1RB1 1F2 1SF2 1RB2 1B1 1SB1 1B2 1SB2 1STEP",
        "2RF0 2F0 2RF1 2B0 2SB0 2F1 2RF2 2B1 2SB1 2F2 2B2 2SB2 2STEP",
    ]


def test_prefetch_keeps_a_gradient_receive_behind_the_forward_that_shapes_it() -> None:
    program = Program.from_strings(["0F0 0SF0 0RB0 0B0", "1RF0 1F0 1B0 1SB0"], placement=(0, 1), num_microbatches=1)
    # 0RB0 needs 0F0's output shapes, so it cannot move before 0F0; 1RF0 has no compute before it.
    assert prefetch_receives(program).to_strings() == ["0F0 0SF0 0RB0 0B0", "1RF0 1F0 1B0 1SB0"]


def test_prefetch_moves_a_gradient_receive_past_an_unrelated_forward() -> None:
    program = Program.from_strings(["0F0 0F1 0RB0 0B0 0RB1 0B1"], placement=(0, 1), num_microbatches=2)
    assert prefetch_receives(program).to_strings()[0] == "0F0 0RB0 0F1 0RB1 0B0 0B1"


def test_prefetch_with_two_stages_per_rank() -> None:
    program = Program.from_strings(["0F0 2F0 2B0 0B0", "1F0 3F0 3B0 1B0"], placement=(0, 1, 0, 1), num_microbatches=1)
    prefetched = prefetch_receives(insert_transfers(program))
    assert prefetched.to_strings() == [
        "2RF0 0F0 0SF0 2F0 2SF0 2RB0 0RB0 2B0 2SB0 0B0",
        "1RF0 3RF0 1F0 1SF0 3F0 1RB0 3B0 3SB0 1B0 1SB0",
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

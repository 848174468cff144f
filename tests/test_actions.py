"""The schedule IR: actions, their string form, and programs built from strings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.schedules import Action, Kind, Program, parse_action, parse_actions


@st.composite
def actions(draw: st.DrawFn) -> Action:
    kind = draw(st.sampled_from(list(Kind)))
    mb = draw(st.none() | st.integers(0, 999)) if kind.optional_mb else draw(st.integers(0, 999))
    peer = draw(st.integers(0, 999)) if kind.is_transfer else None
    return Action(draw(st.integers(0, 999)), kind, mb, peer)


@given(actions())
def test_string_form_round_trips(action: Action) -> None:
    assert parse_action(str(action)) == action


@given(st.lists(actions(), max_size=20))
def test_lists_of_actions_round_trip(sequence: list[Action]) -> None:
    assert parse_actions(" ".join(map(str, sequence))) == sequence


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1F3", Action(1, Kind.FORWARD, 3)),
        ("0B12", Action(0, Kind.BACKWARD, 12)),
        ("10SF2>11", Action(10, Kind.SEND_F, 2, 11)),
        ("2RF0<1", Action(2, Kind.RECV_F, 0, 1)),
        ("3SB2>0", Action(3, Kind.SEND_B, 2, 0)),
        ("3RB1<4", Action(3, Kind.RECV_B, 1, 4)),
        ("1STEP", Action(1, Kind.STEP)),
        ("1STEP7", Action(1, Kind.STEP, 7)),
        ("0RD", Action(0, Kind.REDUCE)),
        ("5RD2", Action(5, Kind.REDUCE, 2)),
        ("1OF3", Action(1, Kind.OFFLOAD, 3)),
        ("1RL3", Action(1, Kind.RELOAD, 3)),
        ("  4F5 ", Action(4, Kind.FORWARD, 5)),
    ],
)
def test_parse_known_strings(text: str, expected: Action) -> None:
    assert parse_action(text) == expected
    assert str(expected) == text.strip()


@pytest.mark.parametrize(
    "text",
    ["", "F3", "1X3", "1 F 3", "-1F0", "1f3", "1F3x", "1SF3", "1SF3<2", "1RF3>0", "1F3>2", "1RD>2", "1OF", "1RL3<2"],
)
def test_parse_rejects_malformed_strings(text: str) -> None:
    with pytest.raises(ValueError, match="not an action"):
        parse_action(text)


def test_computes_and_transfers_need_a_micro_batch_and_transfers_a_peer() -> None:
    with pytest.raises(ValueError, match="FORWARD needs a micro-batch"):
        parse_action("1F")
    with pytest.raises(ValueError, match="FORWARD needs a micro-batch"):
        Action(0, Kind.FORWARD)
    with pytest.raises(ValueError, match="SEND_F needs the stage at the other end"):
        Action(0, Kind.SEND_F, 1)
    with pytest.raises(ValueError, match="FORWARD has no peer"):
        Action(0, Kind.FORWARD, 1, 2)


def test_a_link_names_its_edge_in_forward_order_whichever_end_speaks() -> None:
    # Stage 1 feeds stage 3: both ends of each direction name the same link.
    assert parse_action("1SF0>3").link == parse_action("3RF0<1").link == ("act", 1, 3)
    assert parse_action("3SB0>1").link == parse_action("1RB0<3").link == ("grad", 1, 3)


def test_kind_predicates_partition_the_kinds() -> None:
    assert Kind.FORWARD.is_compute and Kind.BACKWARD.is_compute
    assert {k for k in Kind if k.is_send} == {Kind.SEND_F, Kind.SEND_B}
    assert {k for k in Kind if k.is_recv} == {Kind.RECV_F, Kind.RECV_B}
    assert {k for k in Kind if k.is_host_copy} == {Kind.OFFLOAD, Kind.RELOAD}
    for kind in Kind:
        roles = [kind.is_compute, kind.is_send, kind.is_recv, kind.is_host_copy, kind in (Kind.STEP, Kind.REDUCE)]
        assert sum(roles) == 1, kind


def test_program_from_strings_and_back() -> None:
    rows = ["0F0 0SF0>1 0RB0<1 0B0 0STEP", "1RF0<0 1F0 1B0 1SB0>0 1STEP"]
    program = Program.from_strings(rows, placement=(0, 1), num_microbatches=1, name="tiny")
    assert program.to_strings() == rows
    assert program.actions[1][1] == Action(1, Kind.FORWARD, 0)
    assert (program.num_stages, program.num_ranks, program.name) == (2, 2, "tiny")
    # A mapping of rank -> row works too, and a rank with no row renders as empty.
    sparse = Program.from_strings({1: "1F0 1B0"}, placement=(0, 1), num_microbatches=1)
    assert sparse.to_strings() == ["", "1F0 1B0"]


def test_placement_queries() -> None:
    program = Program(placement=(0, 1, 1, 0), num_microbatches=2)
    assert program.num_stages == 4
    assert program.num_ranks == 2
    assert program.stages_of(0) == [0, 3]
    assert program.stages_of(1) == [1, 2]
    assert [program.rank_of(s) for s in range(4)] == [0, 1, 1, 0]

"""The validator: hand-broken programs are rejected with messages that point at the culprit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.schedules import (
    SCHEDULES,
    Action,
    DeadlockError,
    Edge,
    Kind,
    PipelineSpec,
    Program,
    ScheduleError,
    StageGraph,
    Tie,
    build_schedule,
    render_steps,
    validate,
)


def program(rows: list[str], num_microbatches: int = 1, name: str = "") -> Program:
    return Program.from_strings(rows, placement=range(len(rows)), num_microbatches=num_microbatches, name=name)


def rejects(broken: Program, error: type[ScheduleError] = ScheduleError) -> str:
    with pytest.raises(error) as raised:
        validate(broken)
    return str(raised.value)


def grid_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("step ", "rank "))]


def test_a_sound_program_passes_and_is_timed() -> None:
    timing = validate(program(["0F0 0SF0>1 0RB0<1 0B0 0STEP", "1RF0<0 1F0 1B0 1SB0>0 1STEP"]))
    assert timing.start == {0: [0, 1, 1, 3, 4], 1: [0, 1, 2, 3, 3]}
    assert timing.makespan == 4


def test_custom_costs_change_the_timing() -> None:
    gpipe = build_schedule(PipelineSpec("gpipe", 2, 2))
    timing = validate(gpipe, cost=lambda a: {Kind.FORWARD: 1.0, Kind.BACKWARD: 2.0}.get(a.kind, 0.0))
    assert timing.makespan == 3 * 1.0 + 3 * 2.0  # (m + p - 1) forwards and backwards on the critical path


def test_send_without_matching_receive() -> None:
    # Rank 1 forgot to post 1RF0<0: rank 0's 0SF0>1 has nobody to meet.
    broken = program(["0F0 0SF0>1 0RB0<1 0B0 0STEP", "1F0 1B0 1SB0>0 1STEP"], name="broken")
    message = rejects(broken)
    assert message.startswith(
        "broken: rank 0, action 1 (0SF0>1): send has no matching receive on rank 1 (link act of edge 0->1)"
    )
    assert "[0SF0>1]" in message
    assert grid_lines(message) == render_steps(broken, mark={(0, 1)}).splitlines()


def test_receive_without_matching_send() -> None:
    broken = program(["0F0 0RB0<1 0B0 0STEP", "1RF0<0 1F0 1B0 1SB0>0 1STEP"])
    message = rejects(broken)
    assert "rank 1, action 0 (1RF0<0): receive has no matching send on rank 0 (link act of edge 0->1)" in message
    assert grid_lines(message) == render_steps(broken, mark={(1, 0)}).splitlines()


def test_missing_transfer_altogether() -> None:
    # Neither 0SF0>1 nor 1RF0<0: rank 1's forward has no input.
    broken = program(["0F0 0RB0<1 0B0 0STEP", "1F0 1B0 1SB0>0 1STEP"])
    message = rejects(broken)
    assert "rank 1, action 0 (1F0): needs 1RF0<0, which has not run on this rank before it" in message
    assert "[1F0]" in message


def test_missing_gradient_receive() -> None:
    # 0RB0<1 dropped while 1SB0>0 stays: the gradient would have nowhere to land.
    broken = program(["0F0 0SF0>1 0B0 0STEP", "1RF0<0 1F0 1B0 1SB0>0 1STEP"])
    message = rejects(broken)
    assert "rank 1, action 3 (1SB0>0): send has no matching receive on rank 0 (link grad of edge 0->1)" in message
    assert "[1SB0>0]" in message


def test_backward_before_its_forward() -> None:
    message = rejects(program(["0B0 0F0 0STEP"]))
    assert "rank 0, action 0 (0B0): needs 0F0, which has not run on this rank before it" in message
    assert "[0B0]" in message


def test_backward_before_its_forward_on_a_later_rank() -> None:
    broken = program(["0F0 0SF0>1 0RB0<1 0B0 0STEP", "1RF0<0 1B0 1F0 1SB0>0 1STEP"])
    message = rejects(broken)
    assert "rank 1, action 1 (1B0): needs 1F0" in message
    assert grid_lines(message) == render_steps(broken, mark={(1, 1)}).splitlines()


def test_step_before_the_last_backward() -> None:
    message = rejects(program(["0F0 0F1 0B0 0STEP 0B1"], num_microbatches=2))
    assert "rank 0, action 3 (0STEP): needs 0B1" in message


def test_send_before_the_compute_that_produces_it() -> None:
    message = rejects(program(["0SF0>1 0F0 0RB0<1 0B0 0STEP", "1RF0<0 1F0 1B0 1SB0>0 1STEP"]))
    assert "rank 0, action 0 (0SF0>1): needs 0F0" in message


def test_receives_matched_out_of_order_on_a_channel() -> None:
    # Rank 0 sends micro-batch 0 then 1; rank 1 posts 1 then 0. Messages match in posting order.
    broken = program(
        ["0F0 0SF0>1 0F1 0SF1>1 0RB0<1 0B0 0RB1<1 0B1 0STEP", "1RF1<0 1RF0<0 1F0 1F1 1B0 1SB0>0 1B1 1SB1>0 1STEP"],
        num_microbatches=2,
    )
    message = rejects(broken)
    assert (
        "rank 1, action 0 (1RF1<0): message 0 on link act of edge 0->1 is sent as 0SF0>1 (rank 0) but received"
        " as this action" in message
    )
    assert grid_lines(message) == render_steps(broken, mark={(1, 0)}).splitlines()


def test_two_ranks_waiting_on_each_other_deadlock() -> None:
    # Rank 0 waits for rank 1's gradient before sending rank 1 the activation it needs.
    broken = program(["0F0 0RB0<1 0B0 0SF0>1 0STEP", "1RF0<0 1F0 1B0 1SB0>0 1STEP"], name="crossed")
    message = rejects(broken, DeadlockError)
    assert message.startswith("crossed deadlocks: ranks 0, 1 wait on each other in a cycle")
    assert "rank 0 waits at 0B0 for 1SB0>0 on rank 1" in message
    assert "rank 1 waits at 1F0 for 0SF0>1 on rank 0" in message
    assert grid_lines(message) == render_steps(broken, mark={(0, 2), (1, 1)}).splitlines()


def test_deadlock_names_only_the_ranks_in_the_cycle() -> None:
    # Ranks 1 and 2 wait on each other; rank 0 merely waits on rank 1 and is not part of the cycle.
    broken = program(
        [
            "0F0 0SF0>1 0RB0<1 0B0 0STEP",
            "1RF0<0 1F0 1RB0<2 1B0 1SF0>2 1SB0>0 1STEP",
            "2RF0<1 2F0 2B0 2SB0>1 2STEP",
        ]
    )
    message = rejects(broken, DeadlockError)
    assert "ranks 1, 2 wait on each other in a cycle" in message
    assert "rank 1 waits at 1B0 for 2SB0>1 on rank 2" in message
    assert "rank 2 waits at 2F0 for 1SF0>2 on rank 1" in message
    assert "rank 0 waits" not in message
    # The grid marks every stuck rank, rank 0 included.
    assert "[0B0]" in message and "[1B0]" in message and "[2F0]" in message


def test_missing_and_repeated_computes_are_listed() -> None:
    message = rejects(program(["0F0 0F0 0B0 0STEP", "1B0 1STEP"]))
    assert "missing ['1F0']" in message
    assert "repeated ['0F0']" in message
    assert grid_lines(message) == render_steps(program(["0F0 0F0 0B0 0STEP", "1B0 1STEP"])).splitlines()


def test_action_on_a_rank_that_does_not_own_its_stage() -> None:
    message = rejects(program(["0F0 1F0 0B0 0STEP", "1B0 1STEP"]))
    assert "rank 0, action 1 (1F0): stage 1 lives on rank 1, not rank 0" in message


def test_unknown_stage_and_micro_batch() -> None:
    assert "there is no stage 3 (stages 0..1)" in rejects(program(["0F0 3F0", "1F0"]))
    assert "rank 1, action 1 (1B2): no micro-batch 2 (0..1)" in rejects(program(["0F0", "1F0 1B2"], 2))


def test_transfer_to_a_stage_that_does_not_exist() -> None:
    message = rejects(program(["0RF0<1 0F0 0SF0>1 0RB0<1 0B0", "1RF0<0 1F0 1B0 1SB0>0"]))
    assert "rank 0, action 0 (0RF0<1): the stage graph has no edge from stage 1 to stage 0" in message
    message = rejects(program(["0RF0<7 0F0 0B0 0STEP"]))
    assert "rank 0, action 0 (0RF0<7): there is no stage 7 to talk to" in message


def test_transfer_between_stages_on_the_same_rank() -> None:
    same_rank = Program.from_strings(["0F0 0SF0>1 1RF0<0 1F0 1B0 0B0"], placement=(0, 0), num_microbatches=1)
    assert "both stages live on this rank" in rejects(same_rank)


@st.composite
def sound_programs(draw: st.DrawFn) -> Program:
    """A lowered program of any schedule, at sizes it accepts."""
    name = draw(st.sampled_from(sorted(SCHEDULES)))
    p = draw(st.integers(1, 4))
    m = draw(st.integers(2 * p, 2 * p + 4)) if name in ("zbv", "dualpipev") else draw(st.integers(max(1, p - 1), 6))
    if name == "interleaved-1f1b":
        m = p * draw(st.integers(1, 2))
    if SCHEDULES[name].asynchronous:  # a stream of mini-batches, and (pipedream) maybe vertical sync
        vertical = name == "pipedream" and draw(st.booleans())
        return build_schedule(PipelineSpec(name, p, m, vertical_sync=vertical), mini_batches=draw(st.integers(1, 3)))
    return build_schedule(PipelineSpec(name, p, m))


def counterpart(action: Action) -> Action:
    """The other end of a transfer (a send's receive and the reverse); a compute is its own."""
    if not action.kind.is_transfer:
        return action
    other = {Kind.SEND_F: Kind.RECV_F, Kind.RECV_F: Kind.SEND_F, Kind.SEND_B: Kind.RECV_B, Kind.RECV_B: Kind.SEND_B}
    assert action.peer is not None
    return Action(action.peer, other[action.kind], action.mb, action.stage)


@given(sound_programs(), st.data())
def test_removing_any_compute_or_transfer_is_caught(sound: Program, data: st.DataObject) -> None:
    rank = data.draw(st.integers(0, sound.num_ranks - 1))
    # STEP is left alone: the validator does not require one (an asynchronous schedule steps more often).
    # So is every W: without it that micro-batch's B is the whole backward, which is sound.
    removable = [i for i, a in enumerate(sound.actions[rank]) if a.kind not in (Kind.STEP, Kind.WEIGHT)]
    index = data.draw(st.sampled_from(removable))
    removed = sound.actions[rank][index]
    broken = sound.derive(
        {r: [a for i, a in enumerate(acts) if (r, i) != (rank, index)] for r, acts in sound.actions.items()}
    )
    with pytest.raises(ScheduleError) as raised:
        validate(broken)
    # Above its grid (which every error shows), the message names the removed action or the other end of its
    # transfer: the one left without its partner.
    said = str(raised.value).split("\nstep ")[0]
    assert str(removed) in said or str(counterpart(removed)) in said, (removed, said)


@given(sound_programs(), st.data())
def test_repeating_any_compute_is_caught(sound: Program, data: st.DataObject) -> None:
    rank = data.draw(st.integers(0, sound.num_ranks - 1))
    twice = data.draw(st.sampled_from([a for a in sound.actions[rank] if a.kind.is_compute]))
    repeated = sound.derive({r: acts + ([twice] if r == rank else []) for r, acts in sound.actions.items()})
    with pytest.raises(ScheduleError, match=f"repeated \\['{twice}'\\]"):
        validate(repeated)


def test_a_repeated_step_is_rejected() -> None:
    program = Program.from_strings(["0F0 0B0 0STEP 0STEP"], placement=[0], num_microbatches=1)
    with pytest.raises(ScheduleError, match=r"repeated \['0STEP'\]"):
        validate(program)


TIED = StageGraph.chain(2, [Tie(((0, "embed.weight"), (1, "head.weight")))])


def test_a_step_waits_for_every_tied_stage_to_offer_its_gradients() -> None:
    # Rank 1 finishes early, offers its shared gradient, and its STEP waits for rank 0's offer.
    sound = Program.from_strings(
        ["0F0 0SF0>1 0RB0<1 0B0 0RD 0STEP", "1RF0<0 1F0 1B0 1SB0>0 1RD 1STEP"], (0, 1), 1, graph=TIED
    )
    timing = validate(sound)
    assert timing.start[1][-1] == 4.0  # 1STEP starts when 0RD is offered, after 0B0 ends at 4
    missing = Program.from_strings(
        ["0F0 0SF0>1 0RB0<1 0B0 0STEP 0RD", "1RF0<0 1F0 1B0 1SB0>0 1RD 1STEP"], (0, 1), 1, graph=TIED
    )
    assert "rank 0, action 4 (0STEP): needs 0RD, which has not run on this rank before it" in rejects(missing)


def test_a_reduction_before_the_last_backward_is_caught() -> None:
    early = Program.from_strings(
        ["0F0 0SF0>1 0RD 0RB0<1 0B0 0STEP", "1RF0<0 1F0 1B0 1SB0>0 1RD 1STEP"], (0, 1), 1, graph=TIED
    )
    assert "rank 0, action 2 (0RD): needs 0B0" in rejects(early)


def test_a_reduction_of_a_stage_that_shares_nothing_is_caught() -> None:
    stray = program(["0F0 0SF0>1 0RB0<1 0B0 0RD 0STEP", "1RF0<0 1F0 1B0 1SB0>0 1STEP"])
    assert "rank 0, action 4 (0RD): stage 0 shares no parameter with another stage" in rejects(stray)


def test_tied_stages_that_reduce_for_different_steps_are_caught() -> None:
    one_sided = Program.from_strings(
        ["0F0 0SF0>1 0RB0<1 0B0 0RD 0STEP", "1RF0<0 1F0 1B0 1SB0>0 1STEP"], (0, 1), 1, graph=TIED
    )
    message = rejects(one_sided)
    assert "stages 0 and 1 share a parameter but reduce for different steps" in message


def test_a_step_waiting_for_a_reduction_that_waits_on_it_deadlocks() -> None:
    # Rank 1 steps (waiting for stage 0's offer) before sending the gradient stage 0 needs for its backward.
    crossed = Program.from_strings(
        ["0F0 0SF0>1 0RB0<1 0B0 0RD 0STEP", "1RF0<0 1F0 1B0 1RD 1STEP 1SB0>0"], (0, 1), 1, graph=TIED
    )
    message = rejects(crossed, DeadlockError)
    assert "rank 1 waits at 1STEP for 0RD on rank 0" in message
    assert "rank 0 waits at 0B0 for 1SB0>0 on rank 1" in message


def test_a_skipped_value_must_arrive_on_its_own_edge() -> None:
    graph = StageGraph(3, (Edge(0, 1), Edge(1, 2), Edge(0, 2, (1,), grad=False)))
    rows = ["0F0 0SF0>1 0SF0>2 0RB0<1 0B0", "1RF0<0 1F0 1SF0>2 1RB0<2 1B0 1SB0>0", "2RF0<0 2RF0<1 2F0 2B0 2SB0>1"]
    validate(Program.from_strings(rows, range(3), 1, graph=graph))
    without = ["0F0 0SF0>1 0RB0<1 0B0", rows[1], "2RF0<1 2F0 2B0 2SB0>1"]
    assert "rank 2, action 1 (2F0): needs 2RF0<0" in rejects(Program.from_strings(without, range(3), 1, graph=graph))
    grad_back = [rows[0], rows[1], "2RF0<0 2RF0<1 2F0 2B0 2SB0>0 2SB0>1"]
    message = rejects(Program.from_strings(grad_back, range(3), 1, graph=graph))
    assert "rank 2, action 4 (2SB0>0): the edge 0->2 carries no gradient" in message


@st.composite
def graphs(draw: st.DrawFn, num_stages: int) -> StageGraph:
    """A chain with random skip edges (some without gradient) and random ties."""
    edges = [Edge(s, s + 1) for s in range(num_stages - 1)]
    for src in range(num_stages):
        for dst in range(src + 2, num_stages):
            if draw(st.booleans()):
                edges.append(Edge(src, dst, (0,), grad=draw(st.booleans())))
    ties = []
    if num_stages > 1 and draw(st.booleans()):
        stages = draw(st.lists(st.integers(0, num_stages - 1), min_size=2, max_size=3, unique=True))
        ties.append(Tie(tuple((s, f"shared.{s}") for s in sorted(stages))))
    return StageGraph(num_stages, tuple(edges), tuple(ties))


@given(st.data())
def test_every_schedule_is_sound_on_any_stage_graph(data: st.DataObject) -> None:
    """Skip edges and ties change the transfers and add reductions; the program stays sound."""
    name = data.draw(st.sampled_from(sorted(SCHEDULES)))
    info = SCHEDULES[name]
    p = data.draw(st.integers(1, 4))
    v = info.default_virtual
    m = data.draw(st.integers(2 * p, 2 * p + 3)) if name in ("zbv", "dualpipev") else data.draw(st.integers(1, 5))
    if name == "interleaved-1f1b":
        m = p * data.draw(st.integers(1, 2))
    if name == "pipedream-2bw":
        m = max(m, p - 1)  # a forward would need a weight version not yet made
    graph = data.draw(graphs(p * v))
    program = build_schedule(PipelineSpec(name, p, m), graph=graph)
    for edge in graph.edges:
        if program.same_rank(edge.src, edge.dst):
            continue
        ends = (edge.src, edge.dst)
        sends = [a for acts in program.actions.values() for a in acts if a.kind is Kind.SEND_F and a.link[1:] == ends]
        assert len(sends) == m, f"{name}: edge {edge} carries {len(sends)} messages for {m} micro-batches"
    reductions = {a.stage for acts in program.actions.values() for a in acts if a.kind is Kind.REDUCE}
    assert reductions == {s for tie in graph.ties for s in tie.stages}


def test_a_step_between_a_forward_and_its_backward_needs_weight_versions() -> None:
    unstashed = Program.from_strings(["0F0 0F1 0B0 0STEP0 0B1 0STEP1"], placement=[0], num_microbatches=2)
    message = rejects(unstashed)
    assert "rank 0, action 3 (0STEP0): steps while micro-batches [1] of stage 0 wait for their backward" in message
    unstashed.weight_versions = {(0, 0): 0, (0, 1): 0}
    validate(unstashed)  # with versions, micro-batch 1's backward uses the version its forward used


def test_a_forward_cannot_use_a_version_its_stage_has_not_made() -> None:
    program = Program.from_strings(["0F0 0B0 0STEP0 0F1 0B1 0STEP1"], placement=[0], num_microbatches=2)
    program.weight_versions = {(0, 0): 0, (0, 1): 2}
    assert "rank 0, action 3 (0F1): uses weight version 2, but stage 0 has made versions 0..1" in rejects(program)

"""Activation offload as program actions: where lowering puts them, what the validator refuses, what they cost."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.cli import main
from conveyor.observe.simulate import parse_costs, simulate
from conveyor.schedules import (
    SCHEDULES,
    Kind,
    PipelineSpec,
    Program,
    ScheduleError,
    build_schedule,
    forward_only,
    insert_offloads,
    lower,
    offload_stages,
    offloaded,
    one_f_one_b,
    parse_action,
    validate,
)


def one_rank(row: str, m: int) -> Program:
    return Program.from_strings([row], placement=[0], num_microbatches=m, name="offload")


def test_offload_after_the_forward_and_its_sends_and_reload_one_compute_before_the_backward() -> None:
    lowered = lower(one_f_one_b(2, 4), prefetch=False)
    # Only micro-batches 1 and 2 of stage 0 have two computes between forward and backward.
    assert insert_offloads(lowered, {0, 1}, min_between=2).to_strings() == [
        "0F0 0SF0>1 0F1 0SF1>1 0OF1 0RB0<1 0B0 0RL1 0F2 0SF2>1 0OF2 0RB1<1 0B1 0RL2 0F3 0SF3>1 0RB2<1 0B2 0RB3<1 0B3"
        " 0STEP",
        "1RF0<0 1F0 1B0 1SB0>0 1RF1<0 1F1 1B1 1SB1>0 1RF2<0 1F2 1B2 1SB2>0 1RF3<0 1F3 1B3 1SB3>0 1STEP",
    ]


def test_by_default_a_micro_batch_needs_three_computes_between_forward_and_backward() -> None:
    program = build_schedule(PipelineSpec("1f1b", 4, 8, offload={0, 1, 2, 3}))
    # Rank r keeps w = 4 - r in flight: 2(w - 1) computes between a steady micro-batch's forward and backward
    # (6, 4, 2, 0); on rank 1 the first and last micro-batches have 2.
    assert sorted(mb for s, mb in offloaded(program) if s == 0) == list(range(8))
    assert sorted(mb for s, mb in offloaded(program) if s == 1) == [1, 2, 3, 4, 5, 6]
    assert {s for s, _ in offloaded(program)} == {0, 1}
    assert (
        build_schedule(PipelineSpec("1f1b", 4, 8, offload={3})).to_strings()
        == build_schedule(PipelineSpec("1f1b", 4, 8)).to_strings()
    )


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(SCHEDULES)), p=st.integers(1, 4), extra=st.integers(0, 4), data=st.data())
def test_every_schedule_with_any_stages_offloaded_still_validates(
    name: str, p: int, extra: int, data: st.DataObject
) -> None:
    info = SCHEDULES[name]
    m = p + extra  # what every schedule accepts: a multiple of p when interleaved, 2p and more on a V
    if name == "interleaved-1f1b":
        m = p * (1 + extra % 2)
    elif info.default_virtual == 2:
        m += p
    stages = p * info.default_virtual
    chosen = data.draw(st.sets(st.integers(0, stages - 1)))
    kwargs = {"mini_batches": 2} if info.asynchronous else {}
    program = build_schedule(PipelineSpec(name, p, m, offload=chosen), **kwargs)  # validates
    for stage, mb in offloaded(program):
        assert stage in chosen
        rank = program.rank_of(stage, mb)
        actions = program.actions[rank]
        f, of, rl, b = (actions.index(parse_action(f"{stage}{kind}{mb}")) for kind in ("F", "OF", "RL", "B"))
        assert f < of < rl < b


def test_forward_only_programs_offload_nothing() -> None:
    program = build_schedule(PipelineSpec("1f1b", 2, 4, offload={0, 1}), forward_only=True)
    assert not offloaded(program)
    forwards = forward_only(one_f_one_b(2, 4))
    assert insert_offloads(forwards, {0}).to_strings() == forwards.to_strings()


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ("0F0 0F1 0F2 0OF0 0B0 0RL0 0B1 0B2", "action 4 (0B0): needs 0RL0, which has not run on this rank before it"),
        ("0F0 0F1 0RL0 0OF0 0B0 0B1", "action 2 (0RL0): needs 0OF0, which has not run on this rank before it"),
        ("0OF0 0F0 0F1 0RL0 0B0 0B1", "action 0 (0OF0): needs 0F0, which has not run on this rank before it"),
        ("0F0 0OF0 0F1 0RL0 0OF0 0B0 0B1", "repeated ['0OF0']"),
        ("0F0 0B0 0OF0 0RL0 0F1 0B1", "action 1 (0B0): needs 0RL0"),
    ],
)
def test_the_validator_refuses_offloads_out_of_order(row: str, why: str) -> None:
    with pytest.raises(ScheduleError) as raised:
        validate(one_rank(row, 3 if "0F2" in row else 2))
    assert why in str(raised.value)


def test_a_forward_only_program_cannot_offload() -> None:
    program = one_rank("0F0 0OF0 0F1", 2)
    program.forward_only = True
    with pytest.raises(ScheduleError, match="a forward-only program runs forwards and their transfers only"):
        validate(program)


def test_the_backward_waits_for_its_reload_on_the_copy_stream() -> None:
    program = one_rank("0F0 0OF0 0F1 0F2 0B2 0RL0 0B1 0B0", 3)
    costs = parse_costs("f=1,b=1,w=1,offload=3,bytes=10")
    result = simulate(program, costs)
    # F0 0-1; its offload copies 1-4 beside F1 1-2, F2 2-3 and B2 3-5 (whole: 2); the reload copies 5-8 beside
    # B1 5-7, and B0 waits for it: 8-10.
    assert result.timing.start[0] == [0, 1, 1, 2, 3, 5, 5, 8]
    assert result.timing.copies[0] == {1: (1, 4), 5: (5, 8)}
    assert result.step_time == 10
    # Held: 3 after F2; micro-batch 0 leaves at 4, is back at 5.
    assert result.peak_activations == [3]
    assert result.peak_activation_bytes == [30.0]


def test_without_a_copy_stream_the_rank_copies() -> None:
    program = one_rank("0F0 0OF0 0F1 0F2 0B2 0RL0 0B1 0B0", 3)
    result = simulate(program, parse_costs("f=1,b=1,w=1,offload=3,bytes=10,copystream=0"))
    assert result.timing.start[0] == [0, 1, 4, 5, 6, 8, 11, 13]
    assert result.step_time == 15
    assert result.peak_activations == [2]  # micro-batch 0 left before F1 began


def test_offloaded_bytes_leave_only_their_share() -> None:
    program = one_rank("0F0 0OF0 0F1 0F2 0B2 0RL0 0B1 0B0", 3)
    result = simulate(program, parse_costs("f=1,b=1,w=1,offload=0,bytes=10,offloaded=8"))
    assert result.peak_activations == [2]
    assert result.peak_activation_bytes == [22.0]  # 2 micro-batches whole, and what micro-batch 0 kept


@pytest.mark.parametrize(
    ("name", "p", "m", "before", "after"),
    [("1f1b", 4, 8, 4, 3), ("1f1b", 8, 16, 8, 3), ("v-half", 8, 16, 10, 4), ("v-min", 8, 16, 8, 5)],
)
def test_offload_flattens_the_peak_at_no_cost_while_copies_are_faster_than_computes(
    name: str, p: int, m: int, before: int, after: int
) -> None:
    costs = parse_costs("f=1,b=1,w=1,offload=0.5")
    stages = p * SCHEDULES[name].default_virtual
    plain = simulate(build_schedule(PipelineSpec(name, p, m)), costs)
    moved = simulate(build_schedule(PipelineSpec(name, p, m, offload=range(stages))), costs)
    assert (max(plain.peak_activations), max(moved.peak_activations)) == (before, after)
    assert moved.step_time == plain.step_time


def test_slow_copies_cost_time() -> None:
    program = build_schedule(PipelineSpec("1f1b", 4, 8, offload={0, 1, 2, 3}))
    fast = simulate(program, parse_costs("f=1,b=1,w=1,offload=0.5"))
    slow = simulate(program, parse_costs("f=1,b=1,w=1,offload=2"))
    busy = simulate(program, parse_costs("f=1,b=1,w=1,offload=0.5,copystream=0"))
    assert fast.step_time < slow.step_time and fast.step_time < busy.step_time


def test_offload_stages_reads_names_and_lists() -> None:
    assert offload_stages("none", 4) == frozenset()
    assert offload_stages("all", 3) == {0, 1, 2}
    assert offload_stages("0,2", 4) == {0, 2}
    assert offload_stages([1], 4) == {1}
    with pytest.raises(ValueError, match="offload names stages \\[4\\], but the model has stages 0..3"):
        offload_stages("1,4", 4)
    with pytest.raises(ValueError, match="offload is 'none', 'all' or stage indices"):
        offload_stages("some", 4)
    with pytest.raises(ValueError, match="at least 2 computes"):
        insert_offloads(lower(one_f_one_b(2, 2)), {0}, min_between=1)


def test_simulate_and_show_take_offload(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--ranks", "4", "--microbatches", "8", "--offload", "all"]
    assert main(["simulate", "--schedule", "1f1b", *args, "--costs", "f=1,b=1,w=1,offload=0.5"]) == 0
    assert "peak activations [3, 3, 2, 1]" in capsys.readouterr().out
    assert main(["show", "1f1b", *args]) == 0
    assert "0OF1" in capsys.readouterr().out


def test_a_kind_of_its_own() -> None:
    assert Kind.OFFLOAD.is_host_copy and not Kind.OFFLOAD.is_compute and not Kind.RELOAD.is_transfer


def test_traces_show_host_copies_on_a_track_of_their_own(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from conveyor.observe.trace import Recorder, write_chrome_trace
    from conveyor.schedules import Action

    recorder = Recorder(0)
    for action in (Action(0, Kind.FORWARD, 1), Action(0, Kind.OFFLOAD, 1), Action(0, Kind.RELOAD, 1)):
        recorder.action_started(action)
        recorder.action_ended(action)
    assert [span.kind for _, span in recorder.spans] == ["F", "OF", "RL"]
    events = json.loads(write_chrome_trace(recorder.spans, tmp_path / "trace.json").read_text())["traceEvents"]
    tracks = {e["name"]: e["tid"] for e in events if e["ph"] == "X"}
    assert tracks == {"0F1": 0, "0OF1": 2, "0RL1": 2}
    assert {"name": "thread_name", "ph": "M", "pid": 0, "tid": 2, "args": {"name": "host copies"}} in events

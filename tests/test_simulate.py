"""The simulator against closed forms (F = B = W, no latency), and the `conveyor simulate` command."""

from __future__ import annotations

import json

import pytest

from conveyor.cli import main
from conveyor.observe.simulate import CostModel, StageCosts, load_costs, parse_costs, save_costs, simulate
from conveyor.schedules import DeadlockError, PipelineSpec, Program, build_schedule

EQUAL = parse_costs("f=1,b=1,w=1")


def bubble_time(result) -> float:  # type: ignore[no-untyped-def]
    """Mean idle time of a rank within the longest rank's own span (the papers' bubble; cheaper to simulate than
    the steady-state period, which equals that span for zbv with equal costs: see the zbv test below)."""
    return sum(result.rank_span - busy for busy in result.busy) / len(result.busy)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 7, 16])
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(name: str, p: int, m: int) -> None:
    result = simulate(build_schedule(PipelineSpec(name, p, m)), EQUAL)
    assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert result.step_time == pytest.approx(3 * (m + p - 1))


@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("m_per_p", [1, 2, 3])
def test_zb_h1_bubble_time_is_a_third_of_1f1b(p: int, m_per_p: int) -> None:
    m = p * m_per_p
    one_f_one_b = simulate(build_schedule(PipelineSpec("1f1b", p, m)), EQUAL)
    zb_h1 = simulate(build_schedule(PipelineSpec("zb-h1", p, m)), EQUAL)
    assert bubble_time(zb_h1) == pytest.approx(bubble_time(one_f_one_b) / 3)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 6, 8])
def test_zb_h2_has_no_bubble_from_2p_minus_1_micro_batches(p: int) -> None:
    for m in range(2 * p - 1, 4 * p + 1):
        assert bubble_time(simulate(build_schedule(PipelineSpec("zb-h2", p, m)), EQUAL)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_zbv_has_no_bubble_from_2p_minus_1_micro_batches(p: int) -> None:
    half = parse_costs("f=0.5,b=0.5,w=0.5")  # two stages per rank, each half the model
    for m in range(2 * p - 1, 4 * p + 1):
        assert bubble_time(simulate(build_schedule(PipelineSpec("zbv", p, m)), half)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("v", [2, 3, 4])
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_interleaved_bubble_time_is_1_over_v_of_1f1b(p: int, v: int, rounds: int) -> None:
    m = p * rounds
    share = parse_costs(f"f={1 / v},b={1 / v},w={1 / v}")  # v stages per rank share the rank's work
    interleaved = simulate(build_schedule(PipelineSpec("interleaved-1f1b", p, m, v)), share)
    one_f_one_b = simulate(build_schedule(PipelineSpec("1f1b", p, m)), EQUAL)
    assert bubble_time(interleaved) == pytest.approx(bubble_time(one_f_one_b) / v)


def test_zbv_step_counts_the_ranks_offsets_and_its_period_does_not() -> None:
    """The picture of zbv on 4 ranks ends at 51; each rank is busy 48 and, back to back, starts again at once."""
    result = simulate(build_schedule(PipelineSpec("zbv", 4, 8)), EQUAL)
    assert result.step_time == pytest.approx(51.0)
    assert result.step_time == pytest.approx(result.timing.makespan)
    assert result.rank_span == pytest.approx(48.0)
    assert result.period == pytest.approx(48.0)
    assert result.bubble_fraction == pytest.approx(3 / 51)
    assert result.period_bubble_fraction == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1"])
def test_period_of_a_pipeline_whose_first_rank_is_its_critical_path_is_its_step(name: str) -> None:
    result = simulate(build_schedule(PipelineSpec(name, 3, 6)), EQUAL)
    assert result.period == pytest.approx(result.step_time)


def test_a_slow_last_rank_sets_the_period_and_steps_cannot_overlap_under_1f1b() -> None:
    costs = parse_costs("f=1,b=1,w=1;f=2,b=2,w=2")  # rank 1 is twice as slow
    result = simulate(build_schedule(PipelineSpec("1f1b", 2, 8)), costs)
    # Rank 0's first forward, rank 1's 8 x 6, rank 0's last whole backward; rank 0's next step's first
    # forward follows that backward, so back-to-back steps repeat every 51 as well.
    assert result.step_time == pytest.approx(1 + 48 + 2)
    assert result.period == pytest.approx(51.0)


def test_repeated_steps_form_one_valid_program() -> None:
    from conveyor.observe.simulate import repeat_steps

    program = build_schedule(PipelineSpec("zbv", 2, 4))
    twice = repeat_steps(program, 2)
    assert twice.num_microbatches == 8
    assert sum(a.kind.name == "STEP" for a in twice.actions[0]) == 2 * sum(
        a.kind.name == "STEP" for a in program.actions[0]
    )
    one = simulate(program, EQUAL)
    both = simulate(twice, EQUAL)
    assert one.step_time < both.step_time < 2 * one.step_time  # the second step starts before the first ends


def test_the_optimizer_step_costs_what_the_model_says() -> None:
    plain = simulate(build_schedule(PipelineSpec("1f1b", 2, 4)), parse_costs("f=1,b=1,w=1"))
    stepped = simulate(build_schedule(PipelineSpec("1f1b", 2, 4)), CostModel((StageCosts(step=5.0),)))
    assert stepped.step_time == pytest.approx(plain.step_time + 5.0)


@pytest.mark.parametrize("p", [1, 2, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_peak_activations(p: int, m: int) -> None:
    assert simulate(build_schedule(PipelineSpec("1f1b", p, m)), EQUAL).peak_activations == [
        min(p - i, m) for i in range(p)
    ]
    assert simulate(build_schedule(PipelineSpec("gpipe", p, m)), EQUAL).peak_activations == [m] * p
    assert max(simulate(build_schedule(PipelineSpec("zb-h1", p, m)), EQUAL).peak_activations) <= min(p, m)
    assert max(simulate(build_schedule(PipelineSpec("zb-h2", p, m)), EQUAL).peak_activations) <= 2 * p - 1


def test_peak_bytes_weigh_each_stage() -> None:
    costs = CostModel((StageCosts(activation_bytes=100.0), StageCosts(activation_bytes=7.0)))
    result = simulate(build_schedule(PipelineSpec("1f1b", 2, 4)), costs)
    assert result.peak_activations == [2, 1]
    assert result.peak_activation_bytes == [200.0, 7.0]


def test_latency_and_per_stage_costs_lengthen_the_step() -> None:
    base = simulate(build_schedule(PipelineSpec("gpipe", 2, 1)), parse_costs("f=1,b=1,w=0"))
    assert base.step_time == pytest.approx(4.0)  # F0 F1 B1 B0 in a chain
    slow = simulate(build_schedule(PipelineSpec("gpipe", 2, 1)), parse_costs("f=1,b=1,w=0;f=3,b=2,w=0,comm=0.5"))
    assert slow.step_time == pytest.approx(1 + 0.5 + 3 + 2 + 0.5 + 1)


def test_sends_and_receive_posts_keep_their_rank_busy() -> None:
    # 0F0 0SF0>1 0RB0<1 0B0 on rank 0; 1RF0<0 1F0 1B0 1SB0>0 on rank 1: both sends are on the chain.
    program = build_schedule(PipelineSpec("gpipe", 2, 1))
    sent = simulate(program, parse_costs("f=1,b=1,w=0,send=0.25,comm=0.5"))
    assert sent.step_time == pytest.approx(4 + 2 * 0.25 + 2 * 0.5)
    posted = simulate(program, parse_costs("f=1,b=1,w=0,send=0.25,recv=0.125,comm=0.5"))
    assert posted.step_time == pytest.approx(sent.step_time)  # each post runs while its rank waits anyway
    assert posted.busy == pytest.approx([2 + 0.25 + 0.125] * 2)  # and counts as work, not bubble
    # A post longer than the wait delays the forward behind it: rank 1 posts until 2, then F, B; rank 0's B.
    assert simulate(program, parse_costs("f=1,b=1,w=0,recv=2")).step_time == pytest.approx(5.0)


def test_a_receive_posted_after_its_message_arrived_costs_late() -> None:
    # Rank 1 posts 1RF1 when 0SF1 has just arrived, and rank 0 posts 0RB1 when 1SB1 has: both are late.
    # Rank 1: RF0, F0 [1, 2], RF1 late [2, 2.5], F1, B0, SB0 at 4.5, B1, SB1 at 5.5. Rank 0: F0, F1, RB0 posted
    # early at 2, B0 [4.5, 5.5], RB1 late [5.5, 6], B1 [6, 7].
    program = Program.from_strings(
        [
            "0F0 0SF0>1 0F1 0SF1>1 0RB0<1 0B0 0RB1<1 0B1 0STEP",
            "1RF0<0 1F0 1RF1<0 1F1 1B0 1SB0>0 1B1 1SB1>0 1STEP",
        ],
        placement=[0, 1],
        num_microbatches=2,
    )
    assert simulate(program, parse_costs("f=1,b=1,w=0")).step_time == pytest.approx(6.0)
    late = simulate(program, parse_costs("f=1,b=1,w=0,recv=0.1,late=0.5"))
    assert late.step_time == pytest.approx(7.0)
    assert late.busy == pytest.approx([4 + 0.1 + 0.5] * 2)  # one early post at 0.1, one late at 0.5 each


def test_costs_for_the_wrong_number_of_stages_are_refused() -> None:
    with pytest.raises(ValueError, match="3 stages; the schedule has 2"):
        simulate(build_schedule(PipelineSpec("1f1b", 2, 2)), parse_costs("f=1;f=1;f=1"))


def test_unknown_cost_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown cost 'x'"):
        parse_costs("f=1,x=2")


def test_a_deadlocking_program_is_reported_with_its_ranks_and_actions() -> None:
    # Rank 0 sends its activation only after its backward, which needs rank 1's gradient.
    program = Program.from_strings(
        ["0F0 0RB0<1 0B0 0SF0>1 0STEP", "1RF0<0 1F0 1B0 1SB0>0 1STEP"], placement=[0, 1], num_microbatches=1
    )
    with pytest.raises(DeadlockError) as error:
        simulate(program, EQUAL)
    message = str(error.value)
    assert "rank 0 waits at 0B0 for 1SB0>0 on rank 1" in message
    assert "rank 1 waits at 1F0 for 0SF0>1 on rank 0" in message


def test_cost_files_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    costs = CostModel(
        (StageCosts(0.1, 0.2, 0.05, 1e6, 0.22), StageCosts(0.2, 0.1, 0.1, 2e6)),
        latency=0.001,
        send=2e-4,
        recv=1e-4,
        late_recv=3e-3,
    )
    path = tmp_path / "costs.json"
    save_costs(costs, path)
    assert load_costs(str(path)) == costs


def test_cli_json(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["simulate", "--schedule", "1f1b", "--ranks", "4", "--microbatches", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schedule"] == "1f1b" and report["ranks"] == 4 and report["microbatches"] == 8
    assert report["bubble_fraction"] == pytest.approx(3 / 11)
    assert report["peak_activations"] == [4, 3, 2, 1]
    assert report["step_time"] == pytest.approx(33.0)
    assert report["period"] == pytest.approx(33.0)


def test_cli_says_which_time_is_which(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["simulate", "--schedule", "zbv", "--ranks", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    assert "step time        51 (synchronous" in out
    assert "period           48 (steady state" in out


def test_cli_plot_writes_a_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    out = tmp_path / "timeline.png"
    assert main(["simulate", "--schedule", "zbv", "--ranks", "2", "--microbatches", "4", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(120)  # it measures what a message costs between 2 spawned ranks
def test_cli_profile_writes_costs_that_simulate_reads(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    sizes = ["--layers", "2", "--dim", "32", "--heads", "2", "--context", "16", "--batch-size", "4"]
    out = tmp_path / "costs.json"
    assert main(["profile", *sizes, "--microbatches", "2", "--out", str(out)]) == 0
    assert "each message: send" in capsys.readouterr().out
    costs = load_costs(str(out))
    assert len(costs.stages) == 2 and all(c.forward > 0 and c.whole_backward > 0 for c in costs.stages)
    assert costs.late_recv is not None and min(costs.latency, costs.send, costs.recv, costs.late_recv) > 0  # measured
    assert main(["simulate", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "2", "--costs", str(out)]) == 0
    assert main(["profile", *sizes, "--microbatches", "2", "--out", str(out), "--no-transfers"]) == 0
    free = load_costs(str(out))
    assert (free.send, free.recv, free.latency, free.late_recv) == (0, 0, 0, None)


def test_a_whole_backward_costs_what_the_model_says() -> None:
    """Unsplit backwards (all of 1f1b's, zbv's fused ones) cost `whole`, split ones B and W."""
    cheaper = parse_costs("f=1,b=1,w=1,whole=1.5")
    assert cheaper.of(0).whole_backward == 1.5 and parse_costs("f=1,b=1,w=1").of(0).whole_backward == 2.0
    one_f_one_b = build_schedule(PipelineSpec("1f1b", 4, 8))
    assert simulate(one_f_one_b, cheaper).step_time == pytest.approx((8 + 4 - 1) * (1 + 1.5))
    zbv = build_schedule(PipelineSpec("zbv", 2, 8))  # lowering ran stage 0's and stage 2's backwards whole
    assert simulate(zbv, cheaper).step_time < simulate(zbv, parse_costs("f=1,b=1,w=1")).step_time


def test_profile_times_f_b_w_and_a_whole_backward() -> None:
    import torch
    from torch import nn

    from conveyor.observe.profile import profile_stages

    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)) for _ in range(2)]
    x, y = torch.randn(64, 256), torch.randn(64, 256)
    costs = profile_stages(stages, x, y, nn.functional.mse_loss, repeats=3, warmup=1)
    first, second = costs.stages
    for stage in costs.stages:
        assert stage.forward > 0 and stage.weight > 0 and stage.whole is not None and stage.whole > 0
    # The first stage has no input gradient: its B returns at once and its W is the whole backward.
    assert first.backward < 0.2 * first.weight
    assert second.backward > 0.2 * second.weight  # the second computes its input's gradient in B


def test_the_reduction_of_tied_gradients_is_timed_and_drawn() -> None:
    from conveyor.observe.timeline import spans_from_timing
    from conveyor.schedules import StageGraph, Tie

    tied = build_schedule(PipelineSpec("1f1b", 2, 2), graph=StageGraph.chain(2, [Tie(((0, "embed"), (1, "head")))]))
    plain = simulate(build_schedule(PipelineSpec("1f1b", 2, 2)), CostModel((StageCosts(1, 1, 1),), latency=0.5))
    result = simulate(tied, CostModel((StageCosts(1, 1, 1, reduce=2.0),), latency=0.5))
    # Rank 0 finishes last; its REDUCE (2) then the offer's trip to rank 1 (0.5) end rank 1's step.
    assert result.timing.makespan == plain.timing.makespan + 2.0 + 0.5
    reductions = [s for s in spans_from_timing(tied, result.timing) if s.kind == "RD"]
    assert [(s.rank, s.stage, s.mb, s.end - s.start) for s in reductions] == [(0, 0, None, 2.0), (1, 1, None, 2.0)]


def test_the_period_of_tied_and_replicated_programs_repeats_their_reductions() -> None:
    from conveyor.schedules import StageGraph, Tie

    tied = build_schedule(PipelineSpec("1f1b", 2, 4), graph=StageGraph.chain(2, [Tie(((0, "embed"), (1, "head")))]))
    replicated = build_schedule(PipelineSpec("1f1b", 3, 4, replicas=(2, 1)))
    for program in (tied, replicated):
        result = simulate(program, CostModel((StageCosts(1, 1, 1, reduce=0.5),), latency=0.25))
        assert 0 < result.period <= result.step_time
    assert (
        simulate(build_schedule(PipelineSpec("pipedream", 2, 4), mini_batches=2), EQUAL).period == 0.0
    )  # a stream: no period

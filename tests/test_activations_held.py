"""A rank holds no more activations than its schedule needs.

A schedule says how many micro-batches each stage holds at once: from its forward to its backward (its W,
when the backward is split). Several stages in one process hold exactly that, each stage counted in units
of what one micro-batch of it keeps (`track_memory`); and a sent output is let go once its gradient
came back (its send was done by then), not kept by the transport until the end of the step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conveyor import Pipeline, PipelineSpec, Program, spawn
from conveyor.schedules import Kind, build_schedule


def needed(program: Program, rank: int) -> dict[int, int]:
    """Per stage of `rank`: the most micro-batches it holds at once by its program."""
    split = {(a.stage, a.mb) for a in program.actions[rank] if a.kind is Kind.WEIGHT}
    held: dict[int, int] = dict.fromkeys(program.stages_of(rank), 0)
    most = dict(held)
    for action in program.actions[rank]:
        frees = Kind.WEIGHT if (action.stage, action.mb) in split else Kind.BACKWARD
        if action.kind is Kind.FORWARD:
            held[action.stage] += 1
            most[action.stage] = max(most[action.stage], held[action.stage])
        elif action.kind is frees:
            held[action.stage] -= 1
    return most


def _local_stages(rank: int, world: int) -> None:
    m, v = 8, 4
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)) for _ in range(v)])
    x = torch.randn(4 * m, 16)
    for schedule in ("interleaved-1f1b", "looped-bfs", "zbv"):
        virtual = 2 if schedule == "zbv" else v
        spec = PipelineSpec(schedule, 1, m, virtual=virtual)
        pipe = Pipeline.from_model(model, spec, loss_fn=lambda o, t: o.pow(2).mean())
        pipe.track_memory = True
        pipe.step(x, x)
        expected = needed(build_schedule(spec), 0)
        for s, stage in pipe.stages.items():
            one = type(stage)(stage.module, s, stage.num_stages, stage.loss_fn, track_memory=True)
            inputs = torch.randn(4, 16, requires_grad=s > 0)
            one.forward(0, inputs if s == 0 else [inputs], torch.zeros(4, 16))
            held = stage.peak_held_bytes / one.held_bytes
            assert held == expected[s], (
                f"{schedule}: stage {s} held {held} micro-batches; its schedule needs {expected[s]}"
            )
            assert stage.held_bytes == 0, f"{schedule}: stage {s} still holds {stage.held_bytes} bytes after the step"


@pytest.mark.timeout(120)
def test_local_stages_hold_what_their_schedule_needs() -> None:
    spawn(_local_stages, 1, timeout_s=100)


def test_the_schedules_needs_are_counted_per_stage() -> None:
    program = build_schedule(PipelineSpec("interleaved-1f1b", 1, 8, virtual=4))
    assert needed(program, 0) == {0: 2, 1: 2, 2: 1, 3: 1}
    assert needed(build_schedule(PipelineSpec("looped-bfs", 1, 8, virtual=4)), 0) == {0: 8, 1: 8, 2: 8, 3: 8}


def _sends(rank: int, world: int) -> None:
    m = 8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    pipe = Pipeline.from_model(model, PipelineSpec("1f1b", world, m), loss_fn=lambda o, t: o.pow(2).mean())
    x = torch.randn(4 * m, 16)
    pipe.step(x, x)  # the first step also describes each link once
    most = 0

    class Watch:
        def action_started(self, action: object) -> None:
            pass

        def action_ended(self, action: object) -> None:
            nonlocal most
            most = max(most, len(pipe.transport._in_flight))

        def waited(self, action: object, start: float, end: float) -> None:
            pass

    pipe.tracer = Watch()
    pipe.step(x, x)
    if rank == 0:
        # 1F1B keeps 2 micro-batches in flight on rank 0; their outputs' buffers, and the step's header, and no more.
        assert most <= 3, f"rank 0's transport held {most} sent buffers at once; its schedule keeps 2 micro-batches"


@pytest.mark.timeout(60)
def test_a_sent_output_is_let_go_once_its_gradient_is_back() -> None:
    spawn(_sends, 2, timeout_s=45)

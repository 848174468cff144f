"""The executor on one process: several stages on one rank hand tensors over in memory."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import assert_close, assert_grads_match, token_batch, token_loss, transformer

from conveyor.runtime import Executor, Stage, StageIO, Transport
from conveyor.runtime.loss_weights import LossWeights
from conveyor.runtime.microbatch import split_microbatches
from conveyor.schedules import Action, Program, lower, validate
from conveyor.split import split_model

# Three stages on rank 0, in a 1F1B-like order over 3 micro-batches.
ONE_RANK = Program.from_strings(
    ["0F0 1F0 2F0 2B0 1B0 0F1 1F1 2F1 0B0 2B1 1B1 0B1 0F2 1F2 2F2 2B2 1B2 0B2 0STEP 1STEP 2STEP"],
    placement=(0, 0, 0),
    num_microbatches=3,
    name="one-rank",
)


class Recorder:
    """A tracer that writes down what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.waits: list[str] = []

    def action_started(self, action: Action) -> None:
        self.events.append(("start", str(action)))

    def action_ended(self, action: Action) -> None:
        self.events.append(("end", str(action)))

    def waited(self, action: Action, start: float, end: float) -> None:
        self.waits.append(str(action))


def make_executor(model: torch.nn.Module, program: Program, steps: list[int] | None = None) -> Executor:
    n = program.num_stages
    stages = {s: Stage(split_model(model, s, n), s, n, token_loss if s == n - 1 else None) for s in range(n)}
    io = StageIO(Transport(torch.device("cpu")), program, rank=0)
    return Executor(program, 0, stages, io, _Steps(steps) if steps is not None else None)


class _Steps:
    """An update policy that only notes which stages stepped."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = steps

    def step(self, stage: int, mb: int | None = None) -> None:
        self.steps.append(stage)


def test_stages_on_one_rank_need_no_transfers() -> None:
    lowered = lower(ONE_RANK)
    assert lowered.to_strings() == ONE_RANK.to_strings()
    validate(lowered)


def test_three_stages_on_one_rank_match_the_full_model() -> None:
    model = transformer()
    reference = copy.deepcopy(model)
    tokens, targets = token_batch(7)
    loss = token_loss(reference(tokens), targets)
    loss.backward()

    steps: list[int] = []
    executor = make_executor(model, ONE_RANK, steps)
    tracer = Recorder()
    executor.tracer = tracer
    executor.run(
        split_microbatches(tokens, 3),
        split_microbatches(targets, 3),
        LossWeights(None)(split_microbatches(targets, 3)),
        signature=0,
    )

    results = executor.stages[2].pop_results()
    assert_close(torch.stack([r.loss * r.weight for r in results if r.loss is not None]).sum(), loss, "loss")
    for s, stage in executor.stages.items():
        assert_grads_match(stage.module.named_parameters(), reference, f"stage {s}")
        assert stage.activations_held == 0, f"stage {s} kept activations after the step"
    assert steps == [0, 1, 2]
    expected = [str(a) for a in ONE_RANK.actions[0]]
    assert tracer.events == [event for a in expected for event in (("start", a), ("end", a))]
    assert tracer.waits == []  # nothing travels between ranks


def test_an_executor_without_its_stages_is_refused() -> None:
    io = StageIO(Transport(torch.device("cpu")), ONE_RANK, rank=0)
    stage = Stage(torch.nn.Linear(2, 2), 0, 3)
    with pytest.raises(ValueError, match=r"rank 0 runs stages \[1, 2\] of the schedule but was not given them"):
        Executor(ONE_RANK, 0, {0: stage}, io)


def test_gradients_reach_the_first_stage_through_in_memory_hand_over() -> None:
    # Without the gradient hand-over, stage 0's parameters would have no gradient at all.
    model = transformer()
    tokens, targets = token_batch(3)
    executor = make_executor(model, Program.from_strings(["0F0 1F0 1B0 0B0"], (0, 0), 1))
    executor.run([tokens], [targets], [1.0], signature=0)
    assert executor.stages[0].module.embed.weight.grad is not None
    assert executor.stages[0].module.embed.weight.grad.abs().sum() > 0

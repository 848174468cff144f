"""The executor: walks one rank's action list and does the work each action names."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ..schedules import Action, Kind, Program, split_backwards
from .stage import Stage
from .stage_io import StageIO

__all__ = ["Executor", "Tracer"]


class Tracer(Protocol):
    """Told when each action starts and ends, and how long it waited on a receive."""

    def action_started(self, action: Action) -> None: ...

    def action_ended(self, action: Action) -> None: ...

    def waited(self, action: Action, start: float, end: float) -> None: ...


class Executor:
    """Runs `program`'s actions for `rank`, whose stages are `stages` (by stage index).

    Stages that sit next to each other on this rank hand tensors over in
    memory; all other traffic goes through `io`.
    """

    def __init__(
        self,
        program: Program,
        rank: int,
        stages: dict[int, Stage],
        io: StageIO,
        optimizer_step: Callable[[int], None] | None = None,
    ) -> None:
        missing = set(program.stages_of(rank)) - set(stages)
        if missing:
            raise ValueError(f"rank {rank} runs stages {sorted(missing)} of the schedule but was not given them")
        self.program = program
        self.rank = rank
        self.stages = stages
        self.io = io
        self.optimizer_step = optimizer_step
        self.actions = program.actions.get(rank, [])
        self.split = split_backwards(program)
        self.tracer: Tracer | None = None

    def run(
        self,
        inputs: Sequence[Any] | None,
        targets: Sequence[Any] | None,
        loss_weights: Sequence[float] | None,
        signature: int | None,
    ) -> None:
        """Run one step. `inputs` are the first stage's micro-batches; `targets` and
        `loss_weights` the last stage's; each is needed only where that stage lives."""
        self._inputs, self._targets, self._weights = inputs, targets, loss_weights
        self._handoff: dict[tuple[str, int, int], list[torch.Tensor]] = {}
        self._to_send: dict[tuple[str, int, int], list[torch.Tensor]] = {}
        self.io.begin_step(signature)
        tracer = self.tracer
        for action in self.actions:
            if tracer is None:
                self._do(action)
            else:
                tracer.action_started(action)
                self._do(action)
                tracer.action_ended(action)
        self.io.end_step()
        assert not self._to_send and not self._handoff, "a result was produced but never used"

    def _do(self, action: Action) -> None:
        s, mb, kind = action.stage, action.mb, action.kind
        if kind is Kind.STEP:
            if self.optimizer_step is not None:
                self.optimizer_step(s)
            return
        assert mb is not None
        if kind is Kind.FORWARD:
            self._forward(s, mb)
        elif kind is Kind.BACKWARD:
            self._backward(s, mb)
        elif kind is Kind.WEIGHT:
            self.stages[s].weight(mb)
        elif kind is Kind.SEND_F:
            self.io.send_activations(s, mb, self._to_send.pop(("act", s, mb)))
        elif kind is Kind.SEND_B:
            self.io.send_gradients(s, self._to_send.pop(("grad", s, mb)))
        elif kind is Kind.RECV_F:
            self.io.post_activations(s, mb)
        elif kind is Kind.RECV_B:
            self.io.post_gradients(s, mb, self.stages[s].output_metas(mb))
        else:
            raise NotImplementedError(f"rank {self.rank}: the executor has no rule for {kind.name}")

    def _forward(self, s: int, mb: int) -> None:
        stage = self.stages[s]
        if stage.is_first:
            assert self._inputs is not None, "the first stage's rank must be given the inputs"
            inputs: Any = self._inputs[mb]
        elif self.program.rank_of(s - 1) == self.rank:
            inputs = [_as_stage_input(t) for t in self._handoff.pop(("act", s, mb))]
        else:
            inputs = self._received(Action(s, Kind.FORWARD, mb), self.io.wait_activations)
        target = weight = None
        if stage.is_last:
            assert self._targets is not None and self._weights is not None, (
                "the last stage's rank must be given targets"
            )
            target, weight = self._targets[mb], self._weights[mb]
        outputs = stage.forward(mb, inputs, target, 1.0 if weight is None else weight)
        if stage.is_last:
            return
        if self.program.rank_of(s + 1) == self.rank:
            self._handoff[("act", s + 1, mb)] = outputs
        else:
            self._to_send[("act", s, mb)] = outputs

    def _backward(self, s: int, mb: int) -> None:
        stage = self.stages[s]
        grads: list[torch.Tensor] = []
        if not stage.is_last:
            if self.program.rank_of(s + 1) == self.rank:
                grads = self._handoff.pop(("grad", s, mb))
            else:
                grads = self._received(Action(s, Kind.BACKWARD, mb), self.io.wait_gradients)
        input_grads = stage.backward(mb, grads, split=(s, mb) in self.split)
        if stage.is_first:
            return
        if self.program.rank_of(s - 1) == self.rank:
            self._handoff[("grad", s - 1, mb)] = input_grads
        else:
            self._to_send[("grad", s, mb)] = input_grads

    def _received(self, action: Action, wait: Callable[[int, int], list[torch.Tensor]]) -> list[torch.Tensor]:
        assert action.mb is not None
        if self.tracer is None:
            return wait(action.stage, action.mb)
        start = time.perf_counter()
        tensors = wait(action.stage, action.mb)
        self.tracer.waited(action, start, time.perf_counter())
        return tensors


def _as_stage_input(tensor: torch.Tensor) -> torch.Tensor:
    """Cut the autograd graph at the stage boundary, as a transfer would."""
    return tensor.detach().requires_grad_(tensor.requires_grad)

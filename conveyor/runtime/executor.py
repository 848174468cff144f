"""The executor: walks one rank's action list and does the work each action names."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from ..schedules import Action, Edge, Kind, Link, Program, split_backwards
from ..watchdog import heartbeat
from .shared import SharedGradients
from .stage import Stage
from .stage_io import FORWARD_ONLY, TRAINING, StageIO

__all__ = ["ByMicrobatch", "Executor", "Tracer"]


class ByMicrobatch(Protocol):
    """Micro-batches by index, asked for in increasing order (a list, or a stream's lazy feed)."""

    def __getitem__(self, mb: int) -> Any: ...


class Tracer(Protocol):
    """Told when each action starts and ends, and how long it waited on another rank."""

    def action_started(self, action: Action) -> None: ...

    def action_ended(self, action: Action) -> None: ...

    def waited(self, action: Action, start: float, end: float) -> None: ...


class Executor:
    """Runs `program`'s actions for `rank`, whose stages are `stages` (by stage index).

    Values move along the edges of the program's stage graph: between stages
    on this rank in memory, to and from other ranks through `io`. `shared`
    sums the gradients several stages or ranks share (REDUCE, then STEP): tied
    parameters, and a replicated stage's. `optimizer_step(stage, mb)` runs each
    STEP: `mb` is the micro-batch an asynchronous schedule's STEP follows, None
    for a step after a whole mini-batch.
    """

    def __init__(
        self,
        program: Program,
        rank: int,
        stages: dict[int, Stage],
        io: StageIO,
        optimizer_step: Callable[[int, int | None], None] | None = None,
        shared: SharedGradients | None = None,
    ) -> None:
        missing = set(program.stages_of(rank)) - set(stages)
        if missing:
            raise ValueError(f"rank {rank} runs stages {sorted(missing)} of the schedule but was not given them")
        if shared is None and any(program.shares_gradients(s) for s in stages):
            raise ValueError(f"rank {rank} holds tied or replicated parameters: the executor needs SharedGradients")
        self.program = program
        self.rank = rank
        self.stages = stages
        self.io = io
        self.optimizer_step = optimizer_step
        self.shared = shared
        self.tracer: Tracer | None = None

    def run(
        self,
        inputs: ByMicrobatch | None,
        targets: ByMicrobatch | None,
        loss_weights: ByMicrobatch | None,
        signature: int | None,
        program: Program | None = None,
        keep_outputs: bool = False,
        options: tuple[str, int] = ("", 0),
    ) -> None:
        """Run `program` (by default the executor's own) once. `inputs` are the first stage's
        micro-batches and `signature` names their shapes; `targets` and `loss_weights` are the last
        stage's; each is needed only where that stage lives. A forward-only program (evaluation,
        inference) needs no targets: then the last stage keeps its outputs. `options` is a flag every rank
        must agree on (see `StageIO.begin_step`).
        """
        for _ in self.walk(inputs, targets, loss_weights, signature, program, keep_outputs, options=options):
            pass

    def walk(
        self,
        inputs: ByMicrobatch | None,
        targets: ByMicrobatch | None,
        loss_weights: ByMicrobatch | None,
        signature: int | None,
        program: Program | None = None,
        keep_outputs: bool = False,
        uniform: bool = False,
        options: tuple[str, int] = ("", 0),
    ) -> Iterator[Action]:
        """`run`, yielding each action once done: a stream reports the last stage's results as they come.

        `inputs` and `targets` are indexed by micro-batch in increasing order (a stream's can be lazy);
        `uniform` says every micro-batch has the same shapes (a stream's), so metadata travels once.
        """
        program = program or self.program
        self._program = program
        self._inputs, self._targets, self._weights = inputs, targets, loss_weights
        self._keep_outputs = keep_outputs
        self._split = split_backwards(program)
        # Keys name the edge's two ends in forward order: ("act", src, dst, mb) travels src -> dst,
        # ("grad", src, dst, mb) the gradient of dst's inputs back to src.
        self._handoff: dict[tuple[str, int, int, int], list[torch.Tensor]] = {}
        self._to_send: dict[tuple[str, int, int, int], list[torch.Tensor]] = {}
        actions = program.actions.get(self.rank, [])
        for stage in self.stages.values():
            if stage.versions is not None:
                stage.versions.begin(program, actions)
        self.io.begin_step(signature, FORWARD_ONLY if program.forward_only else TRAINING, uniform, options)
        tracer = self.tracer
        for action in actions:
            heartbeat()  # progress, for the launcher's watchdog
            if tracer is None:
                self._do(action)
            else:
                tracer.action_started(action)
                self._do(action)
                tracer.action_ended(action)
            yield action
        self.io.end_step()
        assert not self._to_send and not self._handoff, "a result was produced but never used"

    def _do(self, action: Action) -> None:
        s, mb, kind = action.stage, action.mb, action.kind
        if kind is Kind.STEP:
            self._step(action)
            return
        if kind is Kind.REDUCE:
            assert self.shared is not None
            self.shared.offer(s, mb)
            return
        assert mb is not None
        if kind is Kind.FORWARD:
            self._forward(s, mb)
        elif kind is Kind.BACKWARD:
            self._backward(s, mb)
        elif kind is Kind.WEIGHT:
            self.stages[s].weight(mb)
        elif kind.is_send:
            self.io.send(action.link, mb, self._to_send.pop((*action.link, mb)))
        elif kind is Kind.RECV_F:
            self.io.post_activations(action.link, mb)
        elif kind is Kind.RECV_B:
            self.io.post_gradients(action.link, mb, self._gradient_metas(s, mb, action.link))
        else:
            raise NotImplementedError(f"rank {self.rank}: the executor has no rule for {kind.name}")

    def _forward(self, s: int, mb: int) -> None:
        stage = self.stages[s]
        if stage.is_first:
            assert self._inputs is not None, "the first stage's rank must be given the inputs"
            inputs: Any = self._inputs[mb]
        else:
            inputs = [t for edge in self._program.graph.in_edges(s) for t in self._arriving(s, mb, edge)]
        target = weight = None
        if stage.is_last and self._targets is not None:
            assert self._weights is not None
            target, weight = self._targets[mb], self._weights[mb]
        elif stage.is_last and not self._program.forward_only:
            raise AssertionError("the last stage's rank must be given targets")
        run = stage.infer if self._program.forward_only else stage.forward
        keep = self._keep_outputs or (self._program.forward_only and target is None)
        outputs = run(mb, inputs, target, 1.0 if weight is None else weight, keep)
        for edge in self._program.graph.out_edges(s):
            values = outputs if edge.values is None else [outputs[v] for v in edge.values]
            key = ("act", s, edge.dst, mb)
            if self._program.same_rank(s, edge.dst, mb):
                self._handoff[key] = values
            else:
                self._to_send[key] = values

    def _arriving(self, s: int, mb: int, edge: Edge) -> list[torch.Tensor]:
        """The values of `edge` for micro-batch `mb`, handed over in memory or received."""
        if self._program.same_rank(edge.src, s, mb):
            return [_as_stage_input(t) for t in self._handoff.pop(("act", edge.src, s, mb))]
        return self._received(Action(s, Kind.FORWARD, mb), lambda: self.io.wait(("act", edge.src, s), mb))

    def _backward(self, s: int, mb: int) -> None:
        stage = self.stages[s]
        graph = self._program.graph
        output_grads: list[torch.Tensor | None] = []
        if not stage.is_last:
            metas = stage.output_metas(mb)
            output_grads = [None] * len(metas)
            for edge in graph.out_edges(s):
                if not edge.grad:
                    continue
                grads = self._gradients_back(s, mb, edge)
                carried = [v for v in _values(edge, len(metas)) if metas[v].requires_grad]
                for index, grad in zip(carried, grads, strict=True):
                    # A value used by several stages gets the sum of their gradients.
                    earlier = output_grads[index]
                    output_grads[index] = grad if earlier is None else earlier + grad
        input_grads = stage.backward(mb, output_grads, split=(s, mb) in self._split)
        at = 0
        for edge in graph.in_edges(s):
            width = len(edge.values) if edge.values is not None else len(input_grads) - at
            grads = [g for g in input_grads[at : at + width] if g is not None]
            at += width
            if not edge.grad:
                continue
            key = ("grad", edge.src, s, mb)
            if self._program.same_rank(edge.src, s, mb):
                self._handoff[key] = grads
            else:
                self._to_send[key] = grads

    def _gradients_back(self, s: int, mb: int, edge: Edge) -> list[torch.Tensor]:
        """The gradients of `edge`'s values for micro-batch `mb`, handed over in memory or received."""
        if self._program.same_rank(s, edge.dst, mb):
            return self._handoff.pop(("grad", s, edge.dst, mb))
        link = ("grad", s, edge.dst)
        return self._received(Action(s, Kind.BACKWARD, mb), lambda: self.io.wait(link, mb))

    def _gradient_metas(self, s: int, mb: int, link: Link) -> list[Any]:
        """Shapes of the gradients coming back over `link`: those of its values that need one."""
        metas = self.stages[s].output_metas(mb)
        edge = self._program.graph.edge(link[1], link[2])
        return [metas[v] for v in _values(edge, len(metas)) if metas[v].requires_grad]

    def _step(self, action: Action) -> None:
        s = action.stage
        if self.shared is not None and self._program.shares_gradients(s):
            self._received(action, lambda: self.shared.wait(s, action.mb))  # type: ignore[union-attr]
        versions = self.stages[s].versions
        if versions is not None:
            versions.before_step()
        if self.optimizer_step is not None:
            self.optimizer_step(s, action.mb)
        if versions is not None:
            versions.after_step()

    def _received(self, action: Action, wait: Callable[[], Any]) -> Any:
        if self.tracer is None:
            return wait()
        start = time.perf_counter()
        result = wait()
        self.tracer.waited(action, start, time.perf_counter())
        return result


def _values(edge: Edge, num_outputs: int) -> list[int]:
    return list(range(num_outputs)) if edge.values is None else list(edge.values)


def _as_stage_input(tensor: torch.Tensor) -> torch.Tensor:
    """Cut the autograd graph at the stage boundary, as a transfer would."""
    return tensor.detach().requires_grad_(tensor.requires_grad)

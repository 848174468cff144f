"""The executor: walks one rank's action list and does the work each action names."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol

import torch

from ..schedules import Action, Edge, Kind, Link, Program, offloaded
from ..watchdog import heartbeat
from .routes import BackwardRoute, ForwardRoute, HandoffKey, backward_route, forward_route, split_here
from .shared import SharedGradients
from .stage import Stage
from .stage_io import FORWARD_ONLY, TRAINING, StageIO

__all__ = ["ByMicrobatch", "Executor", "Tracer", "Updates"]


class ByMicrobatch(Protocol):
    """Micro-batches by index, asked for in increasing order (a list, or a stream's lazy feed)."""

    def __getitem__(self, mb: int) -> Any: ...


class Tracer(Protocol):
    """Told when each action starts and ends, and how long it waited on another rank."""

    def action_started(self, action: Action) -> None: ...

    def action_ended(self, action: Action) -> None: ...

    def waited(self, action: Action, start: float, end: float) -> None: ...


class Updates(Protocol):
    """What a STEP action calls: the pipeline's `UpdatePolicy` (`runtime/update.py`)."""

    def step(self, stage: int, mb: int | None = None) -> None: ...


class Executor:
    """Runs `program`'s actions for `rank`, whose stages are `stages` (by stage index).

    Values move along the edges of the program's stage graph: between stages
    on this rank in memory, to and from other ranks through `io`. `shared`
    sums the gradients several stages or ranks share (REDUCE, then STEP): tied
    parameters, and a replicated stage's. `update.step(stage, mb)` runs each
    STEP (`UpdatePolicy`, `runtime/update.py`): `mb` is the micro-batch an asynchronous
    schedule's STEP follows, None for a step after a whole mini-batch; without
    an update policy a STEP only waits for the shared gradients.
    """

    def __init__(
        self,
        program: Program,
        rank: int,
        stages: dict[int, Stage],
        io: StageIO,
        update: Updates | None = None,
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
        self.update = update
        self.shared = shared
        self.tracer: Tracer | None = None
        self.peak_held_bytes = 0
        """With stages that track memory: the most bytes this rank's stages held for backward at once (after any
        action), the rank's peak; a sum of the stages' own peaks overstates it where they peak apart (a V)."""
        self._programs: dict[int, tuple[Program, list[Action], list[tuple[Action, Callable[[], None]]]]] = {}

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
        # One loop for both: resuming a generator costs well under a microsecond per action.
        deque(self.walk(inputs, targets, loss_weights, signature, program, keep_outputs, False, options), maxlen=0)

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
        steps = self._begin(inputs, targets, loss_weights, signature, program, keep_outputs, uniform, options)
        tracer = self.tracer
        tracked = [stage for stage in self.stages.values() if stage.track_memory]
        for action, do in steps:
            heartbeat()  # progress, for the launcher's watchdog
            if tracer is None:
                do()
            else:
                tracer.action_started(action)
                do()
                tracer.action_ended(action)
            if tracked:
                self._note_held(tracked)
            yield action
        self._end()

    def _note_held(self, tracked: list[Stage]) -> None:
        self.peak_held_bytes = max(self.peak_held_bytes, sum(stage.held_bytes for stage in tracked))

    def _begin(
        self,
        inputs: ByMicrobatch | None,
        targets: ByMicrobatch | None,
        loss_weights: ByMicrobatch | None,
        signature: int | None,
        program: Program | None,
        keep_outputs: bool,
        uniform: bool,
        options: tuple[str, int],
    ) -> list[tuple[Action, Callable[[], None]]]:
        """Set up a run of `program` (the step's header exchanged); its actions, bound."""
        program = program or self.program
        steps = self._prepared(program)
        self._program = program
        self._inputs, self._targets, self._weights = inputs, targets, loss_weights
        self._keep_outputs = keep_outputs
        self._handoff: dict[HandoffKey, list[torch.Tensor]] = {}
        self._to_send: dict[HandoffKey, list[torch.Tensor]] = {}
        for stage in self.stages.values():
            if stage.versions is not None:
                stage.versions.begin(program, program.actions.get(self.rank, []))
        self.io.begin_step(signature, FORWARD_ONLY if program.forward_only else TRAINING, uniform, options)
        return steps

    def _end(self) -> None:
        self.io.end_step()
        assert not self._to_send and not self._handoff, "a result was produced but never used"

    def _prepared(self, program: Program) -> list[tuple[Action, Callable[[], None]]]:
        """This rank's actions of `program`, each bound to what it does (worked out on the program's first run)."""
        actions = program.actions.get(self.rank, [])
        cached = self._programs.get(id(program))
        if cached is not None and cached[0] is program and cached[1] is actions and len(cached[2]) == len(actions):
            return cached[2]
        split = split_here(program, self.rank)
        moved = offloaded(program)
        steps = [(action, self._bind(program, action, split, moved)) for action in actions]
        if len(self._programs) >= _PROGRAMS_KEPT:  # a profiler's programs come and go: keep the latest few
            del self._programs[next(iter(self._programs))]
        self._programs[id(program)] = (program, actions, steps)
        return steps

    def _bind(
        self, program: Program, action: Action, split: set[tuple[int, int | None]], moved: set[tuple[int, int]]
    ) -> Callable[[], None]:
        """What `action` does, with everything that depends only on the program looked up now."""
        s, mb, kind = action.stage, action.mb, action.kind
        if kind is Kind.STEP:
            shares = self.shared is not None and program.shares_gradients(s)
            return partial(self._step, action, shares)
        if kind is Kind.REDUCE:
            assert self.shared is not None
            return partial(self.shared.offer, s, mb)
        assert mb is not None
        if kind is Kind.FORWARD:
            stage = self.stages[s]
            # A micro-batch the program offloads keeps what its forward saved ready to move (`runtime/offload.py`).
            run = stage.infer if program.forward_only else stage.forward
            if (s, mb) in moved:
                run = partial(stage.forward, offload=True)
            return partial(self._forward, self.stages[s], run, mb, forward_route(program, s, mb), action)
        if kind is Kind.BACKWARD:
            route = backward_route(program, s, mb, (s, mb) in split)
            return partial(self._backward, self.stages[s], mb, route, action)
        if kind is Kind.WEIGHT:
            return partial(self.stages[s].weight, mb)
        if kind is Kind.OFFLOAD:
            return partial(self.stages[s].offload, mb)
        if kind is Kind.RELOAD:
            return partial(self.stages[s].reload, mb)
        if kind.is_send:
            return partial(self._send, action.link, mb, (*action.link, mb))
        if kind is Kind.RECV_F:
            return partial(self.io.post_activations, action.link, mb)
        if kind is Kind.RECV_B:
            return partial(self._post_gradients, s, mb, action.link, program.graph.edge(*action.link[1:]))
        raise NotImplementedError(f"rank {self.rank}: the executor has no rule for {kind.name}")

    def _forward(
        self, stage: Stage, run: Callable[..., list[torch.Tensor]], mb: int, route: ForwardRoute, action: Action
    ) -> None:
        if stage.is_first:
            assert self._inputs is not None, "the first stage's rank must be given the inputs"
            inputs: Any = self._inputs[mb]
        else:
            inputs = []
            for hop in route.inputs:
                if hop.link is None:
                    inputs += [_as_stage_input(t) for t in self._handoff.pop(hop.key)]
                else:
                    inputs += self._received(action, self.io.wait, hop.link, mb)
        target = weight = None
        if stage.is_last:
            if self._targets is not None:
                assert self._weights is not None
                target, weight = self._targets[mb], self._weights[mb]
            elif not self._program.forward_only:
                raise AssertionError("the last stage's rank must be given targets")
        keep = self._keep_outputs or (self._program.forward_only and target is None)
        outputs = run(mb, inputs, target, 1.0 if weight is None else weight, keep)
        for hop in route.outputs:
            values = outputs if hop.values is None else [outputs[v] for v in hop.values]
            (self._handoff if hop.link is None else self._to_send)[hop.key] = values

    def _backward(self, stage: Stage, mb: int, route: BackwardRoute, action: Action) -> None:
        output_grads: list[torch.Tensor | None] = []
        if route.output_grads:
            wanted = stage.outputs_requiring_grad(mb)
            output_grads = [None] * len(wanted)
            for hop in route.output_grads:
                if hop.link is None:
                    grads = self._handoff.pop(hop.key)
                else:
                    grads = self._received(action, self.io.wait, hop.link, mb)
                carried = [v for v in _values(hop.values, len(wanted)) if wanted[v]]
                for index, grad in zip(carried, grads, strict=True):
                    # A value used by several stages gets the sum of their gradients.
                    earlier = output_grads[index]
                    output_grads[index] = grad if earlier is None else earlier + grad
        elif not stage.is_last:
            output_grads = [None] * len(stage.outputs_requiring_grad(mb))
        input_grads = stage.backward(mb, output_grads, split=route.split)
        at = 0
        for hop in route.input_grads:
            width = len(hop.values) if hop.values is not None else len(input_grads) - at
            if hop.grad:
                grads = [g for g in input_grads[at : at + width] if g is not None]
                (self._handoff if hop.link is None else self._to_send)[hop.key] = grads
            at += width

    def _send(self, link: Link, mb: int, key: HandoffKey) -> None:
        self.io.send(link, mb, self._to_send.pop(key))

    def _post_gradients(self, s: int, mb: int, link: Link, edge: Edge) -> None:
        """Post the receive of the gradients coming back over `link`: those of its values that need one."""
        metas = self.stages[s].output_metas(mb)
        self.io.post_gradients(link, mb, [metas[v] for v in _values(edge.values, len(metas)) if metas[v].requires_grad])

    def _step(self, action: Action, shares: bool) -> None:
        s = action.stage
        if shares:
            assert self.shared is not None
            self._received(action, self.shared.wait, s, action.mb)
        versions = self.stages[s].versions
        if versions is not None:
            versions.before_step()
        if self.update is not None:
            self.update.step(s, action.mb)
        if versions is not None:
            versions.after_step()

    def _received(self, action: Action, wait: Callable[..., Any], *args: Any) -> Any:
        if self.tracer is None:
            return wait(*args)
        start = time.perf_counter()
        result = wait(*args)
        self.tracer.waited(action, start, time.perf_counter())
        return result


_PROGRAMS_KEPT = 8


def _values(values: tuple[int, ...] | None, num_outputs: int) -> Sequence[int]:
    return range(num_outputs) if values is None else values


def _as_stage_input(tensor: torch.Tensor) -> torch.Tensor:
    """Cut the autograd graph at the stage boundary, as a transfer would."""
    return tensor.detach().requires_grad_(tensor.requires_grad)

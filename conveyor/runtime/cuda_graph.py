"""A rank's whole training step captured in a CUDA graph and replayed, where the program allows it.

On a GPU a small model's step is bound by kernel launches and the Python that issues them: replaying
a captured graph issues the whole step's kernels at once. `PipelineSpec(cuda_graph=True)` captures the
compute of a training step (every F, B and W of the rank's program, in the program's order) once per
input signature and loss weights, after `WARMUP_STEPS` eager steps of that signature; later steps copy
their micro-batches into the captured ones, replay the graph and run the program's STEPs eagerly (the
update policy: the non-finite guard, clipping, the optimizers).

What a captured step needs, each refused by `refusal` with what to change:

- every stage on this rank and nothing that crosses ranks or waits for another rank (one rank
  running a single stage or all of a looped placement's stages): a graph cannot wait on a host;
- a synchronous schedule (an asynchronous one streams, never steps);
- fp32 (float16's loss scale is a host number the graph would keep; autocast's weight cache cannot
  live across replays), no recompute (its replay saves and restores the RNG state), no tied or
  replicated stages (their reductions);
- an optimizer: the captured backward writes each gradient as the first of the step, so a step must
  own its gradients from zero to its update;
- micro-batches of tensors only: anything else would be kept as it was at capture.

A capture holds a memory pool as large as a step's activations, so at most `MAX_GRAPHS` are kept; steps
of further signatures (or loss weights: token counts that change every step) run eagerly, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..schedules import Kind, PipelineSpec, Program
from .executor import Executor
from .microbatch import map_tensors, tensors_in
from .stage import MicrobatchResult, Stage

__all__ = ["MAX_GRAPHS", "WARMUP_STEPS", "CapturedSteps", "refusal"]

WARMUP_STEPS = 2
"""Eager steps of a signature before it is captured: lazy initialization (cuBLAS workspaces, the autograd
engine's device threads, the optimizer's state) must happen outside the graph."""
MAX_GRAPHS = 4
"""Captured steps kept; each holds a memory pool of a step's activations."""


def refusal(spec: PipelineSpec, program: Program, rank: int, device: torch.device, has_optimizer: bool) -> str | None:
    """Why `cuda_graph=True` cannot capture this rank's step (what to change), or None if it can."""
    actions = program.actions.get(rank, [])
    if program.asynchronous:
        return f"{spec.schedule} streams without a step to capture; use a synchronous schedule"
    crossing = [a for a in actions if a.kind.is_transfer or a.kind is Kind.REDUCE]
    if crossing:
        shown = " ".join(str(a) for a in crossing[:4])
        return (
            f"rank {rank}'s program sends, receives or reduces ({shown} ...): a captured step cannot wait on"
            " another rank; capture needs one rank holding every stage (ranks=1: a single stage, or a looped"
            " placement with virtual=v), and no tied or replicated stages"
        )
    if spec.precision != "fp32":
        return f"precision={spec.precision!r}: a captured step runs fp32 only (use precision='fp32')"
    if any(spec.recomputes(s) for s in program.stages_of(rank)):
        return "recompute: its replay during backward saves and restores the RNG state, which a graph cannot"
    if not has_optimizer:
        return (
            "no optimizer: a captured backward writes each gradient as the first of its step, so the step must"
            " own its gradients from zero to the update (pass optimizer=)"
        )
    if device.type != "cuda":
        return f"a CUDA graph needs a CUDA device; this pipeline runs on {device}"
    return None


@dataclass
class _Capture:
    """One captured step: its graph, the tensors it reads and writes, and the STEPs that follow it."""

    graph: Any  # torch.cuda.CUDAGraph
    inputs: list[Any]  # the micro-batches the graph reads (copied into before each replay)
    targets: list[Any]
    last: Stage | None  # the last stage, where it is on this rank
    results: list[tuple[int, MicrobatchResult]]  # the last stage's results the graph writes
    grads: list[tuple[torch.nn.Parameter, torch.Tensor]]  # each gradient the graph writes
    steps: list[tuple[int, int | None]] = field(default_factory=list)  # (stage, mb) of the program's STEPs


class CapturedSteps:
    """The captured steps of one pipeline rank, by what a capture depends on (see the module's docstring).

    `run(...)` does what `executor.run` does for the training program, from a graph where one exists; the
    program's STEPs go to the executor's update policy after the replay, in the program's order.
    """

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._stages: Mapping[int, Stage] = executor.stages
        self._captures: dict[tuple[Any, ...], _Capture] = {}
        self._seen: dict[tuple[Any, ...], int] = {}
        self._warned = False
        self.replays = 0
        """Steps run from a graph so far."""

    def run(
        self,
        program: Program,
        inputs: Sequence[Any] | None,
        targets: Sequence[Any] | None,
        weights: Sequence[float] | None,
        signature: int | None,
        keep_outputs: bool,
        options: tuple[str, int],
    ) -> None:
        for batch in (inputs or [], targets or []):
            _check_tensors_only(batch)
        key = (signature, _shapes(targets), tuple(weights or ()), keep_outputs, options)
        capture = self._captures.get(key)
        if capture is None:
            seen = self._seen.get(key, 0)
            if seen < WARMUP_STEPS or len(self._captures) >= MAX_GRAPHS:
                self._seen[key] = seen + 1
                if seen >= WARMUP_STEPS:
                    self._warn_once(len(self._captures))
                self._executor.run(inputs, targets, weights, signature, program, keep_outputs, options)
                return
            capture = self._capture(program, inputs, targets, weights, signature, keep_outputs, options)
            self._captures[key] = capture
        else:
            for mine, theirs in ((capture.inputs, inputs), (capture.targets, targets)):
                for static, fresh in zip(tensors_in(mine), tensors_in(list(theirs or [])), strict=True):
                    static.copy_(fresh, non_blocking=True)
        self._replay(capture)

    def _capture(
        self,
        program: Program,
        inputs: Sequence[Any] | None,
        targets: Sequence[Any] | None,
        weights: Sequence[float] | None,
        signature: int | None,
        keep_outputs: bool,
        options: tuple[str, int],
    ) -> _Capture:
        parameters = [p for stage in self._stages.values() for p in stage.module.parameters()]
        stale = [p for p in parameters if p.grad is not None]
        if stale:
            raise RuntimeError(
                f"cuda_graph: {len(stale)} parameters hold gradients from before the step; a captured step writes"
                " them as its first (each STEP of the program must step and zero its stage)"
            )
        static_inputs = [map_tensors(mb, torch.clone) for mb in inputs or []]
        static_targets = [map_tensors(mb, torch.clone) for mb in targets or []]
        noted = _NotedSteps()
        policy, self._executor.update = self._executor.update, noted  # the optimizers step after each replay
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph):
                self._executor.run(
                    static_inputs or None, static_targets or None, weights, signature, program, keep_outputs, options
                )
        finally:
            self._executor.update = policy
        last = self._stages.get(program.num_stages - 1)
        results = sorted(last.results.items()) if last is not None else []
        if last is not None:
            last.results.clear()
        grads = [(p, p.grad) for p in parameters if p.grad is not None]
        return _Capture(graph, static_inputs, static_targets, last, results, grads, noted.steps)  # type: ignore[arg-type]

    def _replay(self, capture: _Capture) -> None:
        capture.graph.replay()
        self.replays += 1
        for param, grad in capture.grads:
            param.grad = grad
        if capture.last is not None:
            capture.last.results.update({mb: _copied(result) for mb, result in capture.results})
        update = self._executor.update
        if update is not None:
            for stage, mb in capture.steps:
                update.step(stage, mb)

    def _warn_once(self, kept: int) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"cuda_graph: {kept} steps are captured already (input shapes or loss weights that change from step to"
            f" step, such as token counts); steps of further ones run eagerly",
            stacklevel=4,
        )


class _NotedSteps:
    """An update policy that only notes the STEPs it is given (while a step is captured)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int | None]] = []

    def step(self, stage: int, mb: int | None = None) -> None:
        self.steps.append((stage, mb))


def _copied(result: MicrobatchResult) -> MicrobatchResult:
    """A result the next replay will not overwrite."""
    loss = result.loss.clone() if result.loss is not None else None
    output = map_tensors(result.output, torch.clone) if result.output is not None else None
    return MicrobatchResult(loss, result.weight, output)


def _shapes(batches: Sequence[Any] | None) -> tuple[Any, ...]:
    return tuple((tuple(t.shape), t.dtype) for mb in batches or [] for t in tensors_in(mb))


def _check_tensors_only(batches: Sequence[Any]) -> None:
    for mb in batches:
        _check_leaves(mb)


def _check_leaves(batch: Any) -> None:
    if isinstance(batch, torch.Tensor):
        return
    if isinstance(batch, Mapping):
        for value in batch.values():
            _check_leaves(value)
        return
    if isinstance(batch, (tuple, list)):
        for value in batch:
            _check_leaves(value)
        return
    raise TypeError(
        f"cuda_graph: the micro-batch holds a {type(batch).__name__} ({batch!r}): a captured step would replay the"
        " value it had at capture; pass tensors only"
    )

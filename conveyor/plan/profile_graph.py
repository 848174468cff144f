"""Per-layer costs of a split whose layers do not chain: a traced model's, where a value made by one layer is
read by several later ones (GPT-2's attention mask reaches every block) and the embedding and the head share
a weight.

`profile_layers` hands each layer the previous one's output, which such a split does not allow. Here the
layers are the stages of a split (`TracedSplit` cut at every block), and the runtime itself feeds them: a
one-rank `Pipeline` holds every stage and runs programs written for profiling (every forward, then every
backward, whole or split into B and W), so each value travels its graph edge as it would in training, and
the executor's tracer times each action. Costs and bytes mean what they mean in `LayerCosts`.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..observe.profile import (
    OPTIMIZER_STATES,
    LayerCosts,
    LayerProfile,
    loss_saved_bytes,
    microbatch_rows,
    step_time,
    timed_rounds,
)
from ..observe.trace import Recorder
from ..pipeline import Pipeline
from ..schedules import Action, Kind, PipelineSpec, Program, lower
from ..split import Split

__all__ = ["profile_split"]


def profile_split(
    split: Split,
    example_input: Any,
    example_target: Any,
    loss_fn: Any,
    *,
    names: Sequence[str],
    optimizer: str = "adamw",
    fingerprint: str = "",
    repeats: int = 5,
    warmup: int = 2,
    min_seconds: float = 0.0,
    first: bool = False,
    last: bool = False,
) -> LayerProfile:
    """Measure each stage of `split` as one layer, on one micro-batch, in this process (one rank).

    Needs torch.distributed uninitialized (it makes a one-rank gloo group for the pipeline, and ends it).
    Costs about (warmup + repeats) x (two forward and two backward passes of the model) and an optimizer step
    per layer, and the timed rounds last at least `min_seconds` (`timed_rounds`).
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_STATES)}")
    if len(names) != split.graph.num_stages:
        raise ValueError(f"{len(names)} names for {split.graph.num_stages} layers")
    if dist.is_initialized():
        raise RuntimeError("profile_split runs its own one-rank process group: call it before init_process_group")
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            return _profile(
                split,
                example_input,
                example_target,
                loss_fn,
                names,
                optimizer,
                fingerprint,
                repeats,
                warmup,
                min_seconds,
                first,
                last,
            )
        finally:
            dist.destroy_process_group()


def _profile(
    split: Split,
    example_input: Any,
    example_target: Any,
    loss_fn: Any,
    names: Sequence[str],
    optimizer: str,
    fingerprint: str,
    repeats: int,
    warmup: int,
    min_seconds: float,
    first: bool,
    last: bool,
) -> LayerProfile:
    n = split.graph.num_stages
    # looped-bfs is the one schedule that puts any number of stages on one rank; its own program is not run.
    spec = PipelineSpec("looped-bfs", ranks=1, microbatches=1, virtual=n)
    pipe = Pipeline(split, spec, loss_fn=loss_fn, timeout_s=None)
    pipe.track_memory = True
    placement = pipe.program.placement
    forwards = [Action(s, Kind.FORWARD, 0) for s in range(n)]
    whole = _program(placement, split, forwards + [Action(s, Kind.BACKWARD, 0) for s in reversed(range(n))])
    parted = [a for s in reversed(range(n)) for a in (Action(s, Kind.BACKWARD, 0), Action(s, Kind.WEIGHT, 0))]
    halves = _program(placement, split, forwards + parted)
    sizes = _output_sizes(pipe)
    kept_by_loss = _loss_saved(pipe.stages[n - 1])
    pipe.run_program(whole, example_input, example_target)  # counts what each stage holds, then timing runs bare
    pipe.track_memory = False
    recorder = Recorder(0)
    pipe.tracer = recorder
    # Each repeat runs both programs, so that a machine slowing down for a while slows every measure alike.
    samples: dict[tuple[str, int], list[float]] = {}  # by (F, whole, B or W; stage)
    for timed in timed_rounds(warmup, repeats, min_seconds):
        for program, backward in ((whole, "whole"), (halves, "B")):
            recorder.spans.clear()
            pipe.run_program(program, example_input, example_target)
            if not timed:
                continue
            for _, span in recorder.spans:
                kind = backward if span.kind == "B" else span.kind
                samples.setdefault((kind, span.stage), []).append(span.end - span.start)
    pipe.tracer = None

    def median(kind: str, stage: int) -> float:
        return statistics.median(samples.get((kind, stage), [0.0]))

    crossing = _crossing_bytes(split, sizes)
    layers = []
    for s in range(n):
        stage = pipe.stages[s]
        params = [p for p in stage.module.parameters() if p.requires_grad]
        own_outputs = sum(sizes[s])
        layers.append(
            LayerCosts(
                names[s],
                median("F", s),
                median("B", s) if s > 0 else 0.0,
                median("W", s) + (median("B", s) if s == 0 else 0.0),  # the first stage's backward is all W
                median("whole", s),
                step_time(stage.module, optimizer, repeats) if params else 0.0,
                sum(p.numel() for p in params),
                float(sum(p.numel() * p.element_size() for p in params)),
                max(0.0, float(stage.peak_held_bytes) - (0.0 if s == n - 1 else own_outputs)),
                0.0 if s == n - 1 else crossing[s],
                kept_by_loss[0] if s == n - 1 else 0.0,
            )
        )
    pipe.close()
    return LayerProfile(fingerprint, microbatch_rows(example_input), optimizer, tuple(layers), first=first, last=last)


def _program(placement: Any, split: Split, actions: list[Action]) -> Program:
    return lower(Program(placement, 1, {0: actions}, graph=split.graph), prefetch=False, fuse=False)


def _output_sizes(pipe: Pipeline) -> dict[int, list[int]]:
    """Per stage, the bytes of each output of its last forward (filled as forwards run)."""
    sizes: dict[int, list[int]] = {s: [] for s in pipe.stages}
    for index, stage in pipe.stages.items():
        run = stage.forward

        def forward(*args: Any, _run: Any = run, _index: int = index, **kwargs: Any) -> list[torch.Tensor]:
            outputs = _run(*args, **kwargs)
            sizes[_index] = [t.numel() * t.element_size() for t in outputs]
            return outputs

        stage.forward = forward  # type: ignore[method-assign]  # the profiler's own one-rank pipeline
    return sizes


def _loss_saved(stage: Any) -> list[float]:
    """What the last stage's loss saves for backward (kept when the stage recomputes), filled by its counting run."""
    kept = [0.0]
    loss_fn = stage.loss_fn

    def measured(output: Any, target: Any) -> torch.Tensor:
        if stage.track_memory:  # the counting run only: the timed runs call the loss alone
            kept[0] = loss_saved_bytes(output, target, loss_fn)
        return loss_fn(output, target)

    stage.loss_fn = measured
    return kept


def _crossing_bytes(split: Split, sizes: dict[int, list[int]]) -> list[float]:
    """For each cut after stage i: the bytes of the values made at or before i and read after it."""
    edges = split.graph.edges
    crossing = []
    for cut in range(split.graph.num_stages - 1):
        total = 0
        for src in range(cut + 1):
            read: set[int] = set()
            for edge in edges:
                if edge.src == src and edge.dst > cut:
                    read.update(range(len(sizes[src])) if edge.values is None else edge.values)
            total += sum(sizes[src][k] for k in read if k < len(sizes[src]))
        crossing.append(float(total))
    return crossing

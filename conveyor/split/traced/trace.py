"""`trace_split`: export a model (or a builder's meta model) on one micro-batch and cut it into stages."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ...schedules.graph import StageGraph
from ..materialize import DeferredModel, build_deferred
from .capture import at_least_two, dynamic_dims, export_error, export_in_mode, first_lines, input_names, on_meta
from .guards import stage_guards
from .plan import Planner
from .points import where_to_cut
from .program import MODE_NAMES, Held, Program, signature
from .stage import Calling, TracedStage, register, write_graph

__all__ = ["TracedSplit", "trace_split"]


@dataclass
class TracedSplit:
    """A model cut by `trace_split`: the stage graph, and each stage's module on demand."""

    graph: StageGraph
    source: nn.Module | DeferredModel = field(repr=False)
    """The model stages copy their tensors from, or the builder's deferred model they materialize them from."""
    _programs: dict[bool, Program] = field(repr=False)  # by mode; the model's own mode first
    _unavailable: dict[bool, str] = field(repr=False)  # mode -> why the stages cannot run in it
    _calling: Calling = field(repr=False)
    _dynamic_names: frozenset[str] = field(default=frozenset(), repr=False)
    """The example's tensor inputs that `trace_split(dynamic_shapes=...)` can name (for advice in errors)."""

    @property
    def num_stages(self) -> int:
        return self.graph.num_stages

    def build_stage(self, stage: int, device: torch.device | str = "cpu") -> TracedStage:
        """The module of `stage` on `device`, with its own copy of the parameters and buffers it holds.

        From a built model, each call copies the model's current values. From
        a builder, each call materializes the stage's tensors with exactly the
        values `torch.manual_seed(seed); builder()` gives them on the CPU,
        costing the memory of that stage's tensors, not the model's. Either way
        a parameter several stages hold (see `graph.ties`) is a separate
        `nn.Parameter` on each.
        """
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} does not exist in this {self.num_stages}-stage split")
        device = torch.device(device)
        last = stage == self.num_stages - 1
        graphs, guards = {}, {}
        for training, program in self._programs.items():
            graphs[training] = write_graph(program.stages[stage], last, MODE_NAMES[training], device)
            guards[training] = stage_guards(program.stages[stage], program.exported, stage, self._dynamic_names)
        module = TracedStage(stage, self.num_stages, graphs, self._unavailable, self._calling, guards)
        values = self._values(stage, device)
        registered: set[str] = set()
        for training, program in self._programs.items():
            code = program.stages[stage]
            for held in code.held:
                if held.names[0] in registered:  # the other mode's graph reads it too
                    continue
                registered.update(held.names)
                for name in held.names:
                    register(module, name, values[held.names[0]], held.kind, persistent=name not in held.transient)
            for target, submodule in code.submodules.items():
                register(module, f"_{MODE_NAMES[training]}_{target}", submodule, "module")
        training = next(iter(self._programs))
        return module.train(training)

    def parameter_names(self, stage: int) -> list[str]:
        """The names under which `stage` registers parameters (every alias of a tied one it holds)."""
        program = next(iter(self._programs.values()))
        return [name for held in program.stages[stage].held if held.kind == "parameter" for name in held.names]

    def _values(self, stage: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The stage's own tensor for each it holds, on `device`, by the name its graph reads."""
        held: dict[str, Held] = {}
        for program in self._programs.values():
            for one in program.stages[stage].held:
                held.setdefault(one.names[0], one)
        materialized: dict[str, torch.Tensor] = {}
        if isinstance(self.source, DeferredModel):
            # All in one replay: what the stage's tensors are computed from is computed once.
            materialized = self.source.materialize([name for name, one in held.items() if one.kind != "constant"])
        values: dict[str, torch.Tensor] = {}
        for name, one in held.items():
            if name in materialized:
                value = materialized[name].to(device)  # on the CPU, the materialized tensor itself
            else:  # the model's tensor, or a constant of the exported program
                value = one.tensor.detach().to(device, copy=True)
            if one.kind == "parameter":
                value = nn.Parameter(value, requires_grad=one.tensor.requires_grad)
            values[name] = value
        return values


def trace_split(
    model: nn.Module | Callable[[], nn.Module],
    example_args: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    split_points: Mapping[str, str] | None = None,
    num_stages: int | None = None,
    layers_per_stage: Sequence[int] | None = None,
    blocks: str | None = None,
    strict: bool = False,
    seed: int = 0,
    dynamic_shapes: Mapping[str, Mapping[int, Any]] | None = None,
) -> TracedSplit:
    """Export `model` on one example micro-batch and cut it into stages.

    `model` is a built model (stages copy its weights; the model is left as
    it is) or a function that builds it: then it is built once on the meta
    device (`build_deferred`) and exported there, the example moved there too,
    so the full model is never in memory; each stage later materializes its
    own tensors as `torch.manual_seed(seed); model()` makes them on the CPU
    (`seed` is ignored for a built model). Traced from a builder, forward
    runs on the meta device, where a tensor has no values: a tensor forward
    makes from data (``torch.tensor([...])``) must be made on the CPU and
    moved (``.to(x.device)``), or be a buffer made in the builder.

    Say where to cut in one way: `split_points` (``{"transformer.h.2":
    "beginning" | "end"}``, in the order the model runs them; ``pipe_split()``
    markers in forward add to them), ``pipe_split()`` markers alone, or
    `num_stages` / `layers_per_stage` over the block container (`blocks`,
    dotted, or the one ModuleList/ModuleDict/Sequential found in the model),
    with the modules before the blocks on the first stage and those after on
    the last.

    The example is one micro-batch, given as the runtime will give it to stage
    0. Its batch dimension (dim 0 of every tensor) is traced as dynamic, so the
    stages run any micro-batch size; export fixes sizes 0 and 1 to constants,
    so an example of one sample is traced repeated to two. Choose an example
    batch size that no other dimension of the inputs has, so that export does
    not mistake one for the other. Every other dimension is traced at the
    example's size, unless `dynamic_shapes` marks it dynamic: input name ->
    {dimension: name}, dimensions of one name being one size
    (``{"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}``), or a
    ``torch.export.Dim`` (a range, or ``Dim.AUTO`` for what export finds).
    A stage raises ValueError, naming the input and dimension, on inputs whose
    shapes break what export assumed (a size it fixed, a range a branch of the
    forward needs), rather than run a graph traced for other shapes; each new
    combination of input shapes is checked once.

    Costs two exports of the model (train and eval mode); the model is left
    in the mode it was in. Each stage's module comes from `build_stage`.
    """
    given = (tuple(example_args), dict(example_kwargs or {}))
    source: nn.Module | DeferredModel
    if isinstance(model, nn.Module):
        source = module = model
        args, kwargs = given
    elif callable(model):
        source = build_deferred(model, seed)
        module = source.module
        args, kwargs = on_meta(given)
    else:
        raise TypeError(f"trace_split takes an nn.Module or a function that builds one; got {model!r}")
    points, markers = where_to_cut(module, split_points, num_stages, layers_per_stage, blocks)
    traced_args, traced_kwargs = at_least_two(args, kwargs)
    dynamic = dynamic_dims(module, traced_args, traced_kwargs, dynamic_shapes or {})
    try:
        exported = export_in_mode(module, traced_args, traced_kwargs, strict, module.training, dynamic)
    except Exception as error:  # noqa: BLE001 - export raises many kinds; each becomes one clear sentence
        raise export_error(module, args, kwargs, error, isinstance(source, DeferredModel)) from error
    first = Planner(module, exported, module.training).plan(points, markers)
    if not points and markers and first.graph.num_stages == 1:
        raise ValueError(
            f"{type(module).__name__} has no pipe_split() in its forward: say where to cut with split_points=...,"
            " num_stages=... or layers_per_stage=..."
        )
    programs, unavailable = {first.training: first}, {}
    other = not module.training
    try:
        exported = export_in_mode(module, traced_args, traced_kwargs, strict, other, dynamic)
        second = Planner(module, exported, other).plan(points, markers)
    except Exception as error:  # noqa: BLE001 - the stages then run in the model's own mode only
        unavailable[other] = f"exporting the model in {MODE_NAMES[other]} mode failed: {first_lines(error)}"
    else:
        if second.graph != first.graph or any(
            signature(a) != signature(b) for a, b in zip(second.stages, first.stages, strict=True)
        ):
            unavailable[other] = (
                f"in {MODE_NAMES[other]} mode the model's stages exchange other values than in"
                f" {MODE_NAMES[first.training]} mode (edges {', '.join(map(str, second.graph.edges))}):"
                f" trace_split the model in {MODE_NAMES[other]} mode for stages that run that way"
            )
        else:
            programs[other] = second
    # The example as given (on the CPU, say), not as traced: stage 0 is called the way the user gave it.
    flat, in_spec = pytree.tree_flatten(given)
    constants = tuple((at, v) for at, v in enumerate(flat) if not isinstance(v, torch.Tensor))
    calling = Calling(in_spec, first.exported.call_spec.out_spec, tuple(kwargs), constants)
    names = frozenset(name for name, v in input_names(module, args, kwargs).items() if isinstance(v, torch.Tensor))
    return TracedSplit(first.graph, source, programs, unavailable, calling, names)

"""The plan of one stage in one exported mode: what it runs, takes, sends and holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ...schedules.graph import StageGraph

__all__ = ["KINDS", "MODE_NAMES", "Held", "Kind", "NumberSource", "Program", "StageCode", "Value", "signature"]

MODE_NAMES = {True: "train", False: "eval"}

Kind = Literal["parameter", "buffer", "constant"]
KINDS: dict[InputKind, Kind] = {
    InputKind.PARAMETER: "parameter",
    InputKind.BUFFER: "buffer",
    InputKind.CONSTANT_TENSOR: "constant",
}


@dataclass(frozen=True)
class NumberSource:
    """How a stage gets a symbolic number (a SymInt such as the batch size).

    "const": a plain Python number, written into the graph; "size": dimension
    `dim` of the stage input `source`; "compute": computed on the stage from
    what it has; "carried": sent by an earlier stage as a 0-d tensor.
    """

    how: Literal["const", "size", "compute", "carried"]
    source: fx.Node | None = None
    dim: int = 0
    value: Any = None  # "const"


@dataclass(frozen=True)
class Value:
    """A value a stage takes or sends: a tensor, or a number carried as a 0-d tensor."""

    node: fx.Node
    carried: bool = False


@dataclass
class Held:
    """A parameter, buffer or constant a stage holds: the model's tensor and the names the stage registers it under."""

    tensor: torch.Tensor  # a meta tensor when the model was built by `build_deferred`
    kind: Kind
    names: list[str]  # the graph reads names[0]; the others alias the same tensor, as in the model
    transient: set[str] = field(default_factory=set)  # names kept out of state_dict


@dataclass
class StageCode:
    """One stage of one exported graph: the nodes it runs, in order, and everything they need from elsewhere."""

    inputs: list[Value] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)  # every stage but the last
    results: list[Any] = field(default_factory=list)  # the last stage: the model's flat outputs
    reads: dict[fx.Node, str] = field(default_factory=dict)  # state placeholder -> name the graph reads
    held: list[Held] = field(default_factory=list)
    submodules: dict[str, fx.GraphModule] = field(default_factory=dict)  # get_attr target -> its module
    numbers: dict[fx.Node, NumberSource] = field(default_factory=dict)


@dataclass
class Program:
    """The model exported in one mode, cut into stages."""

    training: bool
    exported: ExportedProgram
    graph: StageGraph
    stages: list[StageCode]


def signature(code: StageCode) -> list[Any]:
    """What must agree between the train and the eval graph of a stage for one stage module to run both."""

    def meta(value: Value) -> Any:
        val = value.node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return (value.carried, val.dtype, tuple(d if isinstance(d, int) else "*" for d in val.shape))
        return (value.carried, type(val).__name__)

    held = sorted(tuple(h.names) for h in code.held if h.kind != "constant")
    return [[meta(v) for v in code.inputs], [meta(v) for v in code.outputs], held]

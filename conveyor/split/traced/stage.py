"""The module of one traced stage: its graph written from the plan, compiled, and run in train or eval mode."""

from __future__ import annotations

import linecache
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from .guards import ShapeGuards
from .program import MODE_NAMES, StageCode

__all__ = ["Calling", "TracedStage", "register", "write_graph"]

_CARRIED_DTYPES = {torch.SymInt: torch.int64, torch.SymFloat: torch.float64, torch.SymBool: torch.bool}


def _scalar_of(value: torch.Tensor) -> int | float | bool:
    """A number that crossed stages as a 0-d tensor, back as a Python number."""
    return value.item()


def write_graph(code: StageCode, last: bool, mode: str, device: torch.device) -> fx.Graph:
    """The graph of one stage in one mode, every device it names turned into `device`."""
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    received: dict[fx.Node, fx.Node] = {}  # numbers carried in, as their 0-d tensor placeholders
    for taken in code.inputs:
        (received if taken.carried else env)[taken.node] = graph.placeholder(taken.node.name)

    def retarget(argument: Any) -> Any:
        return device if isinstance(argument, torch.device) else argument

    def value_of(node: fx.Node) -> Any:
        if node in env:
            return env[node]
        if node in code.reads:  # a parameter, buffer or constant
            env[node] = graph.get_attr(code.reads[node])
            return env[node]
        if node.op == "get_attr":  # the body of a higher-order op (a no_grad region...)
            env[node] = graph.get_attr(f"_{mode}_{node.target}")
            return env[node]
        number = code.numbers[node]
        if number.how == "const":
            return number.value
        if number.how == "size":
            assert number.source is not None
            env[node] = graph.call_function(torch.ops.aten.sym_size.int, (env[number.source], number.dim))
        elif number.how == "carried":
            env[node] = graph.call_function(_scalar_of, (received[node],))
        else:
            env[node] = graph.node_copy(node, value_of)
        return env[node]

    for node in code.nodes:
        env[node] = graph.node_copy(node, value_of)
        # Factory ops (arange, ones...) and conversions were traced with the model's device: follow the stage's.
        env[node].args = fx.node.map_aggregate(env[node].args, retarget)
        env[node].kwargs = fx.node.map_aggregate(env[node].kwargs, retarget)  # type: ignore[assignment]
    if last:
        graph.output(tuple(value_of(r) if isinstance(r, fx.Node) else r for r in code.results))
    else:
        outputs = []
        for sent in code.outputs:
            if sent.carried:
                as_tensor: dict[str, Any] = {"dtype": _CARRIED_DTYPES[type(sent.node.meta["val"])], "device": device}
                number = value_of(sent.node)
                outputs.append(graph.call_function(torch.ops.aten.scalar_tensor.default, (number,), as_tensor))
            else:
                outputs.append(value_of(sent.node))
        graph.output(tuple(outputs))
    graph.lint()
    return graph


def _compile(graph: fx.Graph, name: str) -> Callable[..., Any]:
    """The graph as a function of (module, *inputs); its source is registered so tracebacks show the line."""
    code = graph.python_code(root_module="self")
    filename = f"<conveyor {name}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)
    return namespace["forward"]  # type: ignore[no-any-return]


def register(root: nn.Module, name: str, value: torch.Tensor | nn.Module, kind: str, persistent: bool = True) -> None:
    """Register a parameter, buffer or module under a dotted name, making the empty modules on the way, so that
    names match the full model's."""
    *path, leaf = name.split(".")
    module = root
    for atom in path:
        child = module._modules.get(atom)
        if child is None:
            child = nn.Module()
            module.add_module(atom, child)
        module = child
    if kind == "module":
        assert isinstance(value, nn.Module)
        module.add_module(leaf, value)
    elif kind == "parameter":
        assert isinstance(value, nn.Parameter)
        module.register_parameter(leaf, value)
    else:
        assert isinstance(value, torch.Tensor)
        module.register_buffer(leaf, value, persistent=persistent)


@dataclass(frozen=True)
class Calling:
    """How stage 0 is called (the example's structure) and how the last stage's output is built."""

    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    keywords: tuple[str, ...]
    constants: tuple[tuple[int, Any], ...]  # (flat position, value) of the example's non-tensor inputs

    def __deepcopy__(self, memo: dict[int, Any]) -> Calling:
        return self  # immutable, and copying a TreeSpec warns

    def flatten(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
        """Stage 0's inputs as its graph takes them, flat; raises if they are not structured as the example was."""
        if set(kwargs) != set(self.keywords):
            raise TypeError(
                f"stage 0 was traced with keyword inputs {list(self.keywords)}; got {sorted(kwargs)}:"
                " call it the way the example was given"
            )
        flat, spec = pytree.tree_flatten((args, {key: kwargs[key] for key in self.keywords}))
        if spec != self.in_spec:
            raise TypeError(
                f"stage 0 was traced with {self.in_spec.children_specs[0].num_children} positional input(s) and"
                f" keywords {list(self.keywords)}, structured as in the example; got {len(args)} positional input(s)"
                " or another structure: call it the way the example was given"
            )
        for at, constant in self.constants:
            if isinstance(flat[at], torch.Tensor) or flat[at] != constant:
                raise TypeError(
                    f"stage 0 was traced with the non-tensor input {constant!r} at flat position {at}, baked into"
                    f" its graph; got {flat[at]!r}: trace again with that value"
                )
        return flat


class TracedStage(nn.Module):
    """One stage of a traced split: its parameters and buffers under their full-model names, and its graphs.

    Stage 0 takes the user's micro-batch as the example was given (positional
    and keyword inputs); a later stage takes its in-edges' values positionally.
    Every stage but the last returns a flat tuple of tensors; the last returns
    the model's output in the model's own structure. `.train()` and `.eval()`
    switch between the graphs exported in each mode. Inputs whose shapes break
    what export assumed raise ValueError (`guards.py`).
    """

    def __init__(
        self,
        index: int,
        num_stages: int,
        graphs: Mapping[bool, fx.Graph],
        unavailable: Mapping[bool, str],
        calling: Calling,
        guards: Mapping[bool, ShapeGuards],
    ) -> None:
        super().__init__()
        self.index = index
        self.num_stages = num_stages
        self.graphs = dict(graphs)
        self._unavailable = dict(unavailable)  # mode -> why the stage cannot run in it
        self._calling = calling
        self._guards = dict(guards)
        self._forwards = {mode: _compile(g, f"stage {index} ({MODE_NAMES[mode]})") for mode, g in graphs.items()}

    @property
    def graph(self) -> fx.Graph:
        """The graph the stage runs in its current mode."""
        return self.graphs[self.training]

    def train(self, mode: bool = True) -> TracedStage:
        if mode not in self._forwards:
            raise RuntimeError(f"stage {self.index} cannot run in {MODE_NAMES[mode]} mode: {self._unavailable[mode]}")
        return super().train(mode)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.index == 0:
            inputs = self._calling.flatten(args, kwargs)
        elif kwargs:
            raise TypeError(
                f"stage {self.index} takes its inputs positionally, by the stage graph; got {sorted(kwargs)}"
            )
        else:
            inputs = list(args)
        self._guards[self.training].check(inputs)
        outputs = self._forwards[self.training](self, *inputs)
        if self.index == self.num_stages - 1:
            return pytree.tree_unflatten(list(outputs), self._calling.out_spec)
        return outputs

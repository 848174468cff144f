"""Cutting one exported graph into stages: which stage runs each node, and what travels between stages."""

from __future__ import annotations

import bisect
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, OutputKind

from ...schedules.graph import Edge, StageGraph
from .capture import PIPE_SPLIT
from .flow import gradient_flow
from .program import KINDS, NumberSource, Program, StageCode, Value
from .state import ModelState, ties

__all__ = ["Planner"]

_NUMBERS = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)
_SYMBOLS = (torch.SymInt, torch.SymFloat, torch.SymBool)

# A stage's needs, gathered node by node before the values on each edge are decided.
_Received = list[dict[fx.Node, int]]  # by stage: tensor it takes -> the stage that makes it
_Numbers = list[list[fx.Node]]  # by stage: the numbers its nodes use
_Readers = dict[fx.Node, dict[int, set[str]]]  # state placeholder -> stage -> modules reading it there
_Carried = dict[tuple[int, int], list[fx.Node]]  # (source, destination) -> numbers sent as 0-d tensors


class Planner:
    """Cuts one exported graph into stages: which nodes each runs, which values cross, which state each holds."""

    def __init__(self, model: nn.Module, exported: ExportedProgram, training: bool) -> None:
        self.model = model
        self.exported = exported
        self.training = training
        graph = exported.graph_module.graph
        self.position = {node: at for at, node in enumerate(graph.nodes)}
        specs = {spec.arg.name: spec for spec in exported.graph_signature.input_specs}
        self.user_inputs: list[fx.Node] = []
        state: dict[fx.Node, InputSpec] = {}
        for node in graph.find_nodes(op="placeholder"):
            spec = specs[node.name]
            if spec.kind == InputKind.USER_INPUT:
                self.user_inputs.append(node)
            elif spec.kind in KINDS:
                state[node] = spec
            else:
                raise ValueError(
                    f"the exported {type(model).__name__} takes a {spec.kind.name.lower()} input ({node.name}),"
                    " which the traced split cannot place on a stage: split it by hand with conveyor.split_model"
                )
        self.state = ModelState(model, exported, training, state)
        # Export's training IR updates buffers in place (running stats): the graph returns only the model's outputs.
        self.results: list[Any] = []
        flat_outputs = graph.output_node().args[0]
        assert isinstance(flat_outputs, (tuple, list))
        for value, out in zip(flat_outputs, exported.graph_signature.output_specs, strict=True):
            if out.kind == OutputKind.USER_OUTPUT:
                self.results.append(value)
            else:
                raise ValueError(
                    f"the exported {type(model).__name__} returns a {out.kind.name.lower()} ({out.target or value}),"
                    " which the traced split does not support: split it by hand with conveyor.split_model"
                )
        self.order = [node for node in graph.nodes if node.op == "call_function"]
        self.modules = {name for name, _ in model.named_modules(remove_duplicate=False)}
        self.stage_of: dict[fx.Node, int] = {}
        self.codes: list[StageCode] = []
        trainable = {
            node
            for node, spec in state.items()
            if spec.kind == InputKind.PARAMETER and self.state.tensor(spec).requires_grad
        }
        self.flows = gradient_flow(graph, state, trainable)

    def plan(self, points: Sequence[tuple[str, str]], markers: bool) -> Program:
        """Cut at `points` (and at pipe_split() markers, if `markers`) and plan every stage."""
        cuts = self.cuts(points, markers)
        self.assign(cuts)
        num_stages = len(cuts) + 1
        self.codes = [StageCode() for _ in range(num_stages)]
        self.codes[0].inputs = [Value(node) for node in self.user_inputs]
        received: _Received = [{} for _ in range(num_stages)]
        numbers: _Numbers = [[] for _ in range(num_stages)]
        readers: _Readers = {}
        for node in self.order:
            if node in self.stage_of:
                self.codes[self.stage_of[node]].nodes.append(node)
                for value in node.all_input_nodes:
                    self._need(value, self.stage_of[node], received, numbers, readers, node)
        for value in self.results:
            if isinstance(value, fx.Node):
                self._need(value, num_stages - 1, received, numbers, readers, None)
        self.codes[-1].results = list(self.results)
        # The tensors a stage takes, for now: how it gets its numbers depends on which sizes they have.
        for stage in range(1, num_stages):
            self.codes[stage].inputs = [Value(v) for v in sorted(received[stage], key=self.position.__getitem__)]
        carried: _Carried = {}
        for stage in range(num_stages):
            for value in numbers[stage]:
                self.obtain(value, stage, carried)
        edges = self._edges(received, carried)
        self.state.place(self.codes, readers, self._stage_running)
        return Program(self.training, self.exported, StageGraph(num_stages, edges, ties(self.codes)), self.codes)

    # Where the cuts are

    def is_number(self, node: fx.Node) -> bool:
        """A SymInt (or int...) rather than a tensor: made on every stage that needs it, not on one."""
        return node.op == "call_function" and isinstance(node.meta.get("val"), _NUMBERS)

    def runs(self, node: fx.Node) -> bool:
        """A node that runs on one stage: not a marker, not a number."""
        return node.op == "call_function" and node.target is not PIPE_SPLIT and not self.is_number(node)

    def module_paths(self, node: fx.Node) -> list[str]:
        """The dotted names of the model's modules whose forward `node` runs inside, outermost first."""
        stack = node.meta.get("nn_module_stack") or {}
        return [path for path, _ in stack.values() if path in self.modules]

    def cut_position(self, name: str, where: str) -> int:
        """The position in `order` of the first node after a split point."""
        inside = [at for at, node in enumerate(self.order) if self.runs(node) and name in self.module_paths(node)]
        if not inside:
            raise ValueError(
                f"split point {name!r} runs no operation in the exported graph of {type(self.model).__name__}"
                " (it is never called, or folded into constants): cut at another submodule"
            )
        return inside[0] if where == "beginning" else inside[-1] + 1

    def cuts(self, points: Sequence[tuple[str, str]], markers: bool) -> list[tuple[int, str]]:
        """(position in `order`, how the user asked for it) of every cut, in execution order."""
        found: list[tuple[int, str]] = []
        for name, where in points:
            at = self.cut_position(name, where)
            if found and at < found[-1][0]:
                in_order = dict(sorted(points, key=lambda point: self.cut_position(*point)))
                raise ValueError(
                    f"split points must follow the order the model runs them: {name!r} ({where}) comes before"
                    f" {found[-1][1]}; list them as {in_order}"
                )
            found.append((at, f"{name!r} ({where})"))
        marked = [at for at, node in enumerate(self.order) if node.target is PIPE_SPLIT]
        if marked and not markers:
            raise ValueError(
                f"{type(self.model).__name__} marks {len(marked)} cut(s) with pipe_split(), and num_stages or"
                " layers_per_stage asks for others: remove the markers, or use split_points (they add to the markers)"
            )
        return sorted(found + [(at, f"pipe_split() #{k}") for k, at in enumerate(marked, 1)])

    def assign(self, cuts: list[tuple[int, str]]) -> None:
        """The stage of every node that runs; raises if a stage would run nothing."""
        positions = [at for at, _ in cuts]
        work = [0] * (len(cuts) + 1)
        for at, node in enumerate(self.order):
            if not self.runs(node):
                continue
            source = node.args[0] if node.target is operator.getitem else None
            if isinstance(source, fx.Node) and source in self.stage_of:
                # The parts of a multi-output op stay with it: tensors cross stages, a tuple never does.
                self.stage_of[node] = self.stage_of[source]
                continue
            self.stage_of[node] = bisect.bisect_right(positions, at)
            work[self.stage_of[node]] += 1
        for stage, done in enumerate(work):
            if not done:
                after = cuts[stage - 1][1] if stage else "the start of the model"
                before = cuts[stage][1] if stage < len(cuts) else "the end of the model"
                raise ValueError(
                    f"stage {stage} of {len(cuts) + 1} would run nothing: nothing runs between {after} and {before};"
                    " drop one of those cuts"
                )

    def _stage_running(self, path: str) -> int:
        """The first stage running a node inside module `path`, or else inside its nearest ancestor that runs any."""
        while True:
            for node, stage in self.stage_of.items():
                if path in self.module_paths(node):
                    return stage
            if not path:
                return 0
            path = path.rpartition(".")[0]

    # What crosses between stages

    def _need(
        self,
        value: fx.Node,
        stage: int,
        received: _Received,
        numbers: _Numbers,
        readers: _Readers,
        user: fx.Node | None,
    ) -> None:
        """Note that `stage` uses `value` (in node `user`, or as a model output if None)."""
        if value in self.state.specs:
            paths = readers.setdefault(value, {}).setdefault(stage, set())
            paths.update(self.module_paths(user) if user is not None else ())
        elif value.op == "get_attr":
            module = getattr(self.exported.graph_module, str(value.target))
            self.codes[stage].submodules[str(value.target)] = module
        elif self.is_number(value):
            if value not in numbers[stage]:
                numbers[stage].append(value)
        else:
            source = 0 if value in self.user_inputs else self.stage_of[value]
            if source != stage:
                if not isinstance(value.meta.get("val"), torch.Tensor):
                    raise ValueError(
                        f"{value.name} (a {type(value.meta.get('val')).__name__}) is made on stage {source} and used"
                        f" on stage {stage}, but only tensors travel between stages: cut elsewhere"
                    )
                received[stage][value] = source

    def obtain(self, value: fx.Node, stage: int, carried: _Carried) -> None:
        """Decide how `stage` gets the number `value`: as a constant, as a size of one of its inputs, computed from
        what it has, or else sent by the first stage that can compute it, as a 0-d tensor."""
        numbers = self.codes[stage].numbers
        if value in numbers:
            return
        meta = value.meta["val"]
        size = self._size_among_inputs(meta, stage)
        if not isinstance(meta, _SYMBOLS):
            numbers[value] = NumberSource("const", value=meta)
        elif size is not None:
            numbers[value] = NumberSource("size", *size)
        elif self._computable(value, stage) or self._home(value) == stage:
            numbers[value] = NumberSource("compute")
            for arg in value.all_input_nodes:
                if self.is_number(arg):
                    self.obtain(arg, stage, carried)
                elif not self._local(arg, stage):
                    raise ValueError(
                        f"{value.name} ({value.target}) needs {arg.name} from an earlier stage on stage {stage}:"
                        " cut elsewhere"
                    )
        else:
            home = self._home(value)
            numbers[value] = NumberSource("carried")
            carried.setdefault((home, stage), []).append(value)
            self.obtain(value, home, carried)

    def _size_among_inputs(self, meta: Any, stage: int) -> tuple[fx.Node, int] | None:
        """(input, dim) of a tensor `stage` takes whose size along dim is the symbol `meta`, if any."""
        if not isinstance(meta, torch.SymInt):
            return None
        for value in self.codes[stage].inputs:
            for dim, size in enumerate(getattr(value.node.meta.get("val"), "shape", ())):
                if isinstance(size, torch.SymInt) and size.node.expr == meta.node.expr:
                    return value.node, dim
        return None

    def _computable(self, value: fx.Node, stage: int) -> bool:
        """Whether `stage` can compute `value` from what it has, without anything carried to it."""
        for arg in value.all_input_nodes:
            if self.is_number(arg):
                meta = arg.meta["val"]
                if isinstance(meta, _SYMBOLS) and self._size_among_inputs(meta, stage) is None:
                    if not self._computable(arg, stage):
                        return False
            elif not self._local(arg, stage):
                return False
        return True

    def _local(self, tensor: fx.Node, stage: int) -> bool:
        """Whether `stage` has `tensor`: it takes it, or makes it."""
        return any(tensor is value.node for value in self.codes[stage].inputs) or self.stage_of.get(tensor) == stage

    def _home(self, value: fx.Node) -> int:
        """The first stage that can compute a number: the latest among the stages of the values it is made from."""
        stages = [0]
        for arg in value.all_input_nodes:
            if self.is_number(arg):
                stages.append(self._home(arg))
            elif arg in self.stage_of:
                stages.append(self.stage_of[arg])
        return max(stages)

    def _edges(self, received: _Received, carried: _Carried) -> tuple[Edge, ...]:
        """Each stage's outputs (all a later stage takes from it), the edges naming them, and each stage's inputs."""
        sends: dict[tuple[int, int], list[Value]] = {}
        for stage, taken in enumerate(received):
            for value, source in taken.items():
                sends.setdefault((source, stage), []).append(Value(value))
        for (source, stage), numbers in carried.items():
            sends.setdefault((source, stage), []).extend(Value(number, carried=True) for number in numbers)
        for stage in range(len(self.codes) - 1):
            sent = {value for (source, _), values in sends.items() if source == stage for value in values}
            self.codes[stage].outputs = sorted(sent, key=lambda v: (v.carried, self.position[v.node]))
        edges = []
        for (source, stage), values in sorted(sends.items()):
            outputs = self.codes[source].outputs
            indices = tuple(sorted(outputs.index(value) for value in values))
            grad = any(not value.carried and self.flows[value.node] for value in values)
            edges.append(Edge(source, stage, None if indices == tuple(range(len(outputs))) else indices, grad))
        for stage in range(1, len(self.codes)):
            # The graph.py convention: in-edges by source stage, each edge's values in the order it lists them.
            self.codes[stage].inputs = [
                self.codes[edge.src].outputs[at]
                for edge in sorted(e for e in edges if e.dst == stage)
                for at in (edge.values if edge.values is not None else range(len(self.codes[edge.src].outputs)))
            ]
        return tuple(edges)

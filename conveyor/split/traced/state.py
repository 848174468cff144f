"""Which stage holds each parameter, buffer and constant an exported graph reads, and under which names."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec

from ...schedules.graph import Tie
from .capture import where_in_trace
from .flow import written_args
from .program import KINDS, MODE_NAMES, Held, Kind, StageCode

__all__ = ["ModelState", "ties"]


class ModelState:
    """The model's parameters, buffers and constants, as the placeholders of one exported graph read them."""

    def __init__(
        self, model: nn.Module, exported: ExportedProgram, training: bool, specs: dict[fx.Node, InputSpec]
    ) -> None:
        self.model = model
        self.exported = exported
        self.training = training
        self.specs = specs  # placeholder -> what it reads

    def tensor(self, spec: InputSpec) -> torch.Tensor:
        """The model's tensor (or the exported program's constant) a placeholder reads."""
        assert spec.target is not None
        if spec.kind == InputKind.PARAMETER:
            return self.model.get_parameter(spec.target)
        if spec.kind == InputKind.BUFFER:
            return self.model.get_buffer(spec.target)
        constant = self.exported.constants[spec.target]
        if not isinstance(constant, torch.Tensor):
            raise ValueError(f"constant {spec.target} is a {type(constant).__name__}, which no stage can hold")
        if constant.device.type == "meta":
            # A tensor made from data in forward on the input's device: on the meta device its data is gone.
            raise ValueError(
                f"{type(self.model).__name__}'s forward{self._where_read(spec)} makes a tensor from data"
                " (torch.tensor([...], device=x.device), say) on the meta device when trace_split gets a builder,"
                " where it has no values to give a stage: make it on the CPU and move it"
                " (torch.tensor([...]).to(x.device)), or register it as a buffer in the builder, or give trace_split"
                " the built model"
            )
        return constant

    def place(
        self,
        codes: list[StageCode],
        readers: dict[fx.Node, dict[int, set[str]]],
        stage_running: Callable[[str], int],
    ) -> None:
        """Hold each tensor on every stage that reads it, under the aliases that stage's modules use.

        `readers`: placeholder -> stage -> the modules whose nodes read it there; `stage_running(path)`: the stage
        that runs module `path`, for a tensor no node reads (it goes with its module, so that every entry of the
        model's state_dict is on some stage).
        """
        groups: dict[int, list[fx.Node]] = {}  # by tensor: a tied parameter has a placeholder per alias it is read by
        for placeholder, spec in self.specs.items():
            groups.setdefault(id(self.tensor(spec)), []).append(placeholder)
        for placeholders in groups.values():
            spec = self.specs[placeholders[0]]
            tensor = self.tensor(spec)
            kind = KINDS[spec.kind]
            paths: dict[int, set[str]] = {}
            for placeholder in placeholders:
                for stage, modules in readers.get(placeholder, {}).items():
                    paths.setdefault(stage, set()).update(modules)
            if kind == "constant":
                # A constant is registered as a buffer named for its mode (the other mode's export has its own copy).
                names = [f"_{MODE_NAMES[self.training]}_{str(spec.target).replace('.', '_')}"]
                for stage in paths:
                    _hold(codes[stage], placeholders, Held(tensor, kind, list(names), set(names)))
                continue
            aliases = self._aliases(tensor, kind)
            if not paths:  # read by no node: it goes with its module
                paths[stage_running(aliases[0].rpartition(".")[0])] = set()
            placed: list[Held] = []
            for stage in sorted(paths):
                names = [alias for alias in aliases if alias.rpartition(".")[0] in paths[stage]] or [aliases[0]]
                placed.append(_hold(codes[stage], placeholders, Held(tensor, kind, names)))
            # Aliases no stage's modules read go to the first holder, so state_dict has every name somewhere.
            taken = {name for held in placed for name in held.names}
            placed[0].names.extend(alias for alias in aliases if alias not in taken)
            for held in placed:
                held.transient = {name for name in held.names if not self._persistent(name, kind)}
        self._check_updated_buffers(codes)

    def _check_updated_buffers(self, codes: list[StageCode]) -> None:
        for stage, code in enumerate(codes):
            for node in code.nodes:
                for arg in written_args(node):
                    spec = self.specs.get(arg)
                    if spec is None or spec.kind != InputKind.BUFFER:
                        continue
                    tensor = self.tensor(spec)
                    others = [s for s, c in enumerate(codes) if s != stage and any(h.tensor is tensor for h in c.held)]
                    if others:
                        raise ValueError(
                            f"buffer {spec.target} is updated on stage {stage} and read on stage(s) {others}, which"
                            " would each update a copy of their own: cut so that its module stays on one stage"
                        )

    def _where_read(self, spec: InputSpec) -> str:
        """Where the model's code first uses what a placeholder reads, as `where_in_trace` says it."""
        for placeholder in self.specs:
            if placeholder.name == spec.arg.name:
                for user in placeholder.users:
                    where = where_in_trace(user.meta.get("stack_trace") or "")
                    if where:
                        return where
        return ""

    def _aliases(self, tensor: torch.Tensor, kind: Kind) -> list[str]:
        named = self.model.named_parameters if kind == "parameter" else self.model.named_buffers
        return [name for name, t in named(remove_duplicate=False) if t is tensor]

    def _persistent(self, name: str, kind: Kind) -> bool:
        if kind == "parameter":
            return True
        module, _, leaf = name.rpartition(".")
        return leaf not in self.model.get_submodule(module)._non_persistent_buffers_set


def _hold(code: StageCode, placeholders: list[fx.Node], held: Held) -> Held:
    code.held.append(held)
    for placeholder in placeholders:
        code.reads[placeholder] = held.names[0]
    return held


def ties(codes: list[StageCode]) -> tuple[Tie, ...]:
    """Parameters held by several stages, by stage, under the name each stage's graph reads."""
    by_tensor: dict[int, list[tuple[int, str]]] = {}
    for stage, code in enumerate(codes):
        for held in code.held:
            if held.kind == "parameter":
                by_tensor.setdefault(id(held.tensor), []).append((stage, held.names[0]))
    return tuple(Tie(tuple(names)) for names in by_tensor.values() if len(names) > 1)

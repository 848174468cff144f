"""Manual splitting: a stage's module is the user's model with every layer it does not own removed.

Two model shapes are understood:

* an `nn.Sequential`: its children are the layers;
* a model whose forward runs some modules, then loops over a block container
  (`nn.ModuleList`, `nn.ModuleDict` or `nn.Sequential`, possibly nested, as
  GPT-2's ``transformer.h``), then some more modules: the Transformer of
  torch's pipelining tutorial. The blocks are the layers; modules registered
  before the container (at every level of its path) go to the first stage,
  modules after it to the last. On other stages they are set to None, so the
  model's forward must skip a None module (``h = self.norm(h) if self.norm else h``);
  for a model whose forward cannot, use the traced split (`split/traced/`).

Removed blocks are deleted without renumbering the rest, so a stage's
parameters keep their names in the full model (``layers.5.attn.weight``), and
checkpoints move between stage counts. A parameter that modules of several
stages share (a token embedding reused by the output head) is tied: each of
those stages keeps a copy, and the pipeline sums their gradients.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..schedules import StageGraph, Tie
from .materialize import DeferredModel, build_deferred

__all__ = ["Layout", "ManualSplit", "even_split", "layout_of", "manual_split", "split_model", "stage_plan"]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


@dataclass(frozen=True)
class Layout:
    """Where a model's layers are: `container` holds `blocks`; `first`/`last` go to the end stages."""

    container: str  # dotted path of the block container; "" when the model itself is a Sequential
    blocks: tuple[str, ...]  # child names inside the container, in order
    first: tuple[str, ...] = ()  # dotted paths of the modules before the container
    last: tuple[str, ...] = ()  # and after it


def layout_of(model: nn.Module, blocks: str | None = None) -> Layout:
    """Find the layers of `model`; `blocks` names the block container (dotted) when it cannot be found alone."""
    if isinstance(model, nn.Sequential) and blocks is None:
        return Layout("", tuple(name for name, _ in model.named_children()))
    if blocks is None:
        found = _outermost_containers(model)
        if len(found) != 1:
            kinds = "/".join(c.__name__ for c in _CONTAINERS)
            raise ValueError(
                f"{type(model).__name__} has {len(found)} {kinds} modules outside any other"
                f" ({', '.join(found) or 'none'}): name the one that holds the repeated blocks with blocks='...'"
            )
        blocks = found[0]
    try:
        container = model.get_submodule(blocks)
    except AttributeError:
        container = None
    if not isinstance(container, _CONTAINERS):
        found = [n for n, m in model.named_modules() if isinstance(m, _CONTAINERS) and n]
        raise ValueError(
            f"{type(model).__name__} has no block container {blocks!r}; its {'/'.join(c.__name__ for c in _CONTAINERS)}"
            f" modules are {found}"
        )
    first: list[str] = []
    last: list[str] = []
    parts = blocks.split(".")
    for depth in range(len(parts)):
        parent = model.get_submodule(".".join(parts[:depth]))
        prefix = "".join(f"{p}." for p in parts[:depth])
        names = [name for name, _ in parent.named_children()]
        at = names.index(parts[depth])
        first += [prefix + n for n in names[:at]]
        last[:0] = [prefix + n for n in names[at + 1 :]]
    return Layout(blocks, tuple(name for name, _ in container.named_children()), tuple(first), tuple(last))


def _outermost_containers(model: nn.Module) -> list[str]:
    """Block containers of `model` that sit inside no other (a block's own Sequential does not count)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if name and isinstance(module, _CONTAINERS) and not any(name.startswith(f"{outer}.") for outer in found):
            found.append(name)
    return found


def even_split(num_layers: int, num_stages: int) -> list[int]:
    """Layers per stage, as even as possible; earlier stages take the remainder."""
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if stage < extra else 0) for stage in range(num_stages)]


def stage_plan(layout: Layout, num_stages: int, layers_per_stage: Sequence[int] | None = None) -> list[list[str]]:
    """For each stage, the module paths it owns (first/last modules included)."""
    counts = list(layers_per_stage) if layers_per_stage is not None else even_split(len(layout.blocks), num_stages)
    if len(counts) != num_stages:
        raise ValueError(f"layers_per_stage has {len(counts)} entries for {num_stages} stages")
    if any(n < 0 for n in counts) or sum(counts) != len(layout.blocks):
        raise ValueError(
            f"layers_per_stage {counts} must be non-negative and add up to the model's {len(layout.blocks)} layers"
        )
    prefix = f"{layout.container}." if layout.container else ""
    plan, at = [], 0
    for stage, count in enumerate(counts):
        owned = [prefix + name for name in layout.blocks[at : at + count]]
        at += count
        if stage == 0:
            owned = [*layout.first, *owned]
        if stage == num_stages - 1:
            owned = [*owned, *layout.last]
        if not owned:
            # An even split leaves stages without blocks at the end, where only the last one has `last`
            # modules to own; explicit counts can also give a stage of its own to the `first` modules.
            most = len(layout.blocks) + bool(layout.last) + (bool(layout.first) if layers_per_stage is not None else 0)
            raise ValueError(
                f"stage {stage} would own no layers (layers_per_stage {counts}, {len(layout.blocks)} layers):"
                f" use at most {most} stages or give it a layer"
            )
        plan.append(owned)
    return plan


@dataclass
class ManualSplit:
    """A model cut by hand into stages: the plan, the stage graph (a chain, with ties), and the stage modules.

    Built by `manual_split`. Every rank can make one cheaply (a function is
    only called on the meta device); `build_stage` then materializes one stage.
    """

    source: nn.Module | DeferredModel
    layout: Layout
    plan: list[list[str]]
    graph: StageGraph
    init: Callable[[nn.Module], None] | None = None
    _owner: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def num_stages(self) -> int:
        return len(self.plan)

    def build_stage(self, stage: int, device: torch.device | str = "cpu") -> nn.Module:
        """The module of `stage`: the model's layers it owns (weights copied, or materialized on the CPU
        exactly as a CPU build with the split's seed would make them), on `device`."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} does not exist in a {self.num_stages}-stage pipeline")
        if isinstance(self.source, nn.Module):
            return self._keep_only(self.source, stage).to(device)
        kept = self._keep_only(self.source.module, stage)
        # Initialized on the CPU whatever `device` is: a GPU's generator draws other numbers from the same
        # seed, and the same seed should give the same weights on every device.
        if self.init is not None:
            kept.to_empty(device="cpu")
            self.init(kept)
            return kept.to(device)
        tensors = [*kept.named_parameters(remove_duplicate=False), *kept.named_buffers(remove_duplicate=False)]
        values = self.source.materialize([name for name, _ in tensors])
        kept.to_empty(device="cpu")  # keeps tensors shared within the stage shared
        with torch.no_grad():
            for name, tensor in [*kept.named_parameters(), *kept.named_buffers()]:
                tensor.copy_(values[name])
        return kept.to(device)

    def _keep_only(self, model: nn.Module, stage: int) -> nn.Module:
        """A copy of `model` without the modules `stage` does not own (a meta model's copy costs nothing)."""
        layout = self.layout
        owned = set(self.plan[stage])
        prefix = f"{layout.container}." if layout.container else ""
        dropped_blocks = [name for name in layout.blocks if prefix + name not in owned]
        dropped_ends = [path for path in (*layout.first, *layout.last) if path not in owned]
        # Map every dropped module to None in the copy, so it is never copied.
        memo: dict[int, object] = {id(model.get_submodule(prefix + n)): None for n in dropped_blocks}
        memo.update({id(model.get_submodule(path)): None for path in dropped_ends})
        model = copy.deepcopy(model, memo)
        container = model.get_submodule(layout.container)
        for name in dropped_blocks:
            # Module.__delattr__ removes the child without renumbering its siblings
            # (unlike `del module_list[i]`), so parameter names stay those of the full model.
            delattr(container, name)
        for path in dropped_ends:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, None)
        return model


def manual_split(
    model: nn.Module | Callable[[], nn.Module],
    num_stages: int,
    layers_per_stage: Sequence[int] | None = None,
    *,
    blocks: str | None = None,
    init: Callable[[nn.Module], None] | None = None,
    seed: int = 0,
) -> ManualSplit:
    """Plan a manual split of `model` into `num_stages` stages (see `ManualSplit`).

    `model` is a built model (stages copy its weights; the model is left as
    it is) or a function that builds it: then it is built once on the meta
    device, and each stage's tensors are later materialized with exactly the
    values `torch.manual_seed(seed); model()` would give them on the CPU,
    buffers and modules without `reset_parameters` included. `init(stage_module)`
    replaces that with your own initialization.
    """
    if num_stages < 1:
        raise ValueError(f"a pipeline needs at least 1 stage; got {num_stages}")
    source: nn.Module | DeferredModel = model if isinstance(model, nn.Module) else build_deferred(model, seed)
    structure = source if isinstance(source, nn.Module) else source.module
    layout = layout_of(structure, blocks)
    plan = stage_plan(layout, num_stages, layers_per_stage)
    graph = StageGraph.chain(num_stages, _ties(structure, plan))
    return ManualSplit(source, layout, plan, graph, init)


def _ties(model: nn.Module, plan: list[list[str]]) -> list[Tie]:
    """Parameters reachable under names owned by different stages (one name per stage).

    A parameter of the root module itself (no layer owns it) stays on every
    stage, so every stage holds it and it is tied across all of them.
    """

    def owner(name: str) -> int | None:
        for stage, paths in enumerate(plan):
            if any(name.startswith(f"{path}.") for path in paths):
                return stage
        return None

    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    ties = []
    for names in by_tensor.values():
        on: dict[int, str] = {}
        for name in names:
            stage = owner(name)
            for s in range(len(plan)) if stage is None else [stage]:
                on.setdefault(s, name)
        if len(on) > 1:
            ties.append(Tie(tuple(sorted(on.items()))))
    return ties


def split_model(
    model: nn.Module | Callable[[], nn.Module],
    stage: int,
    num_stages: int,
    layers_per_stage: Sequence[int] | None = None,
    *,
    blocks: str | None = None,
    device: torch.device | str = "cpu",
    init: Callable[[nn.Module], None] | None = None,
    seed: int = 0,
) -> nn.Module:
    """The module of stage `stage` of `num_stages`, keeping only the layers it owns (see `manual_split`).

    A stage alone cannot keep a parameter it shares with another stage tied:
    this warns when that happens; pass `manual_split(...)` to `Pipeline` instead,
    which sums the shared gradients.
    """
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} does not exist in a {num_stages}-stage pipeline")
    split = manual_split(model, num_stages, layers_per_stage, blocks=blocks, init=init, seed=seed)
    ties = split.graph.ties_of(stage)
    if ties:
        shared = "; ".join(" = ".join(f"stage {s} {name}" for s, name in tie.names) for tie in ties)
        warnings.warn(
            f"stage {stage} shares parameters with other stages ({shared}); split_model returns the stage alone,"
            " so training it would untie them and silently diverge from the model: give"
            " Pipeline(manual_split(model, num_stages), ...) (or Pipeline.from_model) the whole split instead",
            stacklevel=2,
        )
    return split.build_stage(stage, device)

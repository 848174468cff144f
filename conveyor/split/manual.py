"""Manual splitting: a stage's module is the user's model with every layer it does not own removed.

Two model shapes are understood:

* an `nn.Sequential`: its children are the layers;
* a model whose forward runs some modules, then loops over a block container
  (`nn.ModuleList`, `nn.ModuleDict` or `nn.Sequential`), then some more
  modules: the Transformer of torch's pipelining tutorial. The blocks are the
  layers; modules registered before the container go to the first stage,
  modules after it to the last. On other stages they are set to None, so the
  model's forward must skip a None module (``h = self.norm(h) if self.norm else h``).

Removed blocks are deleted without renumbering the rest, so a stage's
parameters keep their names in the full model (``layers.5.attn.weight``), and
checkpoints move between stage counts.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Layout", "layout_of", "split_model", "even_split", "stage_plan"]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


@dataclass(frozen=True)
class Layout:
    """Where a model's layers are: `container` holds `blocks`; `first`/`last` go to the end stages."""

    container: str  # attribute path of the block container; "" when the model itself is a Sequential
    blocks: tuple[str, ...]  # child names inside the container, in order
    first: tuple[str, ...] = ()
    last: tuple[str, ...] = ()


def layout_of(model: nn.Module, blocks: str | None = None) -> Layout:
    """Find the layers of `model`; `blocks` names the block container when there are several."""
    if isinstance(model, nn.Sequential) and blocks is None:
        return Layout("", tuple(name for name, _ in model.named_children()))
    children = list(model.named_children())
    if blocks is None:
        found = [name for name, child in children if isinstance(child, _CONTAINERS)]
        if len(found) != 1:
            kinds = "/".join(c.__name__ for c in _CONTAINERS)
            raise ValueError(
                f"{type(model).__name__} has {len(found)} {kinds} children ({', '.join(found) or 'none'}):"
                " name the one that holds the repeated blocks with blocks='...'"
            )
        blocks = found[0]
    names = [name for name, _ in children]
    if blocks not in names or not isinstance(getattr(model, blocks), _CONTAINERS):
        raise ValueError(f"{type(model).__name__} has no block container {blocks!r}; its children are {names}")
    at = names.index(blocks)
    container = getattr(model, blocks)
    return Layout(
        blocks, tuple(name for name, _ in container.named_children()), tuple(names[:at]), tuple(names[at + 1 :])
    )


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
    """The module of stage `stage` of `num_stages`, keeping only the layers it owns.

    `model` is either a built model (its kept layers are copied, with their
    weights; the model itself is left as it is) or a function that builds it.
    A function is called on the meta device, so the full model never takes
    memory: only the stage's own layers are materialized and initialized
    (on the CPU, then moved to `device`), by `init(stage_module)` if given,
    else by each submodule's `reset_parameters()` seeded from `seed` and the
    submodule's name (so a layer starts with the same weights whatever the
    number of stages, and whatever the device).
    """
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} does not exist in a {num_stages}-stage pipeline")
    if isinstance(model, nn.Module):
        return _keep_only(model, stage, num_stages, layers_per_stage, blocks, copy_weights=True).to(device)
    with torch.device("meta"):
        full = model()
    kept = _keep_only(full, stage, num_stages, layers_per_stage, blocks, copy_weights=False)
    # Initialized on the CPU whatever `device` is: a GPU's generator draws other numbers from the same
    # seed, and the same seed should give the same weights on every device.
    kept.to_empty(device="cpu")
    if init is not None:
        init(kept)
    else:
        _reset_by_name(kept, seed)
    return kept.to(device)


def _keep_only(
    model: nn.Module,
    stage: int,
    num_stages: int,
    layers_per_stage: Sequence[int] | None,
    blocks: str | None,
    copy_weights: bool,
) -> nn.Module:
    layout = layout_of(model, blocks)
    owned = set(stage_plan(layout, num_stages, layers_per_stage)[stage])
    prefix = f"{layout.container}." if layout.container else ""
    dropped_blocks = [name for name in layout.blocks if prefix + name not in owned]
    dropped_ends = [name for name in (*layout.first, *layout.last) if name not in owned]
    container = model.get_submodule(layout.container)
    if copy_weights:
        # Copy the model, but map every dropped module to None so it is never copied.
        memo: dict[int, object] = {id(container.get_submodule(n)): None for n in dropped_blocks}
        memo.update({id(model.get_submodule(n)): None for n in dropped_ends})
        model = copy.deepcopy(model, memo)
        container = model.get_submodule(layout.container)
    for name in dropped_blocks:
        # Module.__delattr__ removes the child without renumbering its siblings
        # (unlike `del module_list[i]`), so parameter names stay those of the full model.
        delattr(container, name)
    for name in dropped_ends:
        setattr(model, name, None)
    return model


def _reset_by_name(module: nn.Module, seed: int) -> None:
    uncovered = []
    for name, sub in module.named_modules():
        has_own_state = any(True for _ in sub.parameters(recurse=False)) or any(
            True for _ in sub.buffers(recurse=False)
        )
        if not has_own_state:
            continue
        reset = getattr(sub, "reset_parameters", None)
        if not callable(reset):
            uncovered.append(name or type(module).__name__)
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + zlib.crc32(name.encode()))
            reset()
    if uncovered:
        raise ValueError(
            f"after building on the meta device, {', '.join(uncovered)} hold parameters or buffers but have no"
            " reset_parameters() to initialize them: pass init=<function of the stage module>, or give a built model"
        )

"""A manual split's layers as a planner sees them: the modules before the blocks, each block, the modules after.

The modules before the block container always share the first stage and those after it the last
(`split/manual.py`), so each end is one layer here: no cut can fall inside it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from torch import nn

from ..observe.profile import LayerProfile, profile_layers
from ..runtime.stage import LossFn
from ..schedules import StageGraph
from ..split import Layout, ManualSplit, manual_split

__all__ = ["fingerprint", "layer_names", "layer_split", "profile_model"]


def layer_split(model: nn.Module | Callable[[], nn.Module], *, blocks: str | None = None, seed: int = 0) -> ManualSplit:
    """`model` cut into one stage per layer (see the module docstring): stage i's module is layer i alone."""
    whole = manual_split(model, 1, blocks=blocks, seed=seed)
    layout = whole.layout
    prefix = f"{layout.container}." if layout.container else ""
    units = [[prefix + name] for name in layout.blocks]
    if layout.first:
        units.insert(0, list(layout.first))
    if layout.last:
        units.append(list(layout.last))
    return ManualSplit(whole.source, layout, units, StageGraph.chain(len(units)), whole.init)


def layer_names(layout: Layout) -> list[str]:
    """The planner's names of the layers: `a+b` for an end's modules, the dotted path of each block."""
    prefix = f"{layout.container}." if layout.container else ""
    names = [prefix + name for name in layout.blocks]
    if layout.first:
        names.insert(0, "+".join(layout.first))
    if layout.last:
        names.append("+".join(layout.last))
    return names


def fingerprint(split: ManualSplit) -> str:
    """A short hash of the model's layers and every parameter's name, shape and dtype: what a plan is for."""
    source = split.source
    structure = source if isinstance(source, nn.Module) else source.module
    layout = split.layout
    shapes = [(name, list(p.shape), str(p.dtype)) for name, p in structure.named_parameters(remove_duplicate=False)]
    text = json.dumps([layout.container, layout.blocks, layout.first, layout.last, shapes])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def profile_model(
    model: nn.Module | Callable[[], nn.Module],
    example_input: Any,
    example_target: Any,
    loss_fn: LossFn,
    *,
    optimizer: str = "adamw",
    blocks: str | None = None,
    seed: int = 0,
    repeats: int = 5,
    warmup: int = 2,
    latency: float = 0.0,
) -> LayerProfile:
    """Profile each layer of `model` on one micro-batch (`example_input`, its target) in this process.

    Builds one layer at a time (a function is built on the meta device and only that layer materialized),
    so the whole model never needs to fit. See `conveyor.observe.profile.profile_layers`.
    """
    units = layer_split(model, blocks=blocks, seed=seed)
    modules = [units.build_stage(i) for i in range(units.num_stages)]
    profile = profile_layers(
        modules,
        example_input,
        example_target,
        loss_fn,
        names=layer_names(units.layout),
        optimizer=optimizer,
        fingerprint=fingerprint(units),
        repeats=repeats,
        warmup=warmup,
        latency=latency,
    )
    return LayerProfile(
        profile.fingerprint,
        profile.microbatch_size,
        profile.optimizer,
        profile.layers,
        profile.latency,
        bool(units.layout.first),
        bool(units.layout.last),
    )

"""A model's layers as a planner sees them: the modules before the blocks, each block, the modules after.

The modules before the block container always share the first stage and those after it the last
(`split/manual.py`; the traced split cuts the same way, `split/traced/points.py`), so each end is one layer
here: no cut can fall inside it. A manual split's layers chain, and `profile_layers` runs them one after
another; a traced split's need not (a value of the first reaches every block, the embedding and the head
share a weight), and `profile_split` runs them through the runtime on one rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..observe.profile import LayerProfile, profile_layers
from ..observe.transfers import measure_transfers
from ..runtime.stage import LossFn
from ..schedules import StageGraph
from ..split import Layout, ManualSplit, manual_split
from ..split.traced import TracedSplit, trace_split
from ..split.traced.points import block_container
from .profile_graph import profile_split

__all__ = [
    "SPLITS",
    "fingerprint",
    "layer_names",
    "layer_split",
    "profile_model",
    "traced_fingerprint",
    "traced_layer_split",
    "with_measured_transfers",
]

SPLITS = ("manual", "traced")
"""How a plan's model is cut: by hand (`manual_split`) or from its traced graph (`trace_split`)."""


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
    return _hash([layout.container, layout.blocks, layout.first, layout.last], structure)


def traced_layer_split(
    model: nn.Module | Callable[[], nn.Module],
    example_args: tuple[Any, ...],
    *,
    blocks: str | None = None,
    seed: int = 0,
) -> tuple[TracedSplit, list[str]]:
    """`model` traced on `example_args` and cut into one stage per layer: the nodes before the block container,
    each block, the nodes after it; and the layers' names."""
    container, children = block_container(_structure(model), blocks)
    prefix = f"{container}." if container else ""
    where = container or "the blocks"
    counts = [0, *[1] * len(children), 0]
    try:
        split = trace_split(model, example_args, layers_per_stage=counts, blocks=blocks, seed=seed)
    except ValueError as error:
        if "would run nothing" not in str(error):
            raise
        raise ValueError(
            f"the planner cuts a traced model into the nodes before {where}, each block and the nodes after it, and"
            f" one of those ends is empty ({error}): plan it with the manual split, or give it modules around its"
            " blocks"
        ) from error
    return split, [f"before {where}", *(prefix + name for name in children), f"after {where}"]


def traced_fingerprint(model: nn.Module | Callable[[], nn.Module], *, blocks: str | None = None) -> str:
    """`fingerprint` of a model the traced split cuts (built on the meta device if given as a builder)."""
    structure = _structure(model)
    container, children = block_container(structure, blocks)
    return _hash([container, children, "traced"], structure)


def _structure(model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """The model, or the builder's model on the meta device (its names and shapes, no values)."""
    if isinstance(model, nn.Module):
        return model
    with torch.device("meta"):
        return model()


def _hash(layout: list[Any], structure: nn.Module) -> str:
    shapes = [(name, list(p.shape), str(p.dtype)) for name, p in structure.named_parameters(remove_duplicate=False)]
    return hashlib.sha256(json.dumps([*layout, shapes]).encode()).hexdigest()[:16]


def profile_model(
    model: nn.Module | Callable[[], nn.Module],
    example_input: Any,
    example_target: Any,
    loss_fn: LossFn,
    *,
    split: str = "manual",
    optimizer: str = "adamw",
    blocks: str | None = None,
    seed: int = 0,
    repeats: int = 5,
    warmup: int = 2,
    min_seconds: float = 0.0,
    slowdown: bool = False,
) -> LayerProfile:
    """Profile each layer of `model` on one micro-batch (`example_input`, its target) in this process, `repeats`
    times and for at least `min_seconds`; with `slowdown` (a manual split's layers only), also how much slower
    they compute in a pipeline's rank (`measure_pipeline_slowdown`).

    `split` says how the model will be cut: "manual" builds one layer at a time (a function is built on the
    meta device and only that layer materialized), so the whole model never needs to fit; "traced" traces the
    model on `example_input` (`trace_split`, from a builder on the meta device) and runs every layer through
    the runtime on one rank, which needs torch.distributed uninitialized. See `profile_layers` and
    `profile_split` (`conveyor.observe`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if split == "traced":
        if slowdown:
            raise ValueError("the slowdown in a pipeline's rank is measured for a manual split's layers only")
        traced, names = traced_layer_split(model, (example_input,), blocks=blocks, seed=seed)
        profile = profile_split(
            traced,
            example_input,
            example_target,
            loss_fn,
            names=names,
            optimizer=optimizer,
            fingerprint=traced_fingerprint(model, blocks=blocks),
            repeats=repeats,
            warmup=warmup,
            min_seconds=min_seconds,
            first=True,
            last=True,
        )
        return dataclasses.replace(profile, split="traced")
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
        min_seconds=min_seconds,
        slowdown=slowdown,
    )
    return dataclasses.replace(profile, first=bool(units.layout.first), last=bool(units.layout.last))


def with_measured_transfers(profile: LayerProfile) -> LayerProfile:
    """`profile` with what a message as large as its largest boundary's costs, measured on this machine
    (`measure_transfers`: two spawned gloo ranks, a few seconds)."""
    nbytes = int(max(layer.output_bytes for layer in profile.layers))
    return dataclasses.replace(profile, transfers=measure_transfers(nbytes))

"""Where to cut, as the caller says it: split points by module name, or a count of blocks per stage."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

from torch import nn

from ..manual import even_split

__all__ = ["block_container", "where_to_cut"]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def where_to_cut(
    model: nn.Module,
    split_points: Mapping[str, str] | None,
    num_stages: int | None,
    layers_per_stage: Sequence[int] | None,
    blocks: str | None,
) -> tuple[list[tuple[str, str]], bool]:
    """The split points (module name, "beginning" | "end") to cut at, and whether pipe_split() markers may add cuts."""
    counted = num_stages is not None or layers_per_stage is not None
    if split_points is not None and counted:
        raise ValueError(
            "pass split_points or num_stages/layers_per_stage, not both: they are two ways to say the same"
        )
    if blocks is not None and not counted:
        raise ValueError("blocks= names the block container for num_stages/layers_per_stage: pass one of them too")
    if split_points is not None:
        _check_split_points(model, split_points)
        return list(split_points.items()), True
    if not counted:
        return [], True
    container, children = block_container(model, blocks)
    counts = _blocks_per_stage(container or type(model).__name__, len(children), num_stages, layers_per_stage)
    prefix = f"{container}." if container else ""
    points: list[tuple[str, str]] = []
    for stage in range(1, len(counts)):
        done = sum(counts[:stage])
        if done < len(children):
            points.append((prefix + children[done], "beginning"))
        else:  # the last stage runs only the modules after the blocks
            points.append((prefix + children[-1], "end"))
    return points, False


def _check_split_points(model: nn.Module, split_points: Mapping[str, str]) -> None:
    names = [name for name, _ in model.named_modules() if name]
    for name, where in split_points.items():
        if where not in ("beginning", "end"):
            raise ValueError(f"split point {name!r} is {where!r}: use 'beginning' or 'end'")
        if name not in names:
            near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(map(repr, near))}?" if near else f"its modules include {names[:8]}"
            raise ValueError(f"split point {name!r} names no submodule of {type(model).__name__}: {hint}")


def _blocks_per_stage(
    container: str, num_blocks: int, num_stages: int | None, layers_per_stage: Sequence[int] | None
) -> list[int]:
    """How many of the container's blocks each stage runs (0 for the modules around them alone, at either end)."""
    if layers_per_stage is None:
        assert num_stages is not None
        if not 1 <= num_stages <= num_blocks:
            raise ValueError(
                f"num_stages={num_stages}, but {container} holds {num_blocks} blocks: use 1 to {num_blocks} stages,"
                " or layers_per_stage with a 0 for a stage of the modules around them"
            )
        return even_split(num_blocks, num_stages)
    counts = list(layers_per_stage)
    if num_stages is not None and len(counts) != num_stages:
        raise ValueError(f"layers_per_stage has {len(counts)} entries for num_stages={num_stages}")
    if any(n < 0 for n in counts) or sum(counts) != num_blocks or not counts:
        raise ValueError(
            f"layers_per_stage {counts} must be non-negative and add up to the {num_blocks} blocks of {container}"
        )
    for stage in range(1, len(counts) - 1):
        if counts[stage] == 0:
            raise ValueError(f"layers_per_stage {counts} gives stage {stage} no blocks, and nothing else runs there")
    return counts


def block_container(model: nn.Module, blocks: str | None) -> tuple[str, list[str]]:
    """The dotted name of the module holding the blocks, and its children's names in order."""
    if blocks is not None:
        try:
            container = model.get_submodule(blocks)
        except AttributeError:
            container = None
        if not isinstance(container, _CONTAINERS) or not len(container):
            have = ", ".join(name or "the model itself" for name in _containers(model)) or "none"
            raise ValueError(
                f"{blocks!r} is not a non-empty ModuleList/ModuleDict/Sequential of {type(model).__name__};"
                f" those it has: {have}"
            )
        return blocks, [name for name, _ in container.named_children()]
    found = _containers(model)
    if len(found) != 1:
        raise ValueError(
            f"{type(model).__name__} has {len(found)} outermost ModuleList/ModuleDict/Sequential containers"
            f" ({', '.join(found) or 'none'}): name the one holding the blocks with blocks='...'"
        )
    return found[0], [name for name, _ in model.get_submodule(found[0]).named_children()]


def _containers(model: nn.Module) -> list[str]:
    """Non-empty block containers not inside another one (a GPT's `layers`, not each block's `mlp`)."""
    if isinstance(model, _CONTAINERS):
        return [""]
    found: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, _CONTAINERS) and len(module) and not any(name.startswith(f"{f}.") for f in found):
            found.append(name)
    return found

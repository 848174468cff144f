"""Checkpoints with torch.distributed.checkpoint: every rank writes its stages' shards under the full model's names.

A checkpoint is a folder `step-<n>` holding DCP's files. Each rank contributes
its stages' parameters and buffers, its optimizers' state (per parameter, by
name), and tensors of its own (the step, RNG states, the data position):

- `model.<name>`: a parameter or buffer, by its name in the unsplit model;
- `optim.<name>.<field>`: the optimizer state of that parameter (Adam's moments
  and step count);
- `train.<key>`: what the trainer adds (the step, the data position);
- `rng.rank<r>`: rank r's CPU random state, restored only with the same ranks.

Because keys are the unsplit model's names, a checkpoint saved with one
number of ranks, stages or schedule loads with another (each rank asks for
the keys of its own stages), and into the unsplit model (`load_model`).
Saving is atomic: DCP writes into `step-<n>.partial`, which becomes
`step-<n>` only once every rank has finished, so a save killed halfway leaves
the previous checkpoint as the latest; `save_async` writes on a thread while
training goes on, and publishes the same way when waited for. Loading reads tensors only (DCP's
tensor files; nothing is unpickled).
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from .pipeline import Pipeline

__all__ = ["PendingSave", "checkpoints", "latest", "load", "load_model", "save", "save_async"]

_NAME = re.compile(r"^step-(\d+)$")


def checkpoints(directory: str | Path) -> list[Path]:
    """The complete checkpoints in `directory`, oldest first (a `.partial` folder is an interrupted save)."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(directory: str | Path) -> Path | None:
    found = checkpoints(directory)
    return found[-1] if found else None


def _state(pipe: Pipeline, extra: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's entries: its stages' weights, its optimizers' state, `extra`, and its RNG state."""
    state: dict[str, torch.Tensor] = {}
    for stage in pipe.stages.values():
        for name, tensor in stage.module.state_dict(keep_vars=True).items():
            state.setdefault(f"model.{name}", tensor.detach())
    names = _parameter_names(pipe)
    for optimizer in pipe.update.optimizers.values():
        for group in optimizer.param_groups:
            for param in group["params"]:
                for field, value in optimizer.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor):
                        # Under every name of the parameter, so a split that holds it by another name finds it.
                        for name in names[id(param)]:
                            state[f"optim.{name}.{field}"] = value
    state.update({f"train.{key}": value for key, value in extra.items()})
    state[f"rng.rank{pipe.rank}"] = torch.get_rng_state()
    return state


def save(
    pipe: Pipeline,
    directory: str | Path,
    step: int,
    extra: Mapping[str, torch.Tensor] | None = None,
    keep: int = 3,
    files: Mapping[str, str] | None = None,
) -> Path:
    """Write checkpoint `step` of `pipe` (every rank of its group calls this at the same step); keep the last `keep`.

    `files` are text files (name -> contents) written with it, such as the trainer's config. Returns the
    checkpoint's folder.
    """
    partial, final = _begin(pipe, directory, step)
    dcp.save(_state(pipe, extra or {}), checkpoint_id=str(partial), process_group=pipe.group)
    return _publish(pipe.group, pipe.rank, partial, final, keep, files)


class PendingSave:
    """A checkpoint DCP is writing on a thread (`save_async`); `wait()` makes it the latest and returns its folder."""

    def __init__(self, written: Future[Any], publish: Callable[[], Path]) -> None:
        self._written, self._publish = written, publish

    def wait(self) -> Path:
        self._written.result()  # raises what the writing thread raised
        return self._publish()


def save_async(
    pipe: Pipeline,
    directory: str | Path,
    step: int,
    extra: Mapping[str, torch.Tensor] | None = None,
    keep: int = 3,
    files: Mapping[str, str] | None = None,
) -> PendingSave:
    """`save`, but training goes on while the files are written: only the copy of this rank's state to host
    memory happens now (DCP's staging), and DCP writes the files on a thread.

    Every rank calls `wait()` on the result at the same point (before the next save, and before it exits):
    until then the checkpoint is `step-<n>.partial`, not the latest. DCP's collectives run on a gloo group of
    their own, so they never interleave with the pipeline's messages.
    """
    group = _background_group(pipe.group)
    partial, final = _begin(pipe, directory, step)
    response = dcp.async_save(_state(pipe, extra or {}), checkpoint_id=str(partial), process_group=group)
    written = response if isinstance(response, Future) else response.upload_completion
    return PendingSave(written, lambda: _publish(group, pipe.rank, partial, final, keep, files))


_background_groups: dict[str, dist.ProcessGroup] = {}


def _background_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """A gloo group over the ranks of `group`, made once (by every rank, at its first asynchronous save)."""
    name = "default" if group is None else group.group_name
    if name not in _background_groups:
        ranks = None if group is None else dist.get_process_group_ranks(group)
        created = dist.new_group(ranks, backend="gloo")
        assert created is not None
        _background_groups[name] = created
    return _background_groups[name]


def _begin(pipe: Pipeline, directory: str | Path, step: int) -> tuple[Path, Path]:
    """The folders of checkpoint `step`, being written and done, once rank 0 made room for it."""
    folder = Path(directory)
    final = folder / f"step-{step}"
    partial = folder / f"step-{step}.partial"
    if pipe.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # a save of this step killed earlier
    dist.barrier(pipe.group)
    return partial, final


def _publish(
    group: dist.ProcessGroup | None,
    rank: int,
    partial: Path,
    final: Path,
    keep: int,
    files: Mapping[str, str] | None,
) -> Path:
    """Once every rank's shards and the metadata are written: rename `partial` to `final`, keep the last `keep`."""
    dist.barrier(group)
    if rank == 0:
        for name, text in (files or {}).items():
            (partial / name).write_text(text)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in checkpoints(final.parent)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier(group)
    return final


def load(pipe: Pipeline, path: str | Path, extra: Mapping[str, torch.Tensor] | None = None) -> None:
    """Load checkpoint `path` into `pipe` in place: weights, optimizer state, `extra` (tensors to fill), and this
    rank's RNG state when the checkpoint has one for this rank.

    Raises ValueError naming the first tensor this pipeline needs that the checkpoint lacks or holds in another
    shape (a checkpoint of another model).
    """
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = _state(pipe, extra or {})
    _make_optimizer_state(pipe, metadata, state)
    rng_key = f"rng.rank{pipe.rank}"
    if rng_key not in metadata:
        del state[rng_key]
    _check_against(state, metadata, path)
    aliases = _separate_aliases(state)
    aliases.update(_other_stages_names(pipe, state, metadata))
    dcp.load(state, checkpoint_id=str(path), process_group=pipe.group)
    _check_aliases(state, aliases, path)
    if rng_key in state:
        torch.set_rng_state(state[rng_key])


def load_model(model: nn.Module, path: str | Path) -> None:
    """Load the weights of checkpoint `path` into an unsplit `model`, in one process, for inference or export."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    _check_against(state, metadata, path)
    aliases = _separate_aliases(state)
    with warnings.catch_warnings():  # DCP says it assumes one process: that is the point here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    _check_aliases(state, aliases, path)
    model.load_state_dict({name.removeprefix("model."): tensor for name, tensor in state.items()})


def _parameter_names(pipe: Pipeline) -> dict[int, list[str]]:
    """id(parameter) -> every name this rank's stages hold it by (a tied one has several), stages in order."""
    names: dict[int, list[str]] = {}
    for _, stage in sorted(pipe.stages.items()):
        for name, param in stage.module.named_parameters(remove_duplicate=False):
            held = names.setdefault(id(param), [])
            if name not in held:
                held.append(name)
    return names


def _make_optimizer_state(pipe: Pipeline, metadata: Mapping[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Give every parameter the optimizer state the checkpoint holds for it, as empty tensors DCP then fills
    (an optimizer that has not stepped yet has none). A tied parameter's state is asked for under each of its
    names the checkpoint has; `_separate_aliases` then checks that they agree."""
    names = _parameter_names(pipe)
    for optimizer in pipe.update.optimizers.values():
        for group in optimizer.param_groups:
            for param in group["params"]:
                for name in names[id(param)]:
                    prefix = f"optim.{name}."
                    for key, meta in metadata.items():
                        if not key.startswith(prefix) or not hasattr(meta, "size"):
                            continue
                        field = key[len(prefix) :]
                        current = optimizer.state[param].get(field)
                        if not isinstance(current, torch.Tensor) or tuple(current.shape) != tuple(meta.size):
                            device = torch.device("cpu") if len(meta.size) == 0 else param.device
                            empty = torch.empty(tuple(meta.size), dtype=meta.properties.dtype, device=device)
                            optimizer.state[param][field] = empty
                        state[key] = optimizer.state[param][field]


def _check_against(state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], path: str | Path) -> None:
    for key, tensor in state.items():
        meta = metadata.get(key)
        if meta is None:
            raise ValueError(f"checkpoint {path} has no {key}: it is a checkpoint of another model or trainer")
        if hasattr(meta, "size") and tuple(meta.size) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint {path} holds {key} of shape {list(meta.size)}, but this model's is {list(tensor.shape)}:"
                " it is a checkpoint of another model"
            )


def _separate_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Give each key whose tensor an earlier key already names (a tied parameter's other names, their optimizer
    state) an empty tensor of its own for DCP to fill; returns each such key -> the earlier key it must equal.

    Loaded into one tensor, copies that disagree would leave whichever DCP wrote last, silently.
    """
    first: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in list(state.items()):
        if tensor.numel() == 0:
            continue
        where = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if where in first:
            aliases[key] = first[where]
            state[key] = torch.empty_like(tensor)
        else:
            first[where] = key
    return aliases


def _other_stages_names(pipe: Pipeline, state: dict[str, torch.Tensor], metadata: Mapping[str, Any]) -> dict[str, str]:
    """The names other ranks' stages hold this rank's tied parameters by, as empty tensors to load and compare:
    each rank loads only its own names, so copies that disagree would otherwise start the ties apart."""
    aliases: dict[str, str] = {}
    for tie in pipe.graph.ties:
        here = [stage for stage in tie.stages if stage in pipe.stages]
        if not here:
            continue
        mine = f"model.{tie.name_on(here[0])}"
        for _, name in tie.names:
            key = f"model.{name}"
            if key not in state and key in metadata:
                state[key] = torch.empty_like(state[mine])
                aliases[key] = mine
    return aliases


def _check_aliases(state: Mapping[str, torch.Tensor], aliases: Mapping[str, str], path: str | Path) -> None:
    for key, original in aliases.items():
        if not torch.equal(state[key], state[original]):
            difference = (state[key].double() - state[original].double()).abs().max().item()
            raise ValueError(
                f"checkpoint {path} holds {original} and {key} with different values (by up to {difference:.3g}),"
                " but they are one tied tensor in this model: one copy went stale (a checkpoint written while a tie"
                " was held as two tensors, or edited), and conveyor cannot tell which is trained: make both hold"
                " the trained one, or load the checkpoint into a model where they are not tied"
            )

"""Checkpoints with torch.distributed.checkpoint: every rank writes its stages' shards under the full model's names.

A checkpoint is a folder `step-<n>` holding DCP's files and conveyor's manifest. Each rank contributes
its stages' parameters and buffers, its optimizers' state (per parameter, by name), and tensors of its
own (the step, RNG states, the data position):

- `model.<name>`: a parameter or buffer, by its name in the unsplit model;
- `optim.<name>.<field>`: the optimizer state of that parameter (Adam's moments
  and step count);
- `train.<key>`: what the trainer adds (the step, the data position);
- `rng.rank<r>`: rank r's CPU random state, restored only with the same ranks.

Every entry is a tensor: nothing is stored as a pickled object. Because keys are the unsplit model's
names, a checkpoint saved with one number of ranks, stages or schedule loads with another (each rank asks
for the keys of its own stages), and into the unsplit model (`load_model`).

Saving is atomic: DCP writes into `step-<n>.partial`; once every rank has finished, the ranks checksum
its files (each a share), rank 0 writes `conveyor-manifest.json` (checkpoint_manifest.py: every file's
size and SHA-256, and the settings that shape the model) and renames the folder `step-<n>`. A save
killed halfway leaves the previous checkpoint as the latest; one that fails (a full disk) raises
CheckpointWriteError and removes its partial folder. `save_async` writes on a thread while training goes
on, and publishes the same way when waited for.

Loading trusts nothing in the folder before checking it: the manifest's checksums and sizes of every
file, then the settings, then `.metadata`, read by conveyor's own restricted reader
(checkpoint_metadata.py: it builds only DCP's metadata classes, so a pickle that would run code is
refused unrun), and only then DCP reads tensors (torch.load with weights_only=True). After a load, the
copies of each tied parameter must hold the same bits, on one rank and across ranks.
"""

from __future__ import annotations

import errno
import hashlib
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from .checkpoint_errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointWriteError,
    DamagedCheckpointError,
    UnsafeCheckpointError,
)
from .checkpoint_manifest import (
    MANIFEST_FILE,
    FileRecord,
    Manifest,
    Setting,
    check_file,
    check_settings,
    checked_settings,
    file_record,
    text_record,
)
from .checkpoint_metadata import METADATA_FILE, read_metadata
from .pipeline import Pipeline

__all__ = [
    "MANIFEST_FILE",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "DamagedCheckpointError",
    "PendingSave",
    "UnsafeCheckpointError",
    "checkpoints",
    "latest",
    "load",
    "load_model",
    "newest_verified",
    "save",
    "save_async",
    "verify",
    "write_manifest",
]

_NAME = re.compile(r"^step-(\d+)$")
Settings = Mapping[str, Setting]


def checkpoints(directory: str | Path) -> list[Path]:
    """The complete checkpoints in `directory`, oldest first (a `.partial` folder is an interrupted save).

    Complete means published, not verified: `newest_verified` checks them."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(directory: str | Path) -> Path | None:
    """The newest published checkpoint in `directory` (unverified), or None."""
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
    for key, value in extra.items():
        if not isinstance(value, torch.Tensor):
            # DCP would pickle it, and unpickle it with torch.load(weights_only=False) on load.
            raise TypeError(
                f"extra[{key!r}] is a {type(value).__name__}: a checkpoint holds tensors only (nothing is pickled);"
                f" store it as torch.tensor(...)"
            )
        state[f"train.{key}"] = value
    state[f"rng.rank{pipe.rank}"] = torch.get_rng_state()
    return state


def save(
    pipe: Pipeline,
    directory: str | Path,
    step: int,
    extra: Mapping[str, torch.Tensor] | None = None,
    keep: int = 3,
    files: Mapping[str, str] | None = None,
    settings: Settings | None = None,
) -> Path:
    """Write checkpoint `step` of `pipe` (every rank of its group calls this at the same step); keep the last `keep`.

    `files` are text files (name -> contents) written with it, such as the trainer's config; `settings`
    (name -> str, int, float or bool) are what shapes the model, recorded in the manifest for `load` to
    compare. Returns the checkpoint's folder. Raises CheckpointWriteError (on every rank) when the files
    cannot be written; the previous checkpoint is then still the latest.
    """
    recorded = checked_settings(settings or {})
    _check_files(files)
    state = _state(pipe, extra or {})
    partial, final = _begin(pipe, directory, step)
    try:
        dcp.save(state, checkpoint_id=str(partial), process_group=pipe.group)
    except CheckpointException as error:  # a BaseException, which would pass every `except Exception`
        raise _write_failed(pipe.rank, partial, final, _describe_causes(error), _disk_full(_causes(error))) from None
    return _publish(pipe.group, pipe.rank, partial, final, keep, files, Manifest(step, recorded, {}))


def _check_files(files: Mapping[str, str] | None) -> None:
    for name in files or {}:
        if name == MANIFEST_FILE or name == METADATA_FILE or name.endswith(".distcp") or Path(name).name != name:
            raise ValueError(f"files: {name!r} is not a plain file name of its own (the checkpoint's files use it)")


class PendingSave:
    """A checkpoint DCP is writing on a thread (`save_async`); `wait()` makes it the latest and returns its folder."""

    def __init__(
        self,
        written: Future[Any],
        publish: Callable[[], Path],
        failed: Callable[[CheckpointException], CheckpointWriteError],
    ) -> None:
        self._written, self._publish, self._failed = written, publish, failed

    def wait(self) -> Path:
        try:
            self._written.result()  # raises what the writing thread raised
        except CheckpointException as error:  # a BaseException, which would pass every `except Exception`
            raise self._failed(error) from None
        return self._publish()


def save_async(
    pipe: Pipeline,
    directory: str | Path,
    step: int,
    extra: Mapping[str, torch.Tensor] | None = None,
    keep: int = 3,
    files: Mapping[str, str] | None = None,
    settings: Settings | None = None,
) -> PendingSave:
    """`save`, but training goes on while the files are written: only the copy of this rank's state to host
    memory happens now (DCP's staging), and DCP writes the files on a thread.

    Every rank calls `wait()` on the result at the same point (before the next save, and before it exits):
    until then the checkpoint is `step-<n>.partial`, not the latest; `wait()` checksums the files and writes
    the manifest as it publishes. DCP's collectives run on a gloo group of their own, so they never
    interleave with the pipeline's messages.
    """
    recorded = checked_settings(settings or {})
    _check_files(files)
    state = _state(pipe, extra or {})
    group = _background_group(pipe.group)
    partial, final = _begin(pipe, directory, step)

    def failed(error: CheckpointException) -> CheckpointWriteError:
        return _write_failed(pipe.rank, partial, final, _describe_causes(error), _disk_full(_causes(error)))

    try:
        response = dcp.async_save(state, checkpoint_id=str(partial), process_group=group)
    except CheckpointException as error:
        raise failed(error) from None
    written = response if isinstance(response, Future) else response.upload_completion
    manifest = Manifest(step, recorded, {})
    return PendingSave(written, lambda: _publish(group, pipe.rank, partial, final, keep, files, manifest), failed)


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
    manifest: Manifest,
) -> Path:
    """Once every rank's shards and the metadata are written: checksum them (each rank a share), then rank 0
    writes `files` and the manifest, renames `partial` to `final` and keeps the last `keep`."""
    dist.barrier(group)
    world = dist.get_world_size(group)
    records: dict[str, FileRecord] = {}
    problem, full = "", False
    try:
        names = sorted(p.name for p in partial.iterdir() if p.is_file())
        records = {name: file_record(partial / name) for name in names[rank::world]}
    except OSError as error:
        problem = f"rank {rank} could not read back what it wrote: {error}"
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, (records, problem), group=group)
    problems = [p for _, p in shares if p]
    if rank == 0 and not problems:
        try:
            written = {name: record for part, _ in shares for name, record in part.items()}
            for name, text in (files or {}).items():
                data = text.encode()
                (partial / name).write_bytes(data)
                written[name] = text_record(data)
            Manifest(manifest.step, manifest.settings, written).write(partial)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            for old in checkpoints(final.parent)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as error:
            problem = f"rank 0 could not write the manifest or publish the folder: {type(error).__name__}: {error}"
            full = error.errno == errno.ENOSPC
    outcome: list[Any] = [None] * world
    dist.all_gather_object(outcome, (problem, full), group=group)
    problems = [p for p, _ in outcome if p]
    if problems:
        raise _write_failed(rank, partial, final, "; ".join(problems), any(f for _, f in outcome))
    return final


def _causes(error: CheckpointException) -> list[BaseException]:
    """What failed, from DCP's exception: one exception per failing rank, by rank."""
    return [failure[0] if isinstance(failure, tuple) else failure for _, failure in sorted(error.failures.items())]


def _describe_causes(error: CheckpointException) -> str:
    ranks = sorted(error.failures)
    return "; ".join(f"rank {r}: {type(c).__name__}: {c}" for r, c in zip(ranks, _causes(error), strict=True))


def _disk_full(causes: list[BaseException]) -> bool:
    """Whether a write failed for want of space: ENOSPC, or torch's zip writer finding fewer bytes written
    than it wrote ("unexpected pos"), which is how a full disk shows under torch.save."""
    return any((isinstance(c, OSError) and c.errno == errno.ENOSPC) or "unexpected pos" in str(c) for c in causes)


def _write_failed(rank: int, partial: Path, final: Path, causes: str, full: bool) -> CheckpointWriteError:
    """The error of a save that failed (every rank builds the same); rank 0 removes the unfinished folder."""
    try:
        free = f" Its disk had {shutil.disk_usage(final.parent).free:,} bytes free."
    except OSError:
        free = ""
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # never loaded, and on a full disk the space is what is short
    previous = latest(final.parent)
    standing = f"{previous} is still the latest checkpoint" if previous else "there is no earlier checkpoint"
    what = "the disk is full: " if full else ""
    advice = "free space (or keep fewer checkpoints)" if full else "fix that"
    return CheckpointWriteError(
        f"could not write checkpoint {final}: {what}{causes}.{free} The checkpoint was not published and its"
        f" partial folder was removed; {standing}: {advice}, then save again (or resume from it)"
    )


def verify(
    path: str | Path,
    settings: Settings | None = None,
    *,
    together: bool = False,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Check checkpoint `path` without loading a tensor: every file against the manifest's size and checksum,
    `settings` against those it was saved with, and its `.metadata` with the restricted reader.

    Raises DamagedCheckpointError (a file missing, truncated or changed; no manifest), CheckpointMismatchError
    (a setting differs: names it and both values), UnsafeCheckpointError (metadata that would build anything
    but DCP's metadata). With `together`, every rank of `group` calls it and each checksums a share of the
    files; all raise the same error.
    """
    _verify(Path(path), settings, together, group)


def _verify(path: Path, settings: Settings | None, together: bool, group: dist.ProcessGroup | None) -> Metadata:
    """`verify`, returning the checkpoint's metadata."""
    problems: list[str] = []
    advice = ""
    manifest = None
    try:
        manifest = Manifest.read(path)
    except DamagedCheckpointError as error:
        problems, advice = error.problems, error.advice
    if manifest is not None:
        rank, world = (dist.get_rank(group), dist.get_world_size(group)) if together else (0, 1)
        names = sorted(manifest.files)
        problems = [p for name in names[rank::world] if (p := check_file(path, name, manifest.files[name]))]
    if together:  # every rank raises, or none does: a rank that went on alone would wait for the others
        everyone: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, (problems, advice), group=group)
        problems = list(dict.fromkeys(p for part, _ in everyone for p in part))
        advice = next((a for _, a in everyone if a), "")
    if problems:
        raise DamagedCheckpointError(path, problems, advice)
    assert manifest is not None
    if settings is not None:
        check_settings(path, manifest.settings, settings)
    metadata = read_metadata(path)
    for info in metadata.storage_data.values():
        if info.relative_path not in manifest.files:  # DCP would open whatever path it names
            raise UnsafeCheckpointError(
                f"{path / METADATA_FILE} points at {info.relative_path!r}, which is not one of the checkpoint's"
                " files: refusing to read it. The file was altered: delete the checkpoint or restore it from a copy"
            )
    return metadata


def newest_verified(
    directory: str | Path,
    settings: Settings | None = None,
    *,
    together: bool = False,
    group: dist.ProcessGroup | None = None,
) -> Path | None:
    """The newest checkpoint in `directory` that verifies (see `verify`), or None.

    Each newer one that fails verification is skipped with a warning naming it and what failed (on the
    first rank only, with `together`). A checkpoint of other settings, or whose metadata is unsafe, is not
    skipped: that raises, since an older one would hide the mistake or the tampering.
    """
    for path in reversed(checkpoints(directory)):
        try:
            _verify(path, settings, together, group)
            return path
        except DamagedCheckpointError as error:
            if not together or dist.get_rank(group) == 0:
                warnings.warn(
                    f"skipping checkpoint {path}, which failed verification: {'; '.join(error.problems)}."
                    " Trying the one before it",
                    stacklevel=2,
                )
    return None


def write_manifest(path: str | Path, settings: Settings) -> Path:
    """Record the files of checkpoint `path` as they are now, and `settings`, in a new manifest: for a
    checkpoint written without one (by an earlier conveyor) that you trust. Returns the manifest's path.

    Its `.metadata` is still read with the restricted reader on every load."""
    folder = Path(path)
    if (folder / MANIFEST_FILE).exists():
        raise CheckpointError(
            f"{folder} already has a {MANIFEST_FILE}; writing another would bless whatever changed since the save."
            " Delete it first if you mean to record the files as they are now"
        )
    if not (folder / METADATA_FILE).is_file():
        raise DamagedCheckpointError(folder, [f"it has no {METADATA_FILE}: it is not a DCP checkpoint"])
    found = _NAME.match(folder.name)
    files = {p.name: file_record(p) for p in sorted(folder.iterdir()) if p.is_file()}
    Manifest(int(found.group(1)) if found else -1, checked_settings(settings), files).write(folder)
    return folder / MANIFEST_FILE


class _VerifiedReader(dcp.FileSystemReader):
    """DCP's file reader, handed the metadata conveyor read and checked: DCP's own `read_metadata` unpickles."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(str(path))
        self._verified = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._verified.storage_meta is not None and hasattr(self, "load_id"):
            self._verified.storage_meta.load_id = self.load_id
        return self._verified


def _read(state: dict[str, torch.Tensor], path: Path, metadata: Metadata, **where: Any) -> None:
    """DCP's load of `state` from the verified checkpoint `path` (`where`: process_group, or no_dist)."""
    try:
        with warnings.catch_warnings():  # DCP says it assumes one process: with no_dist that is the point
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, storage_reader=_VerifiedReader(path, metadata), **where)
    except CheckpointException as error:  # a BaseException, which would pass every `except Exception`
        raise DamagedCheckpointError(path, [f"reading its tensors failed ({_describe_causes(error)})"]) from None


def _tie_error(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path}: {problem}. The copies of a tied parameter train as one only if they start equal:"
        " load a checkpoint saved from this model (whose tied entries agree)"
    )


def _digest(tensor: torch.Tensor) -> str:
    """A 128-bit hash of a tensor's bits (equal bits, equal digest; NaN compares equal to itself here)."""
    hashed = hashlib.blake2b(digest_size=16)
    hashed.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hashed.hexdigest()


def _check_ties(pipe: Pipeline, path: Path, local_problem: str) -> None:
    """Every parameter the stage graph ties holds the same bits on every rank that holds it (they step alike
    from here on, so copies that differ would stay different), and `local_problem` (a tie within one rank)
    is raised on every rank."""
    ties = pipe.graph.ties
    mine = {}
    for index, tie in enumerate(ties):
        here = [s for s in tie.stages if s in pipe.stages]
        if here:
            mine[index] = _digest(pipe.stages[here[0]].module.get_parameter(tie.name_on(here[0])))
    everyone: list[Any] = [None] * dist.get_world_size(pipe.group)
    dist.all_gather_object(everyone, (mine, local_problem), group=pipe.group)
    for rank, (_, problem) in enumerate(everyone):
        if problem:
            raise _tie_error(path, f"on rank {rank}, {problem}")
    for index, tie in enumerate(ties):
        held: dict[str, list[int]] = {}
        for rank, (digests, _) in enumerate(everyone):
            if index in digests:
                held.setdefault(digests[index], []).append(rank)
        if len(held) > 1:
            names = " = ".join(f"stage {s} model.{name}" for s, name in tie.names)
            split = " and ".join(f"rank(s) {ranks}" for ranks in held.values())
            raise _tie_error(path, f"the tied parameter ({names}) loads different values on {split}")


def load(
    pipe: Pipeline, path: str | Path, extra: Mapping[str, torch.Tensor] | None = None, settings: Settings | None = None
) -> None:
    """Load checkpoint `path` into `pipe` in place: weights, optimizer state, `extra` (tensors to fill), and this
    rank's RNG state when the checkpoint has one for this rank. Every rank of the pipeline calls it.

    First, before any tensor is read, `verify` (each rank checksums a share of the files; `settings` are
    compared with those it was saved with). Raises ValueError naming the first tensor this pipeline needs
    that the checkpoint lacks or holds in another shape (a checkpoint of another model), and CheckpointError
    when the copies of a tied parameter would differ after the load.
    """
    folder = Path(path)
    metadata = _verify(folder, settings, True, pipe.group)
    entries = metadata.state_dict_metadata
    state = _state(pipe, extra or {})
    _make_optimizer_state(pipe, entries, state)
    rng_key = f"rng.rank{pipe.rank}"
    if rng_key not in entries:
        del state[rng_key]
    _check_against(state, entries, folder)
    aliases = _separate_aliases(state)
    aliases.update(_other_stages_names(pipe, state, entries))
    _read(state, folder, metadata, process_group=pipe.group)
    if rng_key in state:
        torch.set_rng_state(state[rng_key])
    _check_ties(pipe, folder, _alias_problem(state, aliases))


def load_model(model: nn.Module, path: str | Path, settings: Settings | None = None) -> None:
    """Load the weights of checkpoint `path` into an unsplit `model`, in one process, for inference or export
    (after `verify`, as `load`)."""
    folder = Path(path)
    metadata = _verify(folder, settings, False, None)
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    _check_against(state, metadata.state_dict_metadata, folder)
    aliases = _separate_aliases(state)
    _read(state, folder, metadata, no_dist=True)
    problem = _alias_problem(state, aliases)
    if problem:
        raise _tie_error(folder, problem)
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


def _alias_problem(state: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> str:
    """What is wrong with the copies of this process's tied tensors after a load ("" when they agree): copies
    that differ mean one went stale (a checkpoint written while a tie was held as two tensors, or edited), and
    which one is trained cannot be told."""
    for key, original in aliases.items():
        if not torch.equal(state[key], state[original]):
            difference = (state[key].double() - state[original].double()).abs().max().item()
            return (
                f"it holds {original} and {key} with different values (by up to {difference:.3g}), but they are one"
                " tied tensor in this model"
            )
    return ""

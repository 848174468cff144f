"""Checkpoints are verified before use: checksums, settings, metadata that runs no code, tied copies equal;
--resume falls back past a damaged checkpoint; a save that fails says why."""

from __future__ import annotations

import contextlib
import errno
import json
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from tiny_models import TinyTransformer, token_batch, token_loss
from torch.distributed.checkpoint.filesystem import FileSystem

from conveyor import Pipeline, PipelineSpec, checkpoint, spawn
from conveyor.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointWriteError,
    DamagedCheckpointError,
    UnsafeCheckpointError,
)
from conveyor.checkpoint_manifest import MANIFEST_FILE, Manifest, check_settings, file_record
from conveyor.checkpoint_metadata import read_metadata
from conveyor.cli import main
from conveyor.models import GPT, GPTConfig
from conveyor.split import manual_split
from conveyor.train import TrainConfig

SMALL = ["--dim", "32", "--layers", "4", "--heads", "2", "--context", "32", "--batch-size", "8", "--no-progress"]
SETTINGS = {**TrainConfig(dim=32, layers=4, heads=2, context=32, batch_size=8).source.settings(), "precision": "fp32"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`conveyor train` for 6 steps on 2 ranks with checkpoints step-3 and step-6 (copy before changing them)."""
    folder = tmp_path_factory.mktemp("saved")
    assert main(["train", *SMALL, "--steps", "6", "--checkpoint-every", "3", "--checkpoint-dir", str(folder)]) == 0
    return folder


def _copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "ck"))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds (read with the restricted reader)."""
    entries = read_metadata(path).state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in entries.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rerecord(folder: Path, name: str) -> None:
    """Update the manifest's record of file `name`, as someone altering the checkpoint on purpose would."""
    manifest = Manifest.read(folder)
    Manifest(manifest.step, manifest.settings, {**manifest.files, name: file_record(folder / name)}).write(folder)


class _Opens:
    """Unpickled, it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_the_manifest_records_every_file_and_the_settings(saved: Path) -> None:
    raw = json.loads((saved / "step-6" / MANIFEST_FILE).read_text())
    files = {p.name for p in (saved / "step-6").iterdir()} - {MANIFEST_FILE}
    expected = {".metadata", "__0_0.distcp", "__1_0.distcp", "conveyor-train.json", "data-state.json"}
    assert set(raw["files"]) == files == expected
    for name, record in raw["files"].items():
        assert file_record(saved / "step-6" / name).digest == record["digest"] and len(record["digest"]) == 64
    assert raw["settings"] == SETTINGS and raw["step"] == 6
    checkpoint.verify(saved / "step-6", SETTINGS)


@pytest.mark.parametrize(
    "damage, file, says",
    [
        (_flip_a_byte, "__1_0.distcp", "__1_0.distcp is corrupt: its bytes differ from those saved"),
        (_flip_a_byte, ".metadata", ".metadata is corrupt"),
        (_flip_a_byte, "conveyor-train.json", "conveyor-train.json is corrupt"),
        (_truncate, "__0_0.distcp", r"__0_0.distcp is [\d,]+ bytes but was saved with [\d,]+: it is truncated"),
        (_truncate, ".metadata", r".metadata is [\d,]+ bytes but was saved with [\d,]+: it is truncated"),
        (Path.unlink, "__1_0.distcp", "__1_0.distcp is missing"),
        (_truncate, MANIFEST_FILE, f"{MANIFEST_FILE} is corrupt or truncated"),
        (_flip_a_byte, MANIFEST_FILE, f"{MANIFEST_FILE} is corrupt or truncated"),
    ],
    ids=[
        "shard-byte",
        "metadata-byte",
        "config-byte",
        "shard-cut",
        "metadata-cut",
        "shard-gone",
        "manifest-cut",
        "manifest-byte",
    ],
)
def test_a_damaged_checkpoint_is_named_with_the_file_and_what_failed(
    saved: Path, tmp_path: Path, damage: Any, file: str, says: str
) -> None:
    folder = _copy(saved, tmp_path) / "step-6"
    damage(folder / file)
    named = f"checkpoint {folder} failed verification: {says}"
    with pytest.raises(DamagedCheckpointError, match=named):
        checkpoint.verify(folder)
    with pytest.raises(DamagedCheckpointError, match=named):
        checkpoint.load_model(torch.nn.Linear(1, 1), folder)  # before any tensor (of any model) is read


def test_export_refuses_a_damaged_checkpoint(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Today's `conveyor export` wrote the flipped weight out; now it names the file."""
    folder = _copy(saved, tmp_path) / "step-6"
    _flip_a_byte(folder / "__0_0.distcp")
    with pytest.raises(SystemExit):
        main(["export", str(folder), "--out", str(tmp_path / "m.pt")])
    assert "__0_0.distcp is corrupt" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("manifest_too", [False, True], ids=["file-only", "manifest-too"])
def test_export_refuses_metadata_that_would_run_code(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], manifest_too: bool
) -> None:
    """A `.metadata` rewritten to carry a pickle payload: refused as corrupt (checksum), or, with the manifest
    rewritten to match, by the restricted reader naming the global. Either way the payload never runs."""
    folder = _copy(saved, tmp_path)
    marker = tmp_path / "marker"
    (folder / "step-6" / ".metadata").write_bytes(pickle.dumps(_Opens(marker)))
    if manifest_too:
        _rerecord(folder / "step-6", ".metadata")
    with pytest.raises(SystemExit):
        main(["export", str(folder / "step-6"), "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    if manifest_too:
        assert f"{folder / 'step-6' / '.metadata'} asks to build {open.__module__}.open" in err
        with pytest.raises(SystemExit):  # nor is it skipped for the one before, as a damaged one is
            main(["export", str(folder), "--out", str(tmp_path / "m.pt")])
        assert "asks to build" in capsys.readouterr().err
    else:
        assert f"checkpoint {folder / 'step-6'} failed verification: .metadata is" in err
        with pytest.warns(UserWarning, match="skipping checkpoint"):
            assert main(["export", str(folder), "--out", str(tmp_path / "m.pt")]) == 0  # step-3
    assert not marker.exists(), "the payload in .metadata ran"
    with pytest.raises((UnsafeCheckpointError, DamagedCheckpointError)):
        checkpoint.load_model(torch.nn.Linear(1, 1), folder / "step-6")
    assert not marker.exists(), "the payload in .metadata ran"


def test_metadata_pointing_outside_the_checkpoint_is_refused(saved: Path, tmp_path: Path) -> None:
    """DCP reads each tensor from the file `.metadata` names: only the checkpoint's own files may be named."""
    folder = _copy(saved, tmp_path) / "step-6"
    (tmp_path / "outside.distcp").write_bytes((folder / "__0_0.distcp").read_bytes())
    with (folder / ".metadata").open("rb") as file:
        metadata = pickle.load(file)  # this test wrote it
    for info in metadata.storage_data.values():
        if info.relative_path == "__0_0.distcp":
            info.relative_path = "../../outside.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    _rerecord(folder, ".metadata")
    with pytest.raises(UnsafeCheckpointError, match=r"points at '\.\./\.\./outside\.distcp', which is not one of"):
        checkpoint.load_model(torch.nn.Linear(1, 1), folder)


def test_a_checkpoint_without_a_manifest_says_what_is_missing_and_what_to_do(saved: Path, tmp_path: Path) -> None:
    """A checkpoint of an earlier conveyor (or not conveyor's): named, and `write_manifest` adopts it."""
    folder = _copy(saved, tmp_path) / "step-6"
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(DamagedCheckpointError, match=f"it has no {MANIFEST_FILE}") as missing:
        checkpoint.verify(folder)
    assert "conveyor.checkpoint.write_manifest" in str(missing.value)
    checkpoint.write_manifest(folder, SETTINGS)
    checkpoint.verify(folder, SETTINGS)
    with pytest.raises(CheckpointError, match="already has a"):
        checkpoint.write_manifest(folder, SETTINGS)
    assert main(["export", str(folder), "--out", str(tmp_path / "m.pt")]) == 0


def test_a_read_that_fails_names_the_checkpoint(saved: Path, tmp_path: Path) -> None:
    """A shard truncated before a manifest recorded it (adopted as it was): DCP's CheckpointException, a
    BaseException that ended a rank as "exit code 1", becomes a DamagedCheckpointError naming the rank."""
    folder = _copy(saved, tmp_path) / "step-6"
    (folder / MANIFEST_FILE).unlink()
    shard = folder / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:10_000])  # within the first tensor, the token embedding
    checkpoint.write_manifest(folder, SETTINGS)
    model = GPT(GPTConfig(context=32, dim=32, layers=4, heads=2))
    with pytest.raises(DamagedCheckpointError, match=r"failed verification: reading its tensors failed \(rank 0: "):
        checkpoint.load_model(model, folder, SETTINGS)


def test_a_settings_mismatch_names_the_setting_and_both_values(saved: Path) -> None:
    folder = saved / "step-6"
    with pytest.raises(CheckpointMismatchError, match="layers: 4 in the checkpoint, 2 here") as two_layers:
        checkpoint.verify(folder, {**SETTINGS, "layers": 2})
    assert "load it with the settings it was saved with (layers=4)" in str(two_layers.value)
    other = {**SETTINGS, "heads": 4, "precision": "bf16"}
    with pytest.raises(CheckpointMismatchError, match="heads: 2 in the checkpoint, 4 here; precision: 'fp32' in"):
        checkpoint.newest_verified(saved, other)  # not skipped for an older checkpoint, which would differ alike
    with pytest.raises(CheckpointMismatchError, match="tied: not recorded in the checkpoint, True here"):
        checkpoint.verify(folder, {**SETTINGS, "tied": True})
    with pytest.raises(CheckpointMismatchError, match="tied: 1 in the checkpoint, True here"):
        check_settings(folder, {"tied": 1}, {"tied": True})  # one kind: True is not 1


def test_newest_verified_skips_each_damaged_checkpoint_naming_it(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path)
    _flip_a_byte(folder / "step-6" / "__1_0.distcp")
    with pytest.warns(UserWarning, match=r"skipping checkpoint \S+step-6, which failed verification: __1_0\.distcp is"):
        assert checkpoint.newest_verified(folder, SETTINGS) == folder / "step-3"
    _truncate(folder / "step-3" / ".metadata")
    with pytest.warns(UserWarning) as skipped:
        assert checkpoint.newest_verified(folder, SETTINGS) is None
    assert [str(w.message).split(",")[0] for w in skipped] == [
        f"skipping checkpoint {folder / 'step-6'}",
        f"skipping checkpoint {folder / 'step-3'}",
    ]


def test_save_refuses_an_entry_that_is_not_a_tensor() -> None:
    """DCP would pickle it (and unpickle it with weights_only=False on load)."""

    class Updates:
        optimizers: dict[int, Any] = {}

    class Alone:
        stages: dict[int, Any] = {}
        update = Updates()
        rank, group = 0, None

    with pytest.raises(TypeError, match=r"extra\['step'\] is a int: a checkpoint holds tensors only"):
        checkpoint.save(Alone(), "unused", 1, extra={"step": 3})  # type: ignore[dict-item]


def _train(*argv: str) -> int:
    return main(["train", *SMALL, *argv])


@pytest.mark.timeout(300)
def test_resume_falls_back_to_the_newest_good_checkpoint(
    saved: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Flipped bytes in step-6: --resume says it is corrupt, resumes from step-3, and reaches step-6 exactly."""
    folder = _copy(saved, tmp_path)
    _flip_a_byte(folder / "step-6" / "__1_0.distcp")
    assert _train("--steps", "6", "--checkpoint-every", "3", "--checkpoint-dir", str(folder), "--resume") == 0
    err = capfd.readouterr().err
    assert f"skipping checkpoint {folder / 'step-6'}, which failed verification: __1_0.distcp is corrupt" in err
    again, original = _tensors(folder / "step-6"), _tensors(saved / "step-6")
    assert again.keys() == original.keys()
    for key in original:
        assert torch.equal(again[key], original[key]), f"{key} differs from the uninterrupted run's"


@pytest.mark.timeout(300)
def test_resume_refuses_metadata_that_would_run_code(
    saved: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The payload ran in every rank and training went on; now every rank refuses it unrun."""
    folder = _copy(saved, tmp_path)
    marker = tmp_path / "marker"
    (folder / "step-6" / ".metadata").write_bytes(pickle.dumps(_Opens(marker)))
    _rerecord(folder / "step-6", ".metadata")
    assert _train("--steps", "9", "--checkpoint-dir", str(folder), "--resume") == 1
    err = capfd.readouterr().err
    assert "UnsafeCheckpointError" in err and f"asks to build {open.__module__}.open" in err
    assert not marker.exists(), "the payload in .metadata ran"
    assert checkpoint.latest(folder) == folder / "step-6"  # nothing trained on


@pytest.mark.timeout(300)
def test_resume_with_other_sizes_names_them(saved: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A 4-layer, 2-head checkpoint resumed with --layers 2 --heads 4 trained on; now it names both settings."""
    folder = _copy(saved, tmp_path)
    argv = ["--steps", "9", "--checkpoint-dir", str(folder), "--resume", "--layers", "2", "--heads", "4"]
    assert _train(*argv) == 1
    err = capfd.readouterr().err
    assert "CheckpointMismatchError" in err
    assert "layers: 4 in the checkpoint, 2 here; heads: 2 in the checkpoint, 4 here" in err
    assert checkpoint.latest(folder) == folder / "step-6"


# A pipeline whose stages share a parameter: the head's weight is the embedding's.


def _tied() -> TinyTransformer:
    torch.manual_seed(0)
    model = TinyTransformer()
    model.head.weight = model.embed.weight
    return model


def _differing_copy(source: Path, target: Path) -> None:
    """`source` with its two tied entries made to differ, as a new checkpoint with a manifest."""
    state = _tensors(source)
    state["model.head.weight"] = state["model.head.weight"] + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(target), no_dist=True)
    checkpoint.write_manifest(target, {"model": "tied"})


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.1)


def _ties_after_load(rank: int, world: int, folder: Path) -> None:
    for schedule, num_stages in (("1f1b", 2), ("zbv", 4)):  # the tie across two ranks, and within rank 0
        where = f"{schedule}, rank {rank}"
        pipe = Pipeline(
            manual_split(_tied, num_stages),
            PipelineSpec(schedule, world, 4),
            loss_fn=token_loss,
            optimizer=lambda params: torch.optim.Adam(params, lr=0.1),
        )
        x, y = token_batch(4)
        pipe.step(x, y)
        good = checkpoint.save(pipe, folder / schedule, 1, settings={"model": "tied"})
        bad = folder / schedule / "step-2"
        if rank == 0:
            _differing_copy(good, bad)
        dist.barrier()
        checkpoint.load(pipe, good, settings={"model": "tied"})  # equal copies load
        with pytest.raises(CheckpointError, match="tied") as refused:
            checkpoint.load(pipe, bad, settings={"model": "tied"})
        message = str(refused.value)
        if schedule == "1f1b":
            # Each rank reads the tie's other names too, so the copies disagree where they are read.
            expected = "it holds model.embed.weight and model.head.weight with different values"
            assert expected in message, f"{where}: {message}"
        else:
            expected = "on rank 0, it holds model.embed.weight and model.head.weight with different values"
            assert expected in message, f"{where}: {message}"
        pipe.close()


@pytest.mark.timeout(200)
def test_tied_copies_are_checked_equal_after_a_load(tmp_path: Path) -> None:
    spawn(_ties_after_load, 2, (tmp_path,), timeout_s=180)
    unsplit = _tied()
    checkpoint.load_model(unsplit, tmp_path / "1f1b" / "step-1")
    with pytest.raises(CheckpointError, match="holds model.embed.weight and model.head.weight with different values"):
        checkpoint.load_model(_tied(), tmp_path / "1f1b" / "step-2")


@contextlib.contextmanager
def _full_disk() -> Iterator[None]:
    """Every file DCP opens for writing fails as on a full disk (its one way to open a file)."""
    original = FileSystem.create_stream

    def create_stream(self: FileSystem, path: Any, mode: str) -> Any:
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(self, path, mode)

    FileSystem.create_stream = create_stream  # type: ignore[method-assign]
    try:
        yield
    finally:
        FileSystem.create_stream = original  # type: ignore[method-assign]


def _save_on_a_full_disk(rank: int, world: int, folder: Path) -> None:
    pipe = Pipeline(
        manual_split(_tied, 2),
        PipelineSpec("1f1b", world, 2),
        loss_fn=token_loss,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.1),
    )
    pipe.step(*token_batch(4))
    checkpoint.save(pipe, folder, 1)
    for save in (checkpoint.save, lambda *args: checkpoint.save_async(*args).wait()):
        with _full_disk(), pytest.raises(CheckpointWriteError) as failed:
            save(pipe, folder, 2)
        message = str(failed.value)
        assert f"could not write checkpoint {folder / 'step-2'}: the disk is full: rank 0: OSError" in message
        assert "No space left on device" in message and "bytes free" in message
        assert f"{folder / 'step-1'} is still the latest checkpoint: free space" in message
        assert isinstance(failed.value, Exception)  # DCP's own CheckpointException is not: the launcher missed it
        dist.barrier()
        assert checkpoint.checkpoints(folder) == [folder / "step-1"] and not (folder / "step-2.partial").exists()
    checkpoint.save(pipe, folder, 2)
    checkpoint.verify(folder / "step-2")
    pipe.close()


@pytest.mark.timeout(200)
def test_a_save_on_a_full_disk_says_so(tmp_path: Path) -> None:
    spawn(_save_on_a_full_disk, 2, (tmp_path,), timeout_s=180)

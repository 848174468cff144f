"""The restricted `.metadata` reader reads what DCP writes and refuses, unrun, anything that is not its metadata."""

from __future__ import annotations

import os
import pickle
import random
import struct
import warnings
from pathlib import Path, PurePosixPath

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

from conveyor.checkpoint import CheckpointError, DamagedCheckpointError, UnsafeCheckpointError
from conveyor.checkpoint_metadata import read_metadata


def _dcp_save(state: dict[str, object], folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP notes that it assumes one process
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)


def _trusted(folder: Path) -> dcp_metadata.Metadata:
    """What pickle itself reads (these tests wrote the file)."""
    with (folder / ".metadata").open("rb") as file:
        return pickle.load(file)


def _same(read: dcp_metadata.Metadata, expected: dcp_metadata.Metadata) -> None:
    assert read.state_dict_metadata == expected.state_dict_metadata
    assert read.storage_data == expected.storage_data
    assert read.planner_data == expected.planner_data
    assert read.version == expected.version


def test_it_reads_what_dcp_writes(tmp_path: Path) -> None:
    """Every dtype a checkpoint holds, scalars and empty tensors, as pickle itself reads them."""
    g = torch.Generator().manual_seed(0)
    state = {
        "model.w": torch.randn(3, 4, generator=g),
        "model.half": torch.randn(5, generator=g).half(),
        "model.bf16": torch.randn(2, 2, generator=g).bfloat16(),
        "optim.w.step": torch.tensor(7.0),
        "train.step": torch.tensor(3),
        "train.mask": torch.tensor([True, False]),
        "model.empty": torch.empty(0, 4),
        "rng.rank0": torch.get_rng_state(),
    }
    _dcp_save(state, tmp_path)
    read = read_metadata(tmp_path)
    _same(read, _trusted(tmp_path))
    assert read.state_dict_metadata["model.bf16"].properties.dtype is torch.bfloat16
    assert read.state_dict_metadata["train.step"].size == torch.Size([])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_it_reads_every_binary_protocol_and_large_offsets(tmp_path: Path, protocol: int) -> None:
    """A hand-made metadata with a shard past 1 TiB (a LONG integer) and a saved path, in protocols 2-5."""
    entry = dcp_metadata.TensorStorageMetadata(
        dcp_metadata.TensorProperties(dtype=torch.float64),
        torch.Size([2**33]),
        [dcp_metadata.ChunkStorageMetadata(torch.Size([0]), torch.Size([2**33]))],
    )
    index = dcp_metadata.MetadataIndex("model.big", [0], 0)
    metadata = dcp_metadata.Metadata(
        {"model.big": entry},
        planner_data={"model.big": ("model", "big")},
        storage_data={index: _StorageInfo("__0_0.distcp", 2**40 + 3, 2**36)},
        storage_meta=dcp_metadata.StorageMeta(checkpoint_id=Path("/ck/step-1"), save_id="x", modules=["m"]),
        version="1.0.0",
    )
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata, protocol=protocol))
    read = read_metadata(tmp_path)
    _same(read, metadata)
    assert read.storage_data[index].offset == 2**40 + 3
    assert read.storage_meta is not None and read.storage_meta.checkpoint_id == PurePosixPath("/ck/step-1")


class _Opens:
    """A pickle that, unpickled, creates the file `marker` (as `open(marker, "w")`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


class _Runs:
    """A pickle that, unpickled, runs a shell command creating `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


def _inside_real_metadata(folder: Path, payload: object) -> bytes:
    """DCP metadata whose version string is replaced by `payload`: the payload sits deep in a valid file."""
    _dcp_save({"model.w": torch.ones(2)}, folder)
    metadata = _trusted(folder)
    metadata.version = payload  # type: ignore[assignment]
    return pickle.dumps(metadata)


@pytest.mark.parametrize(
    "make, asks_for",
    [
        (lambda marker, _: pickle.dumps(_Opens(marker)), f"{open.__module__}.open"),
        (lambda marker, _: pickle.dumps(_Runs(marker)), f"{os.system.__module__}.system"),
        (lambda marker, folder: _inside_real_metadata(folder, _Opens(marker)), f"{open.__module__}.open"),
    ],
    ids=["open", "system", "deep-inside"],
)
def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path: Path, make, asks_for: str) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "marker"
    folder = tmp_path / "ck"
    folder.mkdir()
    data = make(marker, folder)
    (folder / ".metadata").write_bytes(data)
    with pytest.raises(UnsafeCheckpointError) as refused:
        read_metadata(folder)
    assert f"{folder / '.metadata'} asks to build {asks_for}" in str(refused.value)
    assert "nothing in it was run" in str(refused.value)
    assert not marker.exists(), "the payload ran"
    pickle.loads(data)  # the payload is real: pickle itself runs it
    assert marker.exists()


def test_an_entry_stored_as_an_object_is_refused(tmp_path: Path) -> None:
    """DCP stores a non-tensor entry pickled and reads it back with torch.load(weights_only=False): refused."""
    _dcp_save({"model.w": torch.ones(2), "train.step": 3}, tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"asks to build torch\.distributed\.checkpoint\.metadata\.Bytes"):
        read_metadata(tmp_path)


def _handmade(*parts: bytes) -> bytes:
    return b"\x80\x04" + b"".join(parts) + b"."


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


META = "torch.distributed.checkpoint.metadata"


@pytest.mark.parametrize(
    "data, reason",
    [
        # An allowed class called with arguments (REDUCE) rather than made empty (NEWOBJ).
        (_handmade(_global(META, "Metadata"), b"}", b"\x85", b"R"), "REDUCE of torch.distributed"),
        # BUILD on a class itself: it would set attributes of DCP's Metadata class for the whole process.
        (
            _handmade(_global(META, "Metadata"), b"N}", _text("__eq__"), b"N", b"s", b"\x86", b"b"),
            "BUILD of torch.distributed.checkpoint.metadata.Metadata, not of a",
        ),
        # A dunder in an object's state.
        (_handmade(_global(META, "StorageMeta"), b")\x81}", _text("__class__"), b"N", b"s", b"b"), "not a dict of its"),
        # A dtype where a Metadata belongs.
        (_handmade(_global("torch", "float32")), "holds a dtype, not a Metadata"),
        # Opcodes DCP's metadata never uses.
        (_handmade(b"I1\n"), "opcode b'I'"),
    ],
    ids=["reduce-class", "build-class", "dunder", "not-metadata", "opcode"],
)
def test_anything_but_dcp_metadata_is_refused(tmp_path: Path, data: bytes, reason: str) -> None:
    (tmp_path / ".metadata").write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match="is not DCP's metadata") as refused:
        read_metadata(tmp_path)
    assert reason in str(refused.value)


def test_a_truncated_or_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DamagedCheckpointError, match=r"it has no \.metadata"):
        read_metadata(tmp_path)
    _dcp_save({"model.w": torch.ones(2)}, tmp_path)
    data = (tmp_path / ".metadata").read_bytes()
    (tmp_path / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedCheckpointError, match=r"\.metadata ends early \(\d+ bytes\): truncated"):
        read_metadata(tmp_path)
    assert issubclass(DamagedCheckpointError, CheckpointError) and issubclass(CheckpointError, ValueError)


def test_damaged_bytes_give_a_checkpoint_error_and_nothing_else(tmp_path: Path) -> None:
    """Random bytes changed in real metadata: it reads, or raises a CheckpointError; never another exception."""
    _dcp_save({"model.w": torch.ones(2, 3), "train.step": torch.tensor(1), "model.h": torch.ones(4).half()}, tmp_path)
    good = (tmp_path / ".metadata").read_bytes()
    rng = random.Random(0)
    outcomes = {"read": 0, "refused": 0}
    for _ in range(400):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        (tmp_path / ".metadata").write_bytes(bytes(data))
        try:
            read_metadata(tmp_path)
            outcomes["read"] += 1
        except CheckpointError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 300, outcomes

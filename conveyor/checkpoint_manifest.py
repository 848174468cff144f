"""A checkpoint's manifest: the checksum and size of each of its files and the settings that shape its model.

`conveyor-manifest.json` is JSON (nothing in it is code) and is written last, just before the checkpoint
is published, so a checkpoint without one was never finished by conveyor. It holds:

- `files`: for every file of the checkpoint (DCP's shards and `.metadata`, the trainer's files), its size
  and SHA-256 checksum;
- `settings`: what the saver said shapes its model (for `conveyor train`: the model, its sizes, the
  vocabulary, the precision, the number of stages), compared with the loader's before any tensor is read;
- `checksum`: the SHA-256 of the rest, so a damaged manifest is told apart from a damaged file.

DCP keeps no checksums, so without these a flipped byte in a shard would load as a wrong weight.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint_errors import CheckpointError, CheckpointMismatchError, DamagedCheckpointError

__all__ = [
    "HASH",
    "MANIFEST_FILE",
    "FileRecord",
    "Manifest",
    "Setting",
    "check_file",
    "check_settings",
    "checked_settings",
    "file_record",
    "text_record",
]

MANIFEST_FILE = "conveyor-manifest.json"
HASH = "sha256"
FORMAT = 1
Setting = str | int | float | bool
_BLOCK = 1 << 22  # 4 MiB reads: large enough that hashing, not the reads, sets the pace


def _hasher() -> Any:
    return hashlib.sha256()


@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint as it was saved."""

    size: int
    digest: str
    """Its SHA-256, in hex."""


def file_record(path: Path) -> FileRecord:
    """The size and checksum of the file at `path` (read once, in 4 MiB blocks)."""
    hasher = _hasher()
    size = 0
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as file:
        while n := file.readinto(buffer):
            hasher.update(view[:n])
            size += n
    return FileRecord(size, hasher.hexdigest())


def text_record(data: bytes) -> FileRecord:
    hasher = _hasher()
    hasher.update(data)
    return FileRecord(len(data), hasher.hexdigest())


def check_file(folder: Path, name: str, record: FileRecord) -> str | None:
    """What is wrong with file `name` of the checkpoint in `folder`, or None when it is as saved."""
    path = folder / name
    try:
        size = path.stat().st_size
        if size != record.size:
            how = "truncated" if size < record.size else "grown"
            return (
                f"{name} is {size:,} bytes but was saved with {record.size:,}: it is {how}, the checkpoint is corrupt"
            )
        if file_record(path).digest != record.digest:
            return (
                f"{name} is corrupt: its bytes differ from those saved (its {HASH} checksum does not match the"
                " manifest's)"
            )
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as error:
        return f"{name} cannot be read ({error})"
    return None


@dataclass(frozen=True)
class Manifest:
    step: int
    settings: dict[str, Setting]
    files: dict[str, FileRecord]

    def write(self, folder: Path) -> FileRecord:
        """Write the manifest into `folder`; its own record (a manifest is never listed in itself)."""
        body = self._body()
        data = json.dumps({**body, "checksum": _checksum(body)}, indent=1, allow_nan=False).encode() + b"\n"
        (folder / MANIFEST_FILE).write_bytes(data)
        return text_record(data)

    def _body(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "hash": HASH,
            "step": self.step,
            "settings": dict(self.settings),
            "files": {name: {"size": r.size, "digest": r.digest} for name, r in sorted(self.files.items())},
        }

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """The manifest of the checkpoint in `folder`.

        Raises DamagedCheckpointError when there is none (saying how to add one) or it is not intact, and
        CheckpointError for a manifest of a newer format.
        """
        path = folder / MANIFEST_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise DamagedCheckpointError(
                folder,
                [f"it has no {MANIFEST_FILE}, so neither its files nor its settings can be checked"],
                "it was written by a conveyor from before checkpoints were verified, or not by conveyor. If you"
                " trust its files, record them as they are now with conveyor.checkpoint.write_manifest(folder,"
                " settings) (the settings it was saved with; `conveyor train` records those of"
                " conveyor.train.checkpoint_settings) and load it again",
            ) from None
        try:
            raw = json.loads(text)
            body = {key: value for key, value in raw.items() if key != "checksum"}
            if raw.get("format") == FORMAT and raw.get("checksum") != _checksum(body):
                raise ValueError(f"its own checksum does not match its contents (not the {HASH} of them)")
            if raw.get("format", FORMAT) != FORMAT or raw.get("hash", HASH) != HASH:
                raise CheckpointError(
                    f"{path} is a manifest of format {raw.get('format')} with {raw.get('hash')} checksums; this"
                    f" conveyor reads format {FORMAT} with {HASH}: load the checkpoint with the conveyor that wrote it"
                )
            files = {name: FileRecord(int(r["size"]), str(r["digest"])) for name, r in raw["files"].items()}
            return cls(int(raw["step"]), _settings(raw["settings"]), files)
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise DamagedCheckpointError(
                folder, [f"{MANIFEST_FILE} is corrupt or truncated ({type(error).__name__}: {error})"]
            ) from None


def _checksum(body: Mapping[str, Any]) -> str:
    return text_record(json.dumps(body, sort_keys=True, allow_nan=False).encode()).digest


def _settings(raw: Any) -> dict[str, Setting]:
    if not isinstance(raw, dict) or not all(isinstance(v, (str, int, float, bool)) for v in raw.values()):
        raise TypeError("settings must map names to strings, numbers or booleans")
    return dict(raw)


def checked_settings(settings: Mapping[str, Setting]) -> dict[str, Setting]:
    """`settings` as a manifest stores them; TypeError for a value JSON cannot hold exactly."""
    for key, value in settings.items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"a checkpoint setting is a name and a str, int, float or bool; got {key!r}: {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise TypeError(f"checkpoint setting {key} is {value}: settings must be finite")
    return dict(settings)


def _same(saved: Setting, wanted: Setting) -> bool:
    """Equal and of one kind (JSON reads 4.0 back as 4.0, but True is not 1 here)."""
    kinds = {type(saved), type(wanted)}
    if bool in kinds or str in kinds:
        return type(saved) is type(wanted) and saved == wanted
    return saved == wanted


def check_settings(folder: Path, saved: Mapping[str, Setting], wanted: Mapping[str, Setting]) -> None:
    """Raise CheckpointMismatchError naming each setting of `wanted` that the checkpoint was not saved with,
    with both values."""
    differing = [key for key, value in wanted.items() if key not in saved or not _same(saved[key], value)]
    if not differing:
        return
    described = [
        f"{key}: {saved[key]!r} in the checkpoint, {wanted[key]!r} here"
        if key in saved
        else f"{key}: not recorded in the checkpoint, {wanted[key]!r} here"
        for key in differing
    ]
    fitting = ", ".join(f"{key}={saved[key]!r}" for key in differing if key in saved)
    advice = f"load it with the settings it was saved with ({fitting})" if fitting else "load it as it was saved"
    raise CheckpointMismatchError(
        f"checkpoint {folder} was saved for another model than this one: {'; '.join(described)}. Its weights would"
        f" not mean what this model expects: {advice}, or start from a new checkpoint folder"
    )

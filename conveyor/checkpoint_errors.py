"""What can be wrong with a checkpoint, as exceptions that name the file, what failed and what to do."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "DamagedCheckpointError",
    "UnsafeCheckpointError",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked (the base of the errors below that read one)."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint that fails verification: a file missing, truncated or changed since the save, or no
    manifest to check it against. Nothing in it was used; `newest_verified` skips it for an older one."""

    def __init__(self, path: str | Path, problems: list[str], advice: str = "") -> None:
        self.path = Path(path)
        self.problems = problems
        self.advice = advice
        advice = advice or (
            "resume from an earlier checkpoint (`conveyor train --resume` takes the newest that verifies),"
            " or restore this one from a copy"
        )
        super().__init__(
            f"checkpoint {path} failed verification: {'; '.join(problems)}. Nothing in it was used: {advice}"
        )


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's metadata asks to build something other than the metadata's own classes (a pickle that
    would run code, or not DCP's metadata at all). It was not run; `newest_verified` does not skip it."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint saved with other settings than the model it is loaded into (layers, heads, precision, ...)."""


class CheckpointWriteError(OSError):
    """A save that failed (a full disk, a lost rank): the checkpoint was not published, the previous one stands."""

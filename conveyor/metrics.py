"""Training metrics: one CSV row per step (and TensorBoard scalars when it is installed), peak memory per rank."""

from __future__ import annotations

import csv
import importlib.util
import resource
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsWriter", "peak_memory_mib"]


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory: the CUDA allocator's peak on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class MetricsWriter:
    """Writes `columns` per step to `path` (CSV, flushed every row) and, if `tensorboard` names a folder and
    the tensorboard package is installed, the same values as scalars there.

    `keep_until`: a resumed run's step; the CSV's rows up to that step are kept (later ones were written by
    the run that failed after its checkpoint, and are written again), the file is otherwise started afresh.
    """

    def __init__(
        self, path: str | Path, columns: Sequence[str], tensorboard: str | Path = "", keep_until: int | None = None
    ) -> None:
        self.columns = list(columns)
        kept = _rows_until(Path(path), keep_until) if keep_until is not None else []
        self._file = Path(path).open("w", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=self.columns)
        self._csv.writeheader()
        self._csv.writerows(kept)
        self._board: Any = None
        if tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                raise ValueError("--tensorboard needs the tensorboard package: pip install 'conveyor[tensorboard]'")
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(tensorboard))

    def write(self, step: int, values: Mapping[str, float | None]) -> None:
        row = {name: "" if values.get(name) is None else values[name] for name in self.columns}
        row["step"] = step
        self._csv.writerow(row)
        self._file.flush()
        if self._board is not None:
            for name, value in values.items():
                if value is not None and name != "step":
                    self._board.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()


def _rows_until(path: Path, step: int) -> list[dict[str, str]]:
    """The rows of the CSV at `path` (if it is a file) up to `step`."""
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [row for row in csv.DictReader(file) if row.get("step", "").isdigit() and int(row["step"]) <= step]

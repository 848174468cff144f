"""A character-level corpus every machine has: the Python standard library's own source."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

__all__ = ["stdlib_source_bytes", "TextBatches"]


def stdlib_source_bytes(max_bytes: int = 4_000_000) -> torch.Tensor:
    """Up to `max_bytes` of the standard library's .py files, in path order, as uint8 byte values."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        text = path.read_bytes()
        chunks.append(text[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    if total == 0:
        raise FileNotFoundError(f"found no Python source files under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


class TextBatches:
    """Random windows of a byte corpus: inputs and the next byte to predict.

    The last tenth of the corpus is held out for `validation_set`. Every rank that
    builds this with the same seed draws the same batches, so ranks need not
    ship data to each other.
    """

    def __init__(self, data: torch.Tensor, context: int, batch_size: int, seed: int = 0) -> None:
        if len(data) < 10 * (context + 1):
            raise ValueError(f"corpus of {len(data)} bytes is too short for context {context}")
        split = len(data) * 9 // 10
        self.train, self.held_out = data[:split].long(), data[split:].long()
        self.context = context
        self.batch_size = batch_size
        self._seed = seed
        self._train_rng = torch.Generator().manual_seed(seed)

    def position(self) -> torch.Tensor:
        """Where the training stream is (its generator's state), for a checkpoint; `seek` returns there."""
        return self._train_rng.get_state()

    def seek(self, position: torch.Tensor) -> None:
        self._train_rng.set_state(position)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sample(self.train, self._train_rng)

    def validation_set(self, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same `num_batches` held-out mini-batches every time: evaluations that compare across steps."""
        rng = torch.Generator().manual_seed(self._seed + 1)
        return [self._sample(self.held_out, rng) for _ in range(num_batches)]

    def _sample(self, data: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(data) - self.context - 1, (self.batch_size,), generator=rng)
        windows = torch.stack([data[s : s + self.context + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

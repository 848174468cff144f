"""A stream's micro-batches, read from its mini-batches lazily as the executor asks for them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .loss_weights import LossWeights
from .microbatch import check_rows, input_signature, map_tensors, split_microbatches

__all__ = ["StreamFeed"]


class StreamFeed:
    """`inputs[k]`, `targets[k]` and `weights[k]` are those of micro-batch k of the stream, in order.

    A mini-batch is read from `batches` when its first micro-batch is asked for and let go once the next
    one is read, so a stream of any length holds one mini-batch at a time. Every micro-batch must have
    the shapes of the first (an asynchronous program describes each link once). `per_step` is how many
    micro-batches one update applies (a whole mini-batch when None): `loss_weights` weighs their losses
    for each update's mean.
    """

    def __init__(
        self,
        batches: Iterator[tuple[Any, Any]],
        m: int,
        num_batches: int,
        device: torch.device,
        per_step: int | None,
        loss_weights: LossWeights,
    ) -> None:
        self._batches, self._m, self._num_batches, self._device = batches, m, num_batches, device
        self._per_step, self._loss_weights = per_step, loss_weights
        self._index = -1
        self._current: tuple[list[Any], list[Any], list[float]] = ([], [], [])
        self._first: int | None = None
        self.inputs = _Column(self, 0)
        self.targets = _Column(self, 1)
        self.weights = _Column(self, 2)

    def signature(self) -> int:
        """The shapes of the stream's micro-batches (every one must have them): those of the first."""
        return input_signature([self.get(0, 0)])

    def get(self, k: int, column: int) -> Any:
        batch, j = divmod(k, self._m)
        if batch != self._index:
            if batch != self._index + 1 or batch >= self._num_batches:
                raise RuntimeError(f"the stream asked for micro-batch {k} out of order (mini-batch {self._index})")
            self._read(batch)
        return self._current[column][j]

    def _read(self, batch: int) -> None:
        try:
            inputs, targets = next(self._batches)
        except StopIteration:
            raise ValueError(f"the stream's batches ended after {batch} of the {self._num_batches} asked for") from None
        m, device = self._m, self._device
        check_rows(inputs, targets, f" of mini-batch {batch}")
        input_mbs = split_microbatches(map_tensors(inputs, lambda t: t.to(device)), m) if inputs is not None else []
        target_mbs = split_microbatches(targets, m) if targets is not None else []
        weights = self._loss_weights(target_mbs, self._per_step) if targets is not None else []
        target_mbs = [map_tensors(t, lambda t: t.to(device)) for t in target_mbs]
        for mb in input_mbs:
            shapes = input_signature([mb])
            if self._first is None:
                self._first = shapes
            elif shapes != self._first:
                raise ValueError(
                    f"mini-batch {batch} splits into micro-batches of other shapes than the stream's first: an"
                    " asynchronous stream needs every micro-batch alike (a batch size divisible by the micro-batches)"
                )
        self._index = batch
        self._current = (input_mbs, target_mbs, weights)


class _Column:
    """One of a `StreamFeed`'s sequences (inputs, targets or loss weights), indexed by micro-batch."""

    def __init__(self, feed: StreamFeed, column: int) -> None:
        self._feed, self._column = feed, column

    def __getitem__(self, k: int) -> Any:
        return self._feed.get(k, self._column)

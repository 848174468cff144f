"""The mini-batches a run trains on, endlessly, with a position a checkpoint keeps.

From a map-style `Dataset` of (inputs, targets) samples the batches come from torchdata's
`StatefulDataLoader`, one per epoch, shuffled by a generator seeded from the seed and the epoch: the
epoch and the loader's `state_dict()` are the data position, so a resumed run reads exactly the batches
an uninterrupted one would. Any other
iterable of (inputs, targets) mini-batches is read as given; one with `state_dict()` and
`load_state_dict()` (a `StatefulDataLoader` of the user's, say) keeps its position the same way, and
one without is replayed from its start and fast-forwarded on resume, which needs it to be re-iterable
and to give the same batches each time (a list, a loader with a seeded sampler).

Every rank of a pipeline builds the same batches from the same seed: the first stage's rank uses the
inputs, the last stage's the targets, and no data travels between ranks.
"""

from __future__ import annotations

import base64
import json
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["Batches", "decode_state", "encode_state", "fixed_batches"]


class Batches:
    """An endless stream of (inputs, targets) mini-batches (see the module's docstring)."""

    def __init__(self, data: Dataset[Any] | Iterable[Any], batch_size: int, seed: int = 0) -> None:
        self._data, self._batch_size, self._seed = data, batch_size, seed
        self._epoch, self._taken = 0, 0
        self._map_style = _is_map_style(data)
        if self._map_style and len(data) < batch_size:  # type: ignore[arg-type]
            raise ValueError(
                f"the data holds {len(data)} sequence(s), fewer than a mini-batch of {batch_size}:"  # type: ignore[arg-type]
                " give more data or a smaller batch size"
            )
        self._source: Any = self._loader(0) if self._map_style else data
        self._stateful = hasattr(self._source, "state_dict") and hasattr(self._source, "load_state_dict")
        self._iterator: Iterator[Any] | None = None

    def _loader(self, epoch: int) -> Any:
        """Epoch `epoch`'s loader, shuffled by a generator of its own: an epoch's order depends on the seed and
        the epoch alone, so a run resumed in any epoch goes on as an uninterrupted one (a generator shared by
        the epochs would be where the state of the epoch it was saved in left it)."""
        from torchdata.stateful_dataloader import StatefulDataLoader

        generator = torch.Generator().manual_seed(self._seed * 1_000_003 + epoch)
        with warnings.catch_warnings():  # torchdata 0.11 calls a torch function torch now calls deprecated
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            return StatefulDataLoader(
                self._data,  # type: ignore[arg-type]
                batch_size=self._batch_size,
                shuffle=True,
                drop_last=True,
                generator=generator,
            )

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[Any, Any]:
        for _ in range(2):  # at most one new epoch per batch: an empty epoch twice is no data at all
            if self._iterator is None:
                self._iterator = iter(self._source)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._new_epoch(self._epoch + 1)
                continue
            self._taken += 1
            return _pair(batch)
        raise ValueError("the data gave no mini-batch: it is empty")

    def _new_epoch(self, epoch: int) -> None:
        self._epoch, self._taken, self._iterator = epoch, 0, None
        if self._map_style:
            self._source = self._loader(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: its epoch, and its loader's position (or how many batches it took)."""
        state: dict[str, Any] = {"epoch": self._epoch, "taken": self._taken}
        if self._stateful:
            state["loader"] = self._source.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (of a stream over the same data and seed)."""
        self._new_epoch(int(state["epoch"]))
        self._taken = int(state["taken"])
        if self._stateful:
            self._source.load_state_dict(state["loader"])  # the position within the epoch's permutation
            return
        self._iterator = iter(self._source)
        for _ in range(self._taken):
            next(self._iterator)


def fixed_batches(data: Dataset[Any] | Iterable[Any], batch_size: int, count: int) -> list[tuple[Any, Any]]:
    """The first `count` mini-batches of `data` in order, the same every time (for evaluations that compare)."""
    if _is_map_style(data):
        from torch.utils.data import DataLoader

        loader: Iterable[Any] = DataLoader(data, batch_size=batch_size, shuffle=False)  # type: ignore[arg-type]
    else:
        loader = data  # type: ignore[assignment]
    batches = []
    for batch in loader:
        batches.append(_pair(batch))
        if len(batches) == count:
            break
    if not batches:
        raise ValueError("the evaluation data gave no mini-batch")
    return batches


def _is_map_style(data: Any) -> bool:
    return isinstance(data, Dataset) and hasattr(data, "__len__") and hasattr(data, "__getitem__")


def _pair(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"a mini-batch must be a pair (inputs, targets); got {type(batch).__name__}"
        + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def encode_state(state: Any) -> str:
    """A data position as JSON (tensors as base64 with their dtype and shape): text a checkpoint can keep
    without pickling anything."""
    return json.dumps(_encode(state), sort_keys=True)


def decode_state(text: str) -> Any:
    return _decode(json.loads(text))


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        data = base64.b64encode(value.detach().cpu().contiguous().numpy().tobytes()).decode()
        return {"__tensor__": data, "dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"a data position's keys must be strings; got {sorted(map(repr, value))}")
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a data position holds a {type(value).__name__}, which a checkpoint cannot keep as JSON")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            dtype = getattr(torch, value["dtype"])
            raw = bytearray(base64.b64decode(value["__tensor__"]))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            return flat.reshape(value["shape"]).clone()
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value

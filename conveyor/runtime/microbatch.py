"""Cut a mini-batch into micro-batches along dimension 0, and join them again."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "batch_size",
    "check_rows",
    "concat_microbatches",
    "input_signature",
    "map_tensors",
    "split_microbatches",
    "tensors_in",
]


def batch_size(batch: Any) -> int:
    """The size of dimension 0 shared by every tensor in `batch` (a tensor, or a tuple/list/dict of them)."""
    sizes = {t.shape[0] for t in tensors_in(batch) if t.dim() > 0}
    if not sizes:
        raise ValueError("the batch holds no tensor with a batch dimension to split into micro-batches")
    if len(sizes) > 1:
        raise ValueError(f"tensors in the batch disagree on the batch size (dimension 0): {sorted(sizes)}")
    return sizes.pop()


def split_microbatches(batch: Any, num_microbatches: int) -> list[Any]:
    """Split every tensor of `batch` along dimension 0 into `num_microbatches` parts.

    Tuples, lists and dicts keep their structure; scalars, 0-d tensors and
    other leaves are given whole to every micro-batch. When the batch size is
    not a multiple of the count, the first micro-batches get one sample more
    (like `torch.tensor_split`); `LossWeights` weighs their losses.
    """
    size = batch_size(batch)
    if num_microbatches < 1:
        raise ValueError(f"need at least 1 micro-batch; got {num_microbatches}")
    if size < num_microbatches:
        raise ValueError(
            f"cannot split a batch of {size} samples into {num_microbatches} micro-batches:"
            f" use at most {size} micro-batches or a larger batch"
        )
    return _split(batch, num_microbatches)


def check_rows(inputs: Any, targets: Any, where: str = "") -> None:
    """Every sample needs its target: a target batch of another size would broadcast, or go unnoticed."""
    if inputs is None or targets is None:
        return
    rows, wanted = batch_size(targets), batch_size(inputs)
    if rows != wanted:
        raise ValueError(
            f"the targets{where} have {rows} rows but the inputs {wanted}: each sample needs its target"
            " (dimension 0 is the batch)"
        )


def input_signature(microbatches: Sequence[Any]) -> int:
    """A 63-bit name for the shapes and dtypes of a step's micro-batches (only its equality matters).

    The same on every process (replicas of the first stage compare theirs), so not Python's `hash`.
    """
    shapes = tuple(tuple((t.shape, t.dtype) for t in tensors_in(mb)) for mb in microbatches)
    signature = _signatures.get(shapes)
    if signature is None:
        described = tuple(tuple((tuple(shape), str(dtype)) for shape, dtype in mb) for mb in shapes)
        words = hashlib.blake2b(repr(described).encode(), digest_size=8).digest()
        signature = int.from_bytes(words, "little") & (2**63 - 1)
        if len(_signatures) >= 64:  # batches of ever new shapes: keep the memo small
            _signatures.clear()
        _signatures[shapes] = signature
    return signature


_signatures: dict[tuple[tuple[tuple[torch.Size, torch.dtype], ...], ...], int] = {}


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`batch` with `fn` applied to every tensor, tuples, lists and dicts rebuilt around them."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({key: map_tensors(value, fn) for key, value in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(value, fn) for value in batch)
    return batch


def concat_microbatches(parts: Sequence[Any]) -> Any:
    """Join micro-batches back into one batch: tensors along dimension 0, structures rebuilt around them.

    The inverse of `split_microbatches` (0-d tensors, like a per-micro-batch
    loss, are stacked; other leaves are taken from the first part).
    """
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts)) if first.dim() > 0 else torch.stack(list(parts))
    if isinstance(first, Mapping):
        return type(first)({key: concat_microbatches([p[key] for p in parts]) for key in first})  # type: ignore[call-arg]
    if isinstance(first, (tuple, list)):
        return type(first)(concat_microbatches([p[i] for p in parts]) for i in range(len(first)))
    return first


def _split(batch: Any, parts: int) -> list[Any]:
    """`batch` as `parts` micro-batches: each tensor cut once (not once per micro-batch), structures rebuilt."""
    if isinstance(batch, torch.Tensor):
        return list(batch.tensor_split(parts)) if batch.dim() > 0 else [batch] * parts
    if isinstance(batch, Mapping):
        columns = {key: _split(value, parts) for key, value in batch.items()}
        return [type(batch)({key: column[i] for key, column in columns.items()}) for i in range(parts)]  # type: ignore[call-arg]
    if isinstance(batch, (tuple, list)):
        items = [_split(value, parts) for value in batch]
        return [type(batch)(column[i] for column in items) for i in range(parts)]
    return [batch] * parts


def tensors_in(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a (possibly nested) tuple, list or dict, in order."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for value in batch.values() for t in tensors_in(value)]
    if isinstance(batch, (tuple, list)):
        return [t for value in batch for t in tensors_in(value)]
    return []

"""What a receiver must know to allocate a buffer: shapes, dtypes, and which tensors carry gradients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["TensorMeta", "encode_metas", "decode_metas", "HEADER_LENGTH"]

# One fixed-size int64 message describes all tensors a stage sends for one
# micro-batch, so the receiver can post it before knowing anything else.
HEADER_LENGTH = 128

_DTYPES: list[torch.dtype] = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorMeta:
        return cls(tuple(tensor.shape), tensor.dtype, tensor.requires_grad)

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)


def encode_metas(metas: Sequence[TensorMeta], what: str) -> torch.Tensor:
    """Pack `metas` as [count, (dtype, requires_grad, ndim, *shape) ...] in HEADER_LENGTH int64s."""
    words = [len(metas)]
    for meta in metas:
        if meta.dtype not in _DTYPES:
            raise TypeError(f"{what}: cannot send a tensor of dtype {meta.dtype} between stages")
        words += [_DTYPES.index(meta.dtype), int(meta.requires_grad), len(meta.shape), *meta.shape]
    if len(words) > HEADER_LENGTH:
        raise ValueError(
            f"{what}: {len(metas)} tensors with shapes {[m.shape for m in metas]} do not fit the"
            f" {HEADER_LENGTH}-word metadata message; return fewer or lower-rank tensors from the stage"
        )
    return torch.tensor(words + [0] * (HEADER_LENGTH - len(words)), dtype=torch.int64)


def decode_metas(header: torch.Tensor) -> list[TensorMeta]:
    words = header.tolist()
    metas, at = [], 1
    for _ in range(words[0]):
        dtype, requires_grad, ndim = words[at : at + 3]
        shape = tuple(words[at + 3 : at + 3 + ndim])
        metas.append(TensorMeta(shape, _DTYPES[dtype], bool(requires_grad)))
        at += 3 + ndim
    return metas

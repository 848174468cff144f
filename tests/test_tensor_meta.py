"""The fixed-size metadata message that tells a receiver what to allocate."""

from __future__ import annotations

import pytest
import torch

from conveyor.runtime.tensor_meta import HEADER_LENGTH, TensorMeta, decode_metas, encode_metas


def test_metas_round_trip_through_the_header() -> None:
    metas = [
        TensorMeta((4, 5, 8), torch.float32, True),
        TensorMeta((4, 5), torch.int64, False),
        TensorMeta((), torch.bfloat16, True),
        TensorMeta((2, 1, 1, 3), torch.bool, False),
    ]
    header = encode_metas(metas, "stage 0 output")
    assert header.shape == (HEADER_LENGTH,) and header.dtype == torch.int64
    assert decode_metas(header) == metas


def test_no_tensors_is_a_valid_message() -> None:
    assert decode_metas(encode_metas([], "nothing")) == []


def test_of_reads_a_tensor() -> None:
    t = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    assert TensorMeta.of(t) == TensorMeta((3, 2), torch.float64, True)
    assert TensorMeta.of(t).empty(torch.device("cpu")).shape == (3, 2)


def test_too_many_tensors_say_what_to_change() -> None:
    metas = [TensorMeta((1, 2, 3, 4), torch.float32, True)] * 20
    with pytest.raises(ValueError, match="stage 2 output: 20 tensors .* do not fit the 128-word metadata message"):
        encode_metas(metas, "stage 2 output")


def test_an_unsupported_dtype_is_refused() -> None:
    with pytest.raises(TypeError, match="stage 1 output: cannot send a tensor of dtype torch.float8_e4m3fn"):
        encode_metas([TensorMeta((2,), torch.float8_e4m3fn, False)], "stage 1 output")

"""Cutting a mini-batch into micro-batches, and weighing each one's loss."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conveyor.runtime.loss_weights import LossWeights
from conveyor.runtime.microbatch import (
    batch_size,
    map_tensors,
    split_microbatches,
    tensors_in,
)


def test_tensor_uneven_sizes_give_the_remainder_to_the_first_microbatches() -> None:
    batch = torch.arange(10)
    parts = split_microbatches(batch, 4)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]


def test_split_keeps_the_other_dimensions() -> None:
    parts = split_microbatches(torch.zeros(6, 3, 5), 3)
    assert [tuple(p.shape) for p in parts] == [(2, 3, 5)] * 3


def test_tuples_and_lists_keep_their_structure() -> None:
    x, y = torch.arange(5), torch.arange(5) * 10
    parts = split_microbatches((x, [y]), 2)
    assert isinstance(parts[0], tuple) and isinstance(parts[0][1], list)
    assert parts[0][0].tolist() == [0, 1, 2] and parts[0][1][0].tolist() == [0, 10, 20]
    assert parts[1][0].tolist() == [3, 4] and parts[1][1][0].tolist() == [30, 40]


def test_dicts_keep_their_keys_and_non_tensor_leaves_go_whole_to_every_microbatch() -> None:
    batch = {"tokens": torch.arange(7).reshape(7, 1), "scale": 0.5, "temperature": torch.tensor(2.0), "name": "x"}
    parts = split_microbatches(batch, 3)
    assert [p["tokens"].flatten().tolist() for p in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    for part in parts:
        assert list(part) == ["tokens", "scale", "temperature", "name"]
        assert part["scale"] == 0.5 and part["name"] == "x"
        assert part["temperature"].item() == 2.0  # a 0-d tensor has no batch dimension to cut


def test_one_microbatch_is_the_whole_batch() -> None:
    batch = torch.randn(3, 2)
    (only,) = split_microbatches(batch, 1)
    assert torch.equal(only, batch)


def test_a_batch_smaller_than_the_microbatch_count_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot split a batch of 3 samples into 4 micro-batches: use at most 3"):
        split_microbatches(torch.zeros(3, 2), 4)


def test_zero_microbatches_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 micro-batch; got 0"):
        split_microbatches(torch.zeros(3), 0)


def test_disagreeing_batch_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"disagree on the batch size \(dimension 0\): \[3, 4\]"):
        split_microbatches({"a": torch.zeros(3), "b": torch.zeros(4)}, 2)


def test_a_batch_without_tensors_is_refused() -> None:
    with pytest.raises(ValueError, match="no tensor with a batch dimension"):
        batch_size({"a": 1.0, "b": torch.tensor(3.0)})


def test_weights_of_an_uneven_split() -> None:
    assert LossWeights(None)(split_microbatches(torch.arange(10), 4)) == [0.3, 0.3, 0.2, 0.2]


def test_weighted_microbatch_losses_equal_the_full_batch_loss() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(10, 3), torch.randn(10, 3)
    full = torch.nn.functional.mse_loss(x, y)
    parts = zip(
        split_microbatches(x, 4), split_microbatches(y, 4), LossWeights(None)(split_microbatches(y, 4)), strict=True
    )
    weighted = sum(w * torch.nn.functional.mse_loss(a, b) for a, b, w in parts)
    assert torch.allclose(weighted, full, rtol=1e-6)


@given(st.integers(1, 200).flatmap(lambda size: st.tuples(st.just(size), st.integers(1, size))))
def test_split_properties(case: tuple[int, int]) -> None:
    size, m = case
    batch = torch.arange(size)
    parts = split_microbatches(batch, m)
    sizes = [len(p) for p in parts]
    assert len(parts) == m
    assert torch.equal(torch.cat(parts), batch)  # nothing lost, nothing reordered
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    weights = LossWeights(None)(parts)
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-12)
    assert weights == [n / size for n in sizes]


def test_map_tensors_rebuilds_containers() -> None:
    batch = {"a": (torch.ones(2), [torch.zeros(1)]), "b": 3}
    doubled = map_tensors(batch, lambda t: t + 1)
    assert doubled["a"][0].tolist() == [2.0, 2.0] and doubled["a"][1][0].tolist() == [1.0]
    assert isinstance(doubled["a"], tuple) and isinstance(doubled["a"][1], list) and doubled["b"] == 3
    assert [t.tolist() for t in tensors_in(doubled)] == [[2.0, 2.0], [1.0]]

"""The slowdown of compute in a pipeline's rank, measured with a spawned partner over a gloo group of its own."""

from __future__ import annotations

import math

import pytest
import torch

from conveyor.observe.profile import profile_layers
from conveyor.observe.slowdown import measure_pipeline_slowdown
from conveyor.plan.layers import profile_model


@pytest.mark.timeout(120)
def test_the_slowdown_is_measured_with_a_partner_and_the_partner_ends() -> None:
    work = torch.randn(96, 96)
    calls = [0]

    def layer() -> None:
        calls[0] += 1
        for _ in range(20):
            work @ work

    factor = measure_pipeline_slowdown([layer, layer], 4096, rounds=4, timeout_s=60)
    assert math.isfinite(factor) and 0.3 < factor < 5.0
    # Two works in every round of each kind, warm-up rounds included, and the untimed work after exchanges.
    assert calls[0] >= 2 * 2 * (4 + 2)
    assert not [p for p in torch.multiprocessing.active_children() if p.is_alive()]


@pytest.mark.timeout(120)
def test_a_failing_work_raises_and_leaves_no_partner_behind() -> None:
    def broken() -> None:
        raise RuntimeError("layer 3 failed")

    with pytest.raises(RuntimeError, match="layer 3 failed"):
        measure_pipeline_slowdown([broken], 4096, rounds=2, timeout_s=60)
    assert not [p for p in torch.multiprocessing.active_children() if p.is_alive()]


def test_no_work_is_an_error() -> None:
    with pytest.raises(ValueError, match="no work"):
        measure_pipeline_slowdown([], 4096)


@pytest.mark.timeout(120)
def test_a_layer_profile_measures_and_keeps_its_slowdown_when_asked() -> None:
    layers = [torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)]
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    asked = profile_layers(layers, (x,), y, torch.nn.functional.mse_loss, repeats=1, warmup=0, slowdown=True)
    assert asked.slowdown is not None and math.isfinite(asked.slowdown) and asked.slowdown > 0
    plain = profile_layers(layers, (x,), y, torch.nn.functional.mse_loss, repeats=1, warmup=0)
    assert plain.slowdown is None


def test_a_traced_split_refuses_to_measure_the_slowdown() -> None:
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="manual split's layers only"):
        profile_model(lambda: torch.nn.Linear(4, 4), x, x, torch.nn.functional.mse_loss, split="traced", slowdown=True)

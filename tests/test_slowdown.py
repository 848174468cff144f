"""The slowdown of compute in a pipeline's rank, measured with a spawned partner over a gloo group of its own."""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conveyor.observe.profile import profile_layers
from conveyor.observe.slowdown import measure_pipeline_slowdown
from conveyor.plan.layers import profile_model


def _matmuls() -> None:
    work = torch.randn(96, 96)
    for _ in range(20):
        work @ work


def _partner_works(marker: str) -> list[Callable[[], None]]:
    """The partner's work: matmuls that leave `marker` behind, so the test sees the partner ran them."""

    def work() -> None:
        Path(marker).touch()
        _matmuls()

    return [work]


def _sleep() -> None:
    time.sleep(0.004)


def _spin(seconds: float = 0.01) -> None:
    end = time.thread_time() + seconds  # this thread's own CPU time: a shared core stretches its wall time
    while time.thread_time() < end:
        pass


def _spinning_partner() -> list[Callable[[], None]]:
    return [functools.partial(_spin, 0.002)]


@pytest.mark.timeout(120)
def test_the_slowdown_is_measured_with_a_partner_computing_its_own_work_and_the_partner_ends(tmp_path: Path) -> None:
    calls = [0]

    def layer() -> None:
        calls[0] += 1
        _sleep()  # a wait no other process slows down: the factor must come out 1

    marker = tmp_path / "partner computed"
    partner = functools.partial(_partner_works, str(marker))
    factor = measure_pipeline_slowdown([layer, layer], 4096, partner, rounds=4, timeout_s=60)
    assert 0.85 < factor < 1.15, factor
    # Two works in each round of a pair, warm-up pairs included.
    assert calls[0] >= 2 * 2 * (4 + 2)
    assert marker.exists()
    assert not [p for p in torch.multiprocessing.active_children() if p.is_alive()]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pins both processes to one core (Linux)")
@pytest.mark.timeout(120)
def test_a_partner_on_the_same_core_makes_the_work_about_twice_as_slow() -> None:
    """Work and partner pinned to one core: after each exchange they share it, so the work's wall time grows in
    a pipeline round and not in an alone round (the partner then waits for a message). It would double were
    the partner to compute all along; it computes only about as long as the work last took."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})  # the spawned partner inherits it
    try:
        factor = measure_pipeline_slowdown([_spin, _spin], 4096, _spinning_partner, rounds=6, timeout_s=60)
    finally:
        os.sched_setaffinity(0, before)
    assert 1.2 < factor < 2.8, factor


@pytest.mark.timeout(120)
def test_a_failing_work_raises_and_leaves_no_partner_behind(tmp_path: Path) -> None:
    def broken() -> None:
        raise RuntimeError("layer 3 failed")

    partner = functools.partial(_partner_works, str(tmp_path / "marker"))
    with pytest.raises(RuntimeError, match="layer 3 failed"):
        measure_pipeline_slowdown([broken], 4096, partner, rounds=2, timeout_s=60)
    assert not [p for p in torch.multiprocessing.active_children() if p.is_alive()]


def test_no_work_is_an_error() -> None:
    with pytest.raises(ValueError, match="no work"):
        measure_pipeline_slowdown([], 4096, functools.partial(_partner_works, "unused"))


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


def test_a_loss_the_partner_cannot_receive_is_named_before_the_profile_runs() -> None:
    layers = [torch.nn.Linear(4, 4)]
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="cannot be pickled.*lambda"):
        profile_layers(layers, (x,), x, lambda out, y: (out - y).pow(2).mean(), slowdown=True)

"""Ranks that disagree, wait in vain, or end early: each a clear error on real ranks, never a hang."""

from __future__ import annotations

import random
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from conveyor import Pipeline, PipelineSpec, manual_split, spawn


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))


def _pipeline(timeout_s: float = 3.0, **settings: object) -> Pipeline:
    options: dict = {"schedule": "1f1b", "ranks": 2, "microbatches": 2} | settings  # type: ignore[type-arg]
    return Pipeline(manual_split(_model(), 2), PipelineSpec(**options), loss_fn=F.mse_loss, timeout_s=timeout_s)


def _disagree(rank: int, world: int) -> None:
    with pytest.raises(ValueError) as caught:
        _pipeline(microbatches=8 if rank == 0 else 4, schedule="gpipe" if rank == 0 else "1f1b")
    message = str(caught.value)  # the same on every rank: each setting that differs, with every rank's value
    assert "microbatches: rank 0 has 8, rank 1 has 4" in message, message
    assert "schedule: rank 0 has 'gpipe', rank 1 has '1f1b'" in message, message
    assert "\n  ranks:" not in message, message


@pytest.mark.timeout(60)
def test_ranks_built_with_different_settings_all_raise_naming_each_value() -> None:
    spawn(_disagree, 2, timeout_s=40)


def _one_sided_loss(rank: int, world: int) -> None:
    pipe = _pipeline()
    x = torch.randn(4, 2)
    pipe.step(x, x, loss_on_all_ranks=rank == 0)


@pytest.mark.timeout(60)
def test_a_one_sided_loss_on_all_ranks_fails_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 was called with loss_on_all_ranks=False while rank 0"):
        spawn(_one_sided_loss, 2, timeout_s=40)
    assert time.monotonic() - start < 30


def _extra_step(rank: int, world: int) -> None:
    pipe = _pipeline()
    x = torch.randn(4, 2)
    pipe.step(x, x)
    if rank == 0:
        pipe.step(x, x)  # rank 1 does not come: a bounded wait names it
    else:
        time.sleep(20)


@pytest.mark.timeout(60)
def test_a_wait_for_a_rank_that_does_not_come_is_bounded_and_names_it() -> None:
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException) as caught:
        spawn(_extra_step, 2, timeout_s=40)
    message = str(caught.value)
    assert "TimeoutError: rank 0: the message from rank 1 over ('grad', 0, 1) did not arrive within 3 s" in message
    assert "[gradients of edge 0->1, micro-batch 0]" in message, message
    assert time.monotonic() - start < 20, "the wait outlasted its timeout"


def _peer_returns(rank: int, world: int) -> None:
    pipe = _pipeline(timeout_s=30.0)
    x = torch.randn(4, 2)
    pipe.step(x, x)
    if rank == 1:
        return  # ends cleanly; rank 0 waits for a header it will never get
    time.sleep(1)
    pipe.step(x, x)


@pytest.mark.timeout(60)
def test_a_peer_that_ended_is_named_as_the_one_that_ended() -> None:
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)) as caught:
        spawn(_peer_returns, 2, timeout_s=40)
    message = str(caught.value)
    assert "ConnectionError: rank 0: could not send to rank 1 over ('act', 0, 1): that rank ended" in message, message


# A setting, the value most ranks use, and the one a random rank uses instead.
DISAGREEMENTS = [
    ("microbatches", 4, 2),
    ("schedule", "1f1b", "gpipe"),
    ("schedule", "1f1b", "pipedream"),
    ("recompute", "none", "full"),
    ("precision", "fp32", "bf16"),
    ("vertical_sync", False, True),
    ("weight_stashing", True, False),
]


def _random_disagreement(rank: int, world: int, setting: str, usual: object, odd: object, odd_rank: int) -> None:
    value = odd if rank == odd_rank else usual
    options: dict = {"schedule": "pipedream"} if setting in ("vertical_sync", "weight_stashing") else {}  # type: ignore[type-arg]
    options[setting] = value
    spec = PipelineSpec(**({"schedule": "1f1b", "ranks": 2, "microbatches": 4} | options))
    with pytest.raises(ValueError) as caught:
        Pipeline(manual_split(nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)]), 2), spec, loss_fn=F.mse_loss)
    each = ", ".join(f"rank {r} has {odd if r == odd_rank else usual!r}" for r in range(world))
    assert f"{setting}: {each}" in str(caught.value), str(caught.value)


@pytest.mark.timeout(240)
def test_ranks_that_disagree_on_a_random_setting_all_raise() -> None:
    rng = random.Random(7)
    for setting, usual, odd in rng.sample(DISAGREEMENTS, len(DISAGREEMENTS)):  # each, the odd rank at random
        start = time.monotonic()
        spawn(_random_disagreement, 2, (setting, usual, odd, rng.randrange(2)), timeout_s=40)
        assert time.monotonic() - start < 25, f"{setting}: the ranks took too long to refuse"

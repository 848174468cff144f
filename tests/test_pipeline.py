"""Pipeline on a single-rank process group, in the test process: construction errors and one-stage steps."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tiny_models import assert_close, assert_grads_match, mlp, mlp_batch

from conveyor import Pipeline, PipelineSpec


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def make(modules: object = None, schedule: str = "1f1b", microbatches: int = 3, virtual: int = 0) -> Pipeline:
    spec = PipelineSpec(schedule, ranks=1, microbatches=microbatches, virtual=virtual)
    return Pipeline(mlp() if modules is None else modules, spec, loss_fn=F.mse_loss)  # type: ignore[arg-type]


def test_needs_an_initialized_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialized"):
        make()


def test_the_schedule_must_fit_the_process_group(one_rank: None) -> None:
    with pytest.raises(ValueError, match="gpipe runs 1 stages? per rank; got 2"):
        make(schedule="gpipe", virtual=2)
    with pytest.raises(ValueError, match="interleaved-1f1b runs at least 2 stages per rank; got 1"):
        make(schedule="interleaved-1f1b", virtual=1)


def test_unknown_schedule(one_rank: None) -> None:
    with pytest.raises(ValueError, match="unknown schedule 'zb'"):
        make(schedule="zb")


def test_modules_for_the_wrong_stages(one_rank: None) -> None:
    with pytest.raises(ValueError, match=r"rank 0 runs stages \[0\] of '1f1b'; got modules for \[1\]"):
        make(modules={1: mlp()})


def test_step_needs_inputs_and_targets_where_their_stages_live(one_rank: None) -> None:
    x, y = mlp_batch(6)
    pipe = make()
    with pytest.raises(ValueError, match="rank 0 runs the first stage: step\\(\\) needs the inputs"):
        pipe.step(None, y)
    with pytest.raises(ValueError, match="rank 0 runs the last stage: step\\(\\) needs the targets"):
        pipe.step(x, None)


def test_a_batch_smaller_than_the_microbatch_count(one_rank: None) -> None:
    x, y = mlp_batch(2)
    with pytest.raises(ValueError, match="cannot split a batch of 2 samples into 3 micro-batches"):
        make().step(x, y)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_one_stage_step_matches_the_reference(one_rank: None, schedule: str) -> None:
    model = mlp()
    reference = copy.deepcopy(model)
    x, y = mlp_batch(10)
    expected = F.mse_loss(reference(x), y)
    expected.backward()
    pipe = make(modules=model, microbatches=4, schedule=schedule)
    loss = pipe.step(x, y, loss_on_all_ranks=True)
    assert loss is not None
    assert_close(loss, expected, "loss")
    assert_grads_match(pipe.named_parameters(), reference, schedule)
    assert [n for n, _ in pipe.named_parameters()] == [n for n, _ in reference.named_parameters()]
    pipe.zero_grad()
    assert all(p.grad is None for p in pipe.parameters())
    assert torch.equal(x, mlp_batch(10)[0]), "step must not modify the caller's batch"

"""Pipeline x data parallelism on real ranks: pp=2 x dp=2 from a DeviceMesh, and a replicated last stage.

Every stage replicated over dp ranks is D pipelines that each run every D-th
micro-batch of the global mini-batch and all-reduce their gradients before
the step. It must equal the same model on one process for the same global
batch: the loss of every step and the weights after them (<= 1e-5 relative
in fp32; the sums run in another order), with Adam and global-norm clipping
too. The replicas of each stage end with the same bits.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_pipedream_distributed import build
from tiny_models import relative_error
from torch.distributed.device_mesh import init_device_mesh

from conveyor import Pipeline, PipelineSpec, manual_split, spawn

STEPS, LR, CLIP = 3, 0.05, 0.5


def _reference(x: torch.Tensor, y: torch.Tensor, clip: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        losses.append(loss.item())
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def _check(pipe: Pipeline, x: torch.Tensor, y: torch.Tensor, clip: bool, where: str) -> dict[str, torch.Tensor]:
    """Train STEPS steps and compare with one process; returns the reference's final weights."""
    expected, final = _reference(x, y, clip)
    for step in range(STEPS):
        loss = pipe.step(x, y, loss_on_all_ranks=True, max_grad_norm=CLIP if clip else None)
        assert loss is not None
        assert abs(loss.item() - expected[step]) <= 1e-5 * abs(expected[step]), (
            f"{where}: step {step} loss {loss.item()} != {expected[step]}"
        )
    mine = {name: param.detach().clone() for name, param in pipe.named_parameters()}
    for name, value in mine.items():
        error = relative_error(value, final[name])
        assert error <= 1e-5, f"{where}: {name} differs by {error:.1e} after {STEPS} steps"
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    for other, theirs in enumerate(gathered):
        for name, value in theirs.items():
            if name in mine:
                assert torch.equal(value, mine[name]), f"{where}: rank {other} holds other bits of {name}"
    return final


def _pp_by_dp(rank: int, world: int) -> None:
    torch.manual_seed(5)
    x, y = torch.randn(10, 4), torch.randn(10, 2)  # 10 rows: unequal micro-batches
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    # m = 3: the replicas run 2 and 1 micro-batches, and the clipping's norm counts each stage once.
    for schedule, m, clip in (("gpipe", 4, False), ("1f1b", 3, True)):
        where = f"pp=2 x dp=2, {schedule}, m={m}, clip={clip}, rank {rank}"
        pipe = Pipeline(
            manual_split(build(), 2),
            PipelineSpec(schedule, world, m, dp=2),
            loss_fn=F.mse_loss,
            group=mesh,
            optimizer=lambda params: torch.optim.Adam(params, lr=LR),
        )
        assert sorted(pipe.stages) == [rank // 2], f"{where}: stages {sorted(pipe.stages)}"
        assert pipe.last_ranks == (2, 3)
        trained = build()
        trained.load_state_dict(_check(pipe, x, y, clip, where))
        with torch.no_grad():
            wanted = F.mse_loss(trained(x), y)
        evaluated = pipe.evaluate(x, y)  # the replicas of the last stage add up their parts, as step does
        if rank >= 2:
            assert evaluated is not None and relative_error(evaluated, wanted) <= 1e-5, f"{where}: evaluate"
            with pytest.raises(ValueError, match=r"the last stage is replicated on ranks \[2, 3\]"):
                pipe.predict(x)
        pipe.close()


@pytest.mark.timeout(300)
def test_pipeline_by_data_parallel_equals_one_process() -> None:
    spawn(_pp_by_dp, 4, timeout_s=280)


def _replicated_last(rank: int, world: int) -> None:
    torch.manual_seed(5)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    where = f"replicas (1, 2), 1f1b, rank {rank}"
    pipe = Pipeline(
        manual_split(build(), 2),
        PipelineSpec("1f1b", world, 4, replicas=(1, 2)),
        loss_fn=F.mse_loss,
        optimizer=lambda params: torch.optim.Adam(params, lr=LR),
    )
    _check(pipe, x, y, False, where)
    pipe.close()


@pytest.mark.timeout(200)
def test_a_replicated_last_stage_adds_up_its_replicas_losses() -> None:
    spawn(_replicated_last, 3, timeout_s=180)


def _bad_meshes(rank: int, world: int) -> None:
    split = manual_split(build(), 2)
    with pytest.raises(ValueError, match=r"needs two dimensions named \('pp', 'dp'\)"):
        Pipeline(split, PipelineSpec("1f1b", world, 4, dp=2), loss_fn=F.mse_loss, group=init_device_mesh("cpu", (2, 2)))
    mesh = init_device_mesh("cpu", (4, 1), mesh_dim_names=("pp", "dp"))
    with pytest.raises(ValueError, match=r"the mesh has 4 pipeline ranks \(pp\) for 2 stages"):
        Pipeline(split, PipelineSpec("1f1b", world, 4, dp=2), loss_fn=F.mse_loss, group=mesh)


@pytest.mark.timeout(120)
def test_bad_meshes_are_clear_errors() -> None:
    spawn(_bad_meshes, 4, timeout_s=100)

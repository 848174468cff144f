"""1F1B-RR on real ranks: the first stage replicated over ranks 0 and 1, the second on rank 2.

Synchronous schedules must equal the same model on one process (losses of
every step and the weights after them, <= 1e-5 relative in fp32); the
asynchronous ones the single-process simulation of their update rule
(`simulate` in test_pipedream_distributed.py, where a replicated stage steps
after one micro-batch per replica with their mean gradient). Both replicas
end with the same bits.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_pipedream_distributed import BATCHES, OPTIMIZERS, Recording, batches, build, simulate
from tiny_models import relative_error

from conveyor import Pipeline, manual_split, spawn
from conveyor.schedules import PipelineSpec, build_schedule, versions_held

REPLICAS = (2, 1)
STEPS, LR = 3, 0.1


def _equal_on_replicas(pipe: Pipeline, where: str) -> None:
    """The replicas of stage 0 (ranks 0 and 1) hold the same bits."""
    mine = {name: p.detach().clone() for name, p in pipe.named_parameters()} if 0 in pipe.stages else {}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    for name, value in gathered[0].items():
        assert torch.equal(value, gathered[1][name]), f"{where}: replicas differ in {name}"


def _synchronous(rank: int, world: int) -> None:
    torch.manual_seed(5)
    x, y = torch.randn(10, 4), torch.randn(10, 2)  # 10 rows: micro-batches of unequal size for m = 3 and 4
    reference = build()
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    expected = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = F.mse_loss(reference(x), y)
        loss.backward()
        optimizer.step()
        expected.append(loss.item())
    final = dict(reference.named_parameters())
    for schedule in ("gpipe", "1f1b"):
        for m in (3, 4):  # 3: the replicas run 2 and 1 micro-batches
            for recompute in ("none", "full"):
                where = f"{schedule}, m={m}, recompute={recompute}, rank {rank}"
                pipe = Pipeline(
                    manual_split(build(), 2),
                    PipelineSpec(schedule, world, m, replicas=REPLICAS, recompute=recompute),
                    loss_fn=F.mse_loss,
                    optimizer=lambda params: torch.optim.SGD(params, lr=LR),
                )
                assert sorted(pipe.stages) == ([0] if rank < 2 else [1]), f"{where}: stages {sorted(pipe.stages)}"
                for step in range(STEPS):
                    loss = pipe.step(x, y, loss_on_all_ranks=True)
                    assert loss is not None
                    assert abs(loss.item() - expected[step]) <= 1e-5 * abs(expected[step]), (
                        f"{where}: step {step} loss {loss.item()} != {expected[step]}"
                    )
                for name, param in pipe.named_parameters():
                    error = relative_error(param.detach(), final[name].detach())
                    assert error <= 1e-5, f"{where}: {name} differs by {error:.1e} after {STEPS} steps"
                _equal_on_replicas(pipe, where)
                # Evaluation runs the same placement, forwards only.
                with torch.no_grad():
                    wanted = F.mse_loss(reference(x), y)
                evaluated = pipe.evaluate(x, y, loss_on_all_ranks=True)
                assert evaluated is not None and relative_error(evaluated, wanted) <= 1e-5, f"{where}: evaluate"
                pipe.close()


@pytest.mark.timeout(200)
def test_synchronous_replicated_stage_trains_like_one_process() -> None:
    spawn(_synchronous, 3, timeout_s=180)


def _asynchronous(rank: int, world: int) -> None:
    for schedule, optimizer in (("pipedream", "sgd"), ("pipedream-2bw", "sgd"), ("pipedream-2bw", "adam")):
        where = f"{schedule} with {optimizer}, rank {rank}"
        m = 4  # pipedream: every mini-batch a multiple of the 2 replicas, which step together
        program = build_schedule(PipelineSpec(schedule, 3, m, replicas=REPLICAS), mini_batches=BATCHES)
        log: list[list[torch.Tensor]] = []
        pipe = Pipeline(
            manual_split(build(), 2),
            PipelineSpec(schedule, world, m, replicas=REPLICAS),
            loss_fn=F.mse_loss,
            optimizer=lambda params, optimizer=optimizer, log=log: Recording(OPTIMIZERS[optimizer](params), log),
        )
        losses = list(pipe.stream(batches(m), BATCHES))
        stages, logs = simulate(program, optimizer, m)
        stage = 0 if rank < 2 else 1
        if rank == 2:
            assert [k for k, _ in losses] == list(range(m * BATCHES)), f"{where}: losses out of order"
        assert len(log) == len(logs[stage]), f"{where}: {len(log)} steps, the simulation took {len(logs[stage])}"
        for step, (grads, expected) in enumerate(zip(log, logs[stage], strict=True)):
            for grad, want in zip(grads, expected, strict=True):
                assert relative_error(grad, want) <= 1e-5, f"{where}: gradient of step {step}"
        wanted = dict(stages[stage].named_parameters())
        for name, param in pipe.stages[stage].module.named_parameters():
            assert relative_error(param.detach(), wanted[name].detach()) <= 1e-5, f"{where}: {name} at the end"
        versions = pipe.stages[stage].versions
        assert versions is not None
        for k, (forward, backward) in versions.used.items():
            assert forward == backward == program.weight_versions[(stage, k)], f"{where}: micro-batch {k}"
        # A replica keeps only the versions its own micro-batches need: what the program predicts.
        assert sorted(versions.used) == [k for k in range(m * BATCHES) if program.rank_of(stage, k) == rank]
        assert versions.peak_versions == versions_held(program)[stage], f"{where}: {versions.peak_versions} held"
        _equal_on_replicas(pipe, where)
        pipe.close()


@pytest.mark.timeout(200)
def test_asynchronous_replicated_stage_matches_the_simulation() -> None:
    spawn(_asynchronous, 3, timeout_s=180)


def _bad_configurations(rank: int, world: int) -> None:
    def pipeline(schedule: str = "1f1b", m: int = 4, replicas: tuple[int, ...] = REPLICAS, ranks: int = world) -> Any:
        return Pipeline(
            manual_split(build(), 2), PipelineSpec(schedule, ranks, m, replicas=replicas), loss_fn=F.mse_loss
        )

    with pytest.raises(ValueError, match="does not replicate stages; the schedules that do: gpipe, 1f1b"):
        pipeline(schedule="zb-h1")
    with pytest.raises(ValueError, match="under pipedream conveyor does not replicate the last stage"):
        pipeline(replicas=(1, 2), schedule="pipedream")
    with pytest.raises(ValueError, match="replicas=2,2 holds 4 ranks: use ranks=4"):
        pipeline(replicas=(2, 2))
    with pytest.raises(ValueError, match="the spec is for 4 ranks; the process group has 3"):
        pipeline(replicas=(2, 2), ranks=4)
    with pytest.raises(ValueError, match="must be a multiple of 2; got 3"):
        pipeline(schedule="pipedream", m=3)
    # Replicas that start from different weights would train apart: refused, naming the other rank.
    model = build()
    if rank == 1:
        with torch.no_grad():
            model[0].bias[0] += 1e-6
    split = manual_split(model, 2)
    expected = "stage 0's weights differ between rank 0 and rank\\(s\\) \\[1\\]" if rank == 0 else "differ"
    if rank < 2:
        with pytest.raises(ValueError, match=expected):
            Pipeline(split, PipelineSpec("1f1b", world, 4, replicas=REPLICAS), loss_fn=F.mse_loss)
    else:
        Pipeline(split, PipelineSpec("1f1b", world, 4, replicas=REPLICAS), loss_fn=F.mse_loss)


@pytest.mark.timeout(120)
def test_bad_replica_configurations_are_clear_errors() -> None:
    spawn(_bad_configurations, 3, timeout_s=100)

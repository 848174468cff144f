"""Every schedule on real ranks (gloo, spawned processes): same training as one process, and the memory theory says.

One spawn per rank count; each rank loops over schedules, recompute options
and micro-batch counts, and checks its own stages against a reference model it
trains itself (relative error <= 1e-5 in fp32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conveyor import Pipeline, spawn
from conveyor.schedules import SCHEDULES, PipelineSpec

STEPS = 3
LR = 0.1


def build(num_layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for index in range(num_layers):
        layers += [nn.Linear(8, 8), nn.Tanh()] if index < num_layers - 1 else [nn.Linear(8, 4)]
    return nn.Sequential(*layers)


def micro_batch_counts(name: str, ranks: int) -> list[int]:
    """Two counts each schedule accepts, one of them small."""
    if name == "interleaved-1f1b":
        return [ranks, 2 * ranks]
    if name in ("zbv", "dualpipev"):
        return [2 * ranks, 3 * ranks]
    return [3, 2 * ranks]


def reference_trajectory(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, steps: int = STEPS) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_trains_like_one_process(
    pipe: Pipeline,
    x: torch.Tensor,
    y: torch.Tensor,
    expected: list[float],
    final: dict[str, torch.Tensor],
    case: str,
) -> None:
    """One step of `pipe` per loss in `expected`: each loss, then every parameter, within 1e-5 of one process's."""
    for step in range(len(expected)):
        loss = pipe.step(x, y, loss_on_all_ranks=True)
        assert loss is not None
        assert abs(loss.item() - expected[step]) <= 1e-5 * abs(expected[step]), (
            f"{case}: step {step} loss {loss.item()} != {expected[step]}"
        )
    for param_name, param in pipe.named_parameters():
        error = ((param - final[param_name]).norm() / final[param_name].norm()).item()
        assert error <= 1e-5, f"{case}: parameter {param_name} differs by {error:.2e} after {len(expected)} steps"


def _train_every_schedule(rank: int, world: int) -> None:
    x = torch.randn(13, 8, generator=torch.Generator().manual_seed(1))  # 13: not a multiple of any m used
    y = torch.randn(13, 4, generator=torch.Generator().manual_seed(2))
    for name, info in SCHEDULES.items():
        if info.asynchronous:  # one flushed step is not what they run: tests/test_pipedream_distributed.py
            continue
        stages = world * info.default_virtual
        reference = build(stages)
        expected = reference_trajectory(reference, x, y)
        final = dict(reference.named_parameters())
        for recompute in ("none", "full"):
            for m in micro_batch_counts(name, world):
                pipe = Pipeline.from_model(
                    build(stages),
                    PipelineSpec(name, world, m, recompute=recompute),
                    loss_fn=F.mse_loss,
                    optimizer=lambda params: torch.optim.SGD(params, lr=LR),
                )
                case = f"{name}, {world} ranks, m={m}, recompute={recompute}"
                assert_trains_like_one_process(pipe, x, y, expected, final, case)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [2, 4])
def test_every_schedule_trains_like_one_process(world: int) -> None:
    spawn(_train_every_schedule, world, timeout_s=380)


def _peak_micro_batches(rank: int, world: int, name: str, m: int, recompute: str, out: dict) -> None:  # type: ignore[type-arg]
    """Peak bytes held for backward on this rank, in units of one micro-batch of its stage."""
    stages = world * SCHEDULES[name].default_virtual
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)) for _ in range(stages)])
    pipe = Pipeline.from_model(
        model, PipelineSpec(name, world, m, recompute=recompute), loss_fn=lambda o, t: o.pow(2).mean()
    )
    pipe.track_memory = True
    x = torch.randn(8 * m, 32)
    pipe.step(x, x)
    per_stage = {}
    for index, stage in pipe.stages.items():
        # One micro-batch alone, on a fresh stage that counts the same way.
        probe = type(stage)(
            stage.module, index, stage.num_stages, stage.loss_fn, recompute=stage.recompute, track_memory=True
        )
        inputs = torch.randn(8, 32, requires_grad=index > 0)
        probe.forward(0, inputs if index == 0 else [inputs], torch.zeros(8, 32))
        per_stage[index] = probe.held_bytes
    peak = sum(s.peak_held_bytes for s in pipe.stages.values())
    torch.save({"micro-batches": peak / (sum(per_stage.values()) / len(per_stage)), "bytes": peak}, out[rank])


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "name, m, recompute, theory",
    [
        ("1f1b", 8, "none", lambda p, m, r: min(p - r, m)),  # rank r: p - r micro-batches
        ("gpipe", 8, "none", lambda p, m, r: m),
        ("zb-h2", 8, "none", lambda p, m, r: 2 * p - 1),
        ("zb-h1", 8, "none", lambda p, m, r: p),  # 1F1B's p - r, and r whose W waits
        ("gpipe", 8, "full", lambda p, m, r: m),  # in units of what a recomputed micro-batch keeps: its inputs
    ],
)
def test_peak_memory_matches_the_schedule(tmp_path, name, m, recompute, theory) -> None:  # type: ignore[no-untyped-def]
    world = 2
    out = {rank: str(tmp_path / f"rank{rank}.pt") for rank in range(world)}
    spawn(_peak_micro_batches, world, (name, m, recompute, out), timeout_s=100)
    for rank in range(world):
        held = torch.load(out[rank])["micro-batches"]
        assert held == pytest.approx(theory(world, m, rank), rel=0.10), (
            f"{name}: rank {rank} held {held:.2f} micro-batches, the schedule {theory(world, m, rank)}"
        )


@pytest.mark.timeout(120)
def test_recompute_keeps_far_less_than_gpipe(tmp_path) -> None:  # type: ignore[no-untyped-def]
    held = {}
    for recompute in ("none", "full"):
        out = {rank: str(tmp_path / f"{recompute}{rank}.pt") for rank in range(2)}
        spawn(_peak_micro_batches, 2, ("gpipe", 8, recompute, out), timeout_s=100)
        held[recompute] = torch.load(out[0])["bytes"]
    # Without recompute a block keeps its input, its 4x wider hidden and GELU activations, and its output.
    assert held["full"] < held["none"] / 3, held

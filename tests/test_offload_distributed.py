"""Activation offload on real ranks (gloo, spawned processes): the same training as one process.

Each rank checks its own stages against a reference model it trains itself (relative error <= 1e-5 in
fp32, as tests/test_schedules_distributed.py); the offload copies are bitwise, so any difference would come
from the pipeline, not from the offload.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_schedules_distributed import LR, assert_trains_like_one_process, build, reference_trajectory

from conveyor import Pipeline, spawn
from conveyor.schedules import SCHEDULES, Kind, PipelineSpec

STEPS = 2
# (schedule, micro-batches per rank, recompute, offload). 1F1B offloads on 4 ranks only: on 2 its micro-batches
# have at most 2 computes between forward and backward (schedules/offload.py wants 3).
CASES = [
    ("gpipe", 2, "none", "all"),
    ("v-half", 2, "none", "all"),
    ("v-min", 3, "none", "all"),
    ("zbv", 2, "none", "all"),
    ("gpipe", 2, "all-but-last-stage", "last"),
]


def _one_process(stages: int, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The losses of STEPS steps of the unsplit model, and its parameters after them."""
    model = build(stages)
    losses = reference_trajectory(model, x, y, STEPS)
    return losses, {name: param.detach() for name, param in model.named_parameters()}


def _train_with_offload(rank: int, world: int) -> None:
    x = torch.randn(13, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(13, 4, generator=torch.Generator().manual_seed(2))
    for name, per_rank, recompute, offload in CASES + ([("1f1b", 2, "none", "all")] if world == 4 else []):
        stages = world * SCHEDULES[name].default_virtual
        expected, final = _one_process(stages, x, y)
        chosen = str(stages - 1) if offload == "last" else offload
        spec = PipelineSpec(name, world, per_rank * world, recompute=recompute, offload=chosen)
        pipe = Pipeline.from_model(
            build(stages), spec, loss_fn=F.mse_loss, optimizer=lambda params: torch.optim.SGD(params, lr=LR)
        )
        case = f"{name}, {world} ranks, recompute={recompute}, offload={offload}"
        kinds = {a.kind for acts in pipe.program.actions.values() for a in acts}
        assert {Kind.OFFLOAD, Kind.RELOAD} <= kinds, f"{case}: the program offloads nothing"
        assert_trains_like_one_process(pipe, x, y, expected, final, case)
        pipe.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_offload_trains_like_one_process(world: int) -> None:
    spawn(_train_with_offload, world, timeout_s=280)

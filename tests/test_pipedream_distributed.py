"""PipeDream on real ranks: weight stashing, vertical sync and 2BW against a single-process simulation.

The simulation runs the stream one micro-batch at a time in one process: each
stage keeps every weight version it made, micro-batch k's forward and backward
on stage s use version `weight_versions[(s, k)]` (what stashing promises), and
a stage steps after each of its `microbatches_per_step` micro-batches with the
gradients of those. Each rank checks its stage against it: the gradient every
step applied, and the weights at the end (relative error <= 1e-5 in fp32).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tiny_models import relative_error
from torch import nn

from conveyor import Pipeline, manual_split, spawn
from conveyor.schedules import PipelineSpec, Program, build_schedule, step_group, versions_held

RANKS, M, BATCHES, LR = 3, 3, 4, 0.1


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def batches(m: int = M) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """BATCHES mini-batches of m micro-batches of 2 samples."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2 * m, 4, generator=g), torch.randn(2 * m, 2, generator=g)) for _ in range(BATCHES)]


class Recording(torch.optim.Optimizer):
    """Wraps an optimizer and writes down the gradient of each of its steps."""

    def __init__(self, inner: torch.optim.Optimizer, log: list[list[torch.Tensor]]) -> None:
        self.inner, self.log = inner, log
        self.param_groups = inner.param_groups
        self.state = inner.state
        self.defaults = inner.defaults

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.log.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)


RATES = {"sgd": LR, "adam": 0.01}
OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=RATES["sgd"]),
    "adam": lambda params: torch.optim.Adam(params, lr=RATES["adam"]),
}


def warm_up(optimizer: str) -> Callable[[int], float]:
    """A learning rate rising over the stream's mini-batches, so a rate taken from the wrong one shows."""
    return lambda i: RATES[optimizer] * (i + 1) / BATCHES


def simulate(
    program: Program, optimizer: str, m: int = M, lr: Callable[[int], float] | None = None
) -> tuple[list[nn.Module], list[list[list[torch.Tensor]]]]:
    """The stream on one process with stashed weights: each stage's final module and the gradient of each step.

    Stage s steps after each group of `step_group(program, s)` micro-batches with their mean gradient
    (one micro-batch's under pipedream, one per replica of a replicated stage, a mini-batch's under 2BW),
    at the rate `lr` gives the mini-batch of the group's last micro-batch, if given.
    """
    num_stages = program.num_stages
    split = manual_split(build(), num_stages)
    stages = [split.build_stage(s) for s in range(num_stages)]
    optimizers = [OPTIMIZERS[optimizer](stage.parameters()) for stage in stages]
    history = [[_copy(stage)] for stage in stages]
    logs: list[list[list[torch.Tensor]]] = [[] for _ in stages]
    versions, per = program.weight_versions or {}, program.microbatches_per_step or m
    groups = [step_group(program, s) for s in range(num_stages)]
    microbatches = [
        (x, y) for xs, ys in batches(m) for x, y in zip(xs.tensor_split(m), ys.tensor_split(m), strict=True)
    ]
    for k, (x, y) in enumerate(microbatches):
        used = [
            {n: t.clone().requires_grad_() for n, t in history[s][versions[(s, k)]].items()} for s in range(num_stages)
        ]
        h = x
        for s, stage in enumerate(stages):
            h = torch.func.functional_call(stage, used[s], (h,))
        (F.mse_loss(h, y) / per).backward()
        for s, stage in enumerate(stages):
            for name, param in stage.named_parameters():
                grad = used[s][name].grad * (per / groups[s])
                param.grad = grad if param.grad is None else param.grad + grad
            if (k + 1) % groups[s] == 0:
                logs[s].append([p.grad.clone() for p in stage.parameters()])
                if lr is not None:
                    for group in optimizers[s].param_groups:
                        group["lr"] = lr(k // m)
                optimizers[s].step()
                optimizers[s].zero_grad()
                history[s].append(_copy(stage))
    return stages, logs


def _copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in module.named_parameters()}


CASES = [  # schedule, vertical sync, optimizer, warm-up
    ("pipedream", False, "sgd", False),
    ("pipedream", True, "sgd", False),
    ("pipedream-2bw", False, "sgd", False),
    ("pipedream-2bw", False, "adam", False),
    ("pipedream", False, "adam", True),
    ("pipedream-2bw", False, "sgd", True),
]


def _against_the_simulation(rank: int, world: int) -> None:
    for schedule, vertical, optimizer, warming in CASES:
        where = f"{schedule}{' (vertical sync)' if vertical else ''} with {optimizer}{' warming up' if warming else ''}"
        where += f", rank {rank}"
        rate = warm_up(optimizer) if warming else None
        program = build_schedule(PipelineSpec(schedule, RANKS, M, vertical_sync=vertical), mini_batches=BATCHES)
        log: list[list[torch.Tensor]] = []
        pipe = Pipeline(
            manual_split(build(), RANKS),
            PipelineSpec(schedule, world, M, vertical_sync=vertical),
            loss_fn=F.mse_loss,
            optimizer=lambda params, optimizer=optimizer, log=log: Recording(OPTIMIZERS[optimizer](params), log),
        )
        losses = list(pipe.stream(batches(), BATCHES, lr=rate))
        stages, logs = simulate(program, optimizer, lr=rate)
        if rank == RANKS - 1:
            assert [k for k, _ in losses] == list(range(M * BATCHES)), f"{where}: losses out of order"
        else:
            assert losses == [], f"{where}: only the last stage's rank reports losses"
        # Every step applied the gradient of the stashed versions, and the weights end where they should.
        assert len(log) == len(logs[rank]), f"{where}: {len(log)} steps, the simulation took {len(logs[rank])}"
        for step, (grads, expected) in enumerate(zip(log, logs[rank], strict=True)):
            for grad, want in zip(grads, expected, strict=True):
                assert relative_error(grad, want) <= 1e-5, f"{where}: gradient of step {step}"
        wanted = dict(stages[rank].named_parameters())
        for name, param in pipe.stages[rank].module.named_parameters():
            assert relative_error(param.detach(), wanted[name].detach()) <= 1e-5, f"{where}: {name} at the end"
        # Forward and backward of every micro-batch used the same version, the one the program names.
        versions = pipe.stages[rank].versions
        assert versions is not None
        for k, (forward, backward) in versions.used.items():
            assert forward == backward == program.weight_versions[(rank, k)], f"{where}: micro-batch {k}"
        # The versions held at once are what the program predicts, within in-flight micro-batches + 1: those of
        # this stage, or with vertical sync those between the input stage's forward and this stage's backward.
        assert versions.peak_versions == versions_held(program)[rank], f"{where}: {versions.peak_versions} held"
        in_flight = RANKS if vertical else RANKS - rank
        assert versions.peak_versions <= in_flight + 1, f"{where}: {versions.peak_versions} versions held"
        if vertical:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, {k: f for k, (f, _) in versions.used.items()})
            assert all(g == gathered[0] for g in gathered), f"{where}: stages used different versions"
        pipe.close()


@pytest.mark.timeout(150)
def test_stashed_weights_match_the_single_process_simulation() -> None:
    spawn(_against_the_simulation, RANKS, timeout_s=120)


def _without_stashing(rank: int, world: int) -> None:
    program = build_schedule(PipelineSpec("pipedream", RANKS, M), mini_batches=BATCHES)
    log: list[list[torch.Tensor]] = []
    pipe = Pipeline(
        manual_split(build(), RANKS),
        PipelineSpec("pipedream", world, M, weight_stashing=False),
        loss_fn=F.mse_loss,
        optimizer=lambda params: Recording(OPTIMIZERS["sgd"](params), log),
    )
    for _ in pipe.stream(batches(), BATCHES):
        pass
    _, logs = simulate(program, "sgd")
    versions = pipe.stages[rank].versions
    assert versions is not None
    differ = [k for k, (forward, backward) in versions.used.items() if forward != backward]
    pairs = [(g, w) for grads, want in zip(log, logs[rank], strict=True) for g, w in zip(grads, want, strict=True)]
    worst = max(relative_error(g, w) for g, w in pairs)
    if rank < RANKS - 1:  # the last stage steps right after each backward: nothing to stash there
        assert differ, f"rank {rank}: without stashing, some backward must run on other weights than its forward"
        assert worst > 1e-3, f"rank {rank}: without stashing the gradients should differ (worst {worst:.1e})"
    else:  # (its gradients drift all the same: the stages before it train on other gradients)
        assert not differ, f"rank {rank}: the last stage steps right after each backward, so needs no stash"
    pipe.close()


@pytest.mark.timeout(120)
def test_without_stashing_versions_and_gradients_differ() -> None:
    spawn(_without_stashing, RANKS, timeout_s=100)

"""Clipping by the global gradient norm over every stage equals torch's clipping of the unsplit model.

A tied embedding/head pair (on two ranks) and a replicated stage each count once. Losses of every step,
the norm before clipping and the final weights: <= 1e-5 relative (fp32, CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import relative_error
from torch import nn

from conveyor import Pipeline, PipelineSpec, manual_split, spawn

STEPS, LR, MAX_NORM = 3, 0.5, 0.05


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x  # a stage of the manual split holds some modules
        for block in self.blocks:
            h = block(h)
        return self.head(h) if self.head is not None else h


def tied() -> Tied:
    torch.manual_seed(0)
    return Tied()


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, norms = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        losses.append(loss.item())
    return losses, norms


def _against_the_unsplit_model(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(3)
    if world == 2:  # the tie: embedding on rank 0, head on rank 1
        build, loss_fn, replicas = tied, _token_loss, None
        x, y = torch.randint(0, 16, (8, 5), generator=g), torch.randint(0, 16, (8, 5), generator=g)
    else:  # stage 0 replicated on ranks 0 and 1
        build, loss_fn, replicas = mlp, F.mse_loss, (2, 1)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    reference = build()
    losses, norms = _reference(reference, x, y, loss_fn)
    assert min(norms) > MAX_NORM, "the test must clip"
    pipe = Pipeline(
        manual_split(build(), 2),
        PipelineSpec("1f1b", world, 4, replicas=replicas),
        loss_fn=loss_fn,
        optimizer=lambda params: torch.optim.SGD(params, lr=LR),
    )
    where = f"{world} ranks, rank {rank}"
    for step in range(STEPS):
        loss = pipe.step(x, y, loss_on_all_ranks=True, max_grad_norm=MAX_NORM)
        assert loss is not None and abs(loss.item() - losses[step]) <= 1e-5 * losses[step], f"{where}: step {step}"
        norm = pipe.update.last_grad_norm
        assert norm is not None
        assert abs(float(norm) - norms[step]) <= 1e-5 * norms[step], f"{where}: norm of step {step}"
    final = dict(reference.named_parameters(remove_duplicate=False))  # the tie under both names
    for name, param in pipe.named_parameters():
        assert relative_error(param.detach(), final[name].detach()) <= 1e-5, f"{where}: {name}"
    pipe.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_global_norm_clipping_equals_the_unsplit_models(world: int) -> None:
    spawn(_against_the_unsplit_model, world, timeout_s=100)

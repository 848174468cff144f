"""Tiny models and reference checks shared by the tests (kept small: the CI machine has 2 cores)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, SEQ, BLOCKS = 13, 8, 5, 4


def mlp() -> nn.Sequential:
    """An nn.Sequential of 7 layers: split evenly into up to 4 stages, every stage has a Linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(SEQ, SEQ)  # mixes positions, so samples stay independent but positions do not
        self.ff = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.mix(self.norm(h).transpose(1, 2)).transpose(1, 2)
        return h + torch.tanh(self.ff(h))


class TinyTransformer(nn.Module):
    """Embedding, a ModuleList of blocks, norm and head; skips the modules a stage does not own."""

    def __init__(self, blocks: int = BLOCKS) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block(DIM) for _ in range(blocks))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor, offset: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        # Keyword inputs exist for the first stage only (later stages get the hidden state as `tokens`).
        if self.embed is not None:
            h = self.embed(tokens) * scale
            h = h + offset if offset is not None else h
        else:
            h = tokens
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h) if self.norm is not None else h
        return self.head(h) if self.head is not None else h


def transformer() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer()


class MaskedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ff = nn.Linear(DIM, DIM)

    def forward(self, h: torch.Tensor, keep: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.ff(h)) * keep.unsqueeze(-1) + 0.01 * position.unsqueeze(-1)


class TwoStream(nn.Module):
    """Stages pass three tensors on: the hidden state (with grad), a float mask and int64 positions (no grad)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(MaskedBlock() for _ in range(BLOCKS))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, position: torch.Tensor | None = None) -> Any:
        if self.embed is not None:
            keep = (x % 3 != 0).float()
            position = torch.arange(x.shape[1]).expand_as(x)
            x = self.embed(x)
        assert keep is not None and position is not None
        for layer in self.layers:
            x = layer(x, keep, position)
        return self.head(x) if self.head is not None else (x, keep, position)


def two_stream() -> TwoStream:
    torch.manual_seed(0)
    return TwoStream()


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def mlp_batch(size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 8, generator=g), torch.randn(size, 4, generator=g)


def token_batch(size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (size, SEQ), generator=g), torch.randint(0, VOCAB, (size, SEQ), generator=g)


# name -> (builder, batch maker, loss function)
MODELS = {
    "mlp": (mlp, mlp_batch, F.mse_loss),
    "transformer": (transformer, token_batch, token_loss),
}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm().clamp_min(1e-12)).item()


def assert_close(value: torch.Tensor, reference: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    error = relative_error(value.detach(), reference.detach())
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:.0e}"


def assert_grads_match(
    params: Iterable[tuple[str, nn.Parameter]], reference: nn.Module, where: str, tol: float = 1e-5, scale: float = 1.0
) -> list[str]:
    """Check every given parameter's gradient against `scale` times the reference model's; returns the names.

    A tied parameter may be given under any of its names (a stage holding GPT-2's LM head calls it lm_head.weight).
    """
    wanted = dict(reference.named_parameters(remove_duplicate=False))
    names = []
    for name, param in params:
        assert name in wanted, f"{where}: {name} is not a parameter of the full model"
        assert param.grad is not None, f"{where}: {name} got no gradient"
        assert_close(param.grad, scale * wanted[name].grad, f"{where}: gradient of {name}", tol)
        names.append(name)
    assert names, f"{where}: the stage has no parameters to check"
    return names


def assert_params_match(
    params: Iterable[tuple[str, nn.Parameter]], reference: nn.Module, where: str, tol: float
) -> None:
    wanted = dict(reference.named_parameters(remove_duplicate=False))
    for name, param in params:
        assert_close(param, wanted[name], f"{where}: parameter {name}", tol)

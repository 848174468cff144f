"""B (input gradient) then W (weight gradient) gives exactly the full backward's gradients, for ordinary modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conveyor.models import GPT, GPTConfig, lm_loss
from conveyor.runtime.stage import Stage
from conveyor.split import split_model


class TiedTwice(nn.Module):
    """Uses one weight at two places of the activation path: W cannot split it per join."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.tanh(self.linear(x)))


class ParameterOnlyOutput(nn.Module):
    """One output depends on the input, the other only on a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.offset = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), self.offset * 2


def _modules() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "mlp": nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.LayerNorm(12), nn.Dropout(0.2), nn.Linear(12, 6)),
        "tied": TiedTwice(),
        "parameter-only output": ParameterOnlyOutput(),
        "gpt middle stage": split_model(GPT(GPTConfig(dim=24, heads=2, layers=3, context=8, dropout=0.1)), 1, 3),
    }


def _full_and_split(module: nn.Module, recompute: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Input and parameter gradients from a full backward, then from B + W, same inputs and RNG."""
    x = torch.randn(4, 8, 24) if isinstance(module, GPT) else torch.randn(5, 6)
    results = []
    for split in (False, True):
        module.zero_grad(set_to_none=True)
        stage = Stage(module, 1, 3, recompute=recompute)
        leaf = x.clone().requires_grad_()
        torch.manual_seed(7)
        outputs = stage.forward(0, [leaf])
        grads = [torch.ones_like(t) * (i + 1) if t.requires_grad else None for i, t in enumerate(outputs)]
        input_grads = [g for g in stage.backward(0, grads, split=split) if g is not None]
        if split:
            assert all(p.grad is None for p in module.parameters()), "B must not compute weight gradients"
            stage.weight(0)
        results.append(input_grads + [p.grad.clone() for p in module.parameters()])
    return results[0], results[1]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("name", list(_modules()))
def test_b_then_w_equals_the_full_backward(name: str, recompute: bool) -> None:
    module = _modules()[name]
    full, split = _full_and_split(module, recompute)
    assert len(full) == len(split)
    for index, (a, b) in enumerate(zip(full, split, strict=True)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=f"{name}: gradient {index} differs")


def test_first_and_last_stage_split() -> None:
    torch.manual_seed(0)
    config = GPTConfig(dim=16, heads=2, layers=2, context=8)
    tokens = torch.randint(0, 256, (3, 9))
    for index in (0, 1):
        module = split_model(GPT(config), index, 2)
        hidden = torch.randn(3, 8, 16)
        outcomes = []
        for split in (False, True):
            module.zero_grad(set_to_none=True)
            stage = Stage(module, index, 2, lm_loss if index == 1 else None)
            inputs = tokens[:, :-1] if index == 0 else [hidden.clone().requires_grad_()]
            outputs = stage.forward(0, inputs, tokens[:, 1:])
            stage.backward(0, [torch.ones_like(t) for t in outputs], split=split)
            if split:
                stage.weight(0)
            outcomes.append([p.grad.clone() for p in module.parameters()])
        for a, b in zip(*outcomes, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_weight_before_its_split_backward_is_an_error() -> None:
    stage = Stage(nn.Linear(2, 2), 1, 3)
    with pytest.raises(RuntimeError, match="weight gradient of micro-batch 0 before its split backward"):
        stage.weight(0)


def test_memory_is_released_at_w_for_split_stages() -> None:
    stage = Stage(nn.Sequential(nn.Linear(6, 6), nn.Tanh()), 1, 3, track_memory=True)
    outputs = stage.forward(0, [torch.randn(4, 6, requires_grad=True)])
    held = stage.held_bytes
    assert held > 0
    stage.backward(0, [torch.ones_like(outputs[0])], split=True)
    assert stage.held_bytes == held, "between B and W the micro-batch is still held"
    stage.weight(0)
    assert stage.held_bytes == 0 and stage.peak_held_bytes == held


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("split", [False, True])
def test_recompute_replays_dropout(split: bool, device: str) -> None:
    """The recomputed forward draws the same dropout mask (from the CPU or the CUDA generator)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.GELU(), nn.Linear(32, 6)).to(device)
    x = torch.randn(5, 6, device=device)
    grads = []
    for recompute in (False, True):
        module.zero_grad(set_to_none=True)
        stage = Stage(module, 1, 3, recompute=recompute)
        torch.manual_seed(3)
        (output,) = stage.forward(0, [x.clone().requires_grad_()])
        torch.manual_seed(99)  # the RNG moves on before backward, as it would in a pipeline
        (input_grad,) = stage.backward(0, [torch.ones_like(output)], split=split)
        if split:
            stage.weight(0)
        assert input_grad is not None
        grads.append([input_grad, *(p.grad.clone() for p in module.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)

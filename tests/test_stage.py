"""One stage on its own: forward, backward, what it keeps, and what it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conveyor.runtime import Stage
from conveyor.runtime.tensor_meta import TensorMeta


def test_the_last_stage_needs_a_loss_function() -> None:
    with pytest.raises(ValueError, match="stage 1 is the last stage and needs a loss function"):
        Stage(nn.Linear(2, 2), 1, 2)


def test_a_middle_stage_keeps_activations_until_backward() -> None:
    stage = Stage(nn.Linear(3, 2), 1, 3)
    x = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    outputs = [stage.forward(mb, x[mb].detach().requires_grad_()) for mb in range(2)]
    assert stage.activations_held == 2
    assert stage.output_metas(0) == [TensorMeta((4, 2), torch.float32, True)]
    grads = stage.backward(0, [torch.ones_like(outputs[0][0])])
    assert stage.activations_held == 1
    # d(sum(Wx + b))/dx = column sums of W, for every sample.
    assert torch.allclose(grads[0], stage.module.weight.sum(0).expand(4, 3))
    stage.backward(1, [torch.ones(4, 2)])
    assert stage.activations_held == 0


def test_the_last_stage_weighs_and_keeps_its_losses() -> None:
    stage = Stage(nn.Identity(), 1, 2, loss_fn=F.mse_loss)
    target = torch.zeros(2)
    stage.forward(1, torch.tensor([1.0, 1.0], requires_grad=True), target, loss_weight=0.25)
    stage.forward(0, torch.tensor([2.0, 2.0], requires_grad=True), target, loss_weight=0.75)
    assert [loss.item() for loss in stage.pop_losses()] == [3.0, 0.25]  # in micro-batch order
    assert stage.pop_losses() == []


def test_forward_twice_and_backward_first_are_refused() -> None:
    stage = Stage(nn.Linear(2, 2), 0, 2)
    stage.forward(0, torch.randn(1, 2))
    with pytest.raises(RuntimeError, match="forward of micro-batch 0 ran twice before its backward"):
        stage.forward(0, torch.randn(1, 2))
    with pytest.raises(RuntimeError, match="backward of micro-batch 1 before its forward"):
        stage.backward(1, [torch.ones(1, 2)])


def test_the_wrong_number_of_output_gradients_is_refused() -> None:
    stage = Stage(nn.Linear(2, 2), 0, 2)
    stage.forward(0, torch.randn(1, 2))
    with pytest.raises(RuntimeError, match="stage 0, micro-batch 0: got 2 output gradients for 1 outputs"):
        stage.backward(0, [torch.ones(1, 2), torch.ones(1, 2)])


def test_a_middle_stage_must_return_tensors() -> None:
    class ReturnsDict(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"h": x}

    with pytest.raises(TypeError, match="stage 0 returned dict; a stage other than the last must return a tensor"):
        Stage(ReturnsDict(), 0, 2).forward(0, torch.randn(1, 2))


def test_the_loss_must_be_a_scalar() -> None:
    stage = Stage(nn.Identity(), 1, 2, loss_fn=lambda out, target: (out - target) ** 2)
    with pytest.raises(TypeError, match="the loss function must return a scalar tensor"):
        stage.forward(0, torch.randn(3), torch.zeros(3))


def test_the_first_stage_takes_tuples_and_dicts() -> None:
    class Add(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + 2 * b

    stage = Stage(Add(), 0, 2)
    one, two = torch.ones(2), torch.full((2,), 2.0)
    assert stage.forward(0, (one, two))[0].tolist() == [5.0, 5.0]
    assert stage.forward(1, {"b": one, "a": two})[0].tolist() == [4.0, 4.0]

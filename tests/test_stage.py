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
    outputs = [stage.forward(mb, [x[mb].detach().requires_grad_()]) for mb in range(2)]
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
    stage.forward(1, [torch.tensor([1.0, 1.0], requires_grad=True)], target, loss_weight=0.25)
    stage.forward(0, [torch.tensor([2.0, 2.0], requires_grad=True)], target, loss_weight=0.75)
    results = stage.pop_results()  # in micro-batch order, each loss the micro-batch's own mean
    assert [(r.loss.item() if r.loss is not None else None, r.weight) for r in results] == [(4.0, 0.75), (1.0, 0.25)]
    assert stage.pop_results() == []


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
        stage.forward(0, [torch.randn(3)], torch.zeros(3))


def test_the_first_stage_takes_tuples_and_dicts() -> None:
    class Add(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + 2 * b

    stage = Stage(Add(), 0, 2)
    one, two = torch.ones(2), torch.full((2,), 2.0)
    assert stage.forward(0, (one, two))[0].tolist() == [5.0, 5.0]
    assert stage.forward(1, {"b": one, "a": two})[0].tolist() == [4.0, 4.0]


def test_a_sequential_stage_takes_its_inputs_as_one_argument_as_its_layers_would() -> None:
    class Pair(nn.Module):
        def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            h, mask = pair
            return h * mask

    stage = Stage(nn.Sequential(Pair()), 1, 3)
    h, mask = torch.ones(2, 3, requires_grad=True), torch.tensor([[1.0, 0.0, 1.0]] * 2)
    assert stage.forward(0, [h, mask])[0].tolist() == [[1.0, 0.0, 1.0]] * 2


def test_backward_takes_a_gradient_per_output_and_returns_one_per_input() -> None:
    class Split(nn.Module):
        def forward(self, a: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return 2 * a, 3 * a, ids + 1

    stage = Stage(Split(), 1, 3)
    a, ids = torch.ones(2, requires_grad=True), torch.tensor([1, 2])
    outputs = stage.forward(0, [a, ids])
    assert [t.requires_grad for t in outputs] == [True, True, False]
    # The second output went to no stage that needed its gradient: None, as for the integer ids.
    grads = stage.backward(0, [torch.ones(2), None, None])
    assert grads[0] is not None and grads[0].tolist() == [2.0, 2.0]
    assert grads[1] is None


def test_a_forward_only_run_keeps_nothing_for_backward() -> None:
    stage = Stage(nn.Linear(3, 2), 1, 2, loss_fn=F.mse_loss)
    stage.infer(0, [torch.randn(4, 3)], torch.zeros(4, 2), 0.5)
    stage.infer(1, [torch.randn(4, 3)])  # no target: the output is kept instead
    assert stage.activations_held == 0
    with_loss, without = stage.pop_results()
    assert with_loss.loss is not None and with_loss.loss.grad_fn is None and with_loss.weight == 0.5
    assert without.loss is None and without.output.shape == (4, 2)


def test_a_module_that_calls_a_removed_layer_is_told_how_to_fix_it() -> None:
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm: nn.Module | None = None

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.norm(h)  # type: ignore[misc]

    with pytest.raises(TypeError, match="forward must skip them .* use the traced split"):
        Stage(Skips(), 1, 3).forward(0, [torch.ones(2)])


def test_the_last_stage_counts_only_its_micro_batch_of_the_targets() -> None:
    """The target is a view of the mini-batch's targets: its micro-batch's bytes are held, not the whole batch's."""
    targets = torch.randn(64, 4)
    held = []
    for target in (targets[:8], targets[:8].clone()):
        stage = Stage(nn.Linear(4, 4), 1, 2, loss_fn=F.mse_loss, track_memory=True)
        stage.forward(0, [torch.randn(8, 4, requires_grad=True)], target)
        held.append(stage.held_bytes)
    assert held[0] == held[1]

"""float16's loss scale and the non-finite guard agree (runtime/update.py): a loss that is not finite stops a run
under nonfinite="raise" at once, updates that overflow at every scale stop it after a bounded number in a row,
and the scale never reaches 0."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conveyor import Pipeline, PipelineSpec, spawn
from conveyor.runtime.loss_scale import MIN_SCALE, LossScale
from conveyor.runtime.update import MAX_CONSECUTIVE_SKIPS


class _Overflowing(torch.autograd.Function):
    """The identity forward; a backward whose gradient is inf (an overflow no loss scale cures)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


class Makes(nn.Module):
    """A linear layer whose output is fine, or its loss inf, or its gradients inf."""

    def __init__(self, make: str) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.make = make

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(_Overflowing.apply(x) if self.make == "overflow" else x)
        if self.make == "overflow":
            h = _Overflowing.apply(h)
        return h * float("inf") if self.make == "inf" else h


def _pipeline(module: nn.Module, nonfinite: str) -> Pipeline:
    spec = PipelineSpec("1f1b", 1, 2, precision="fp16", nonfinite=nonfinite)
    return Pipeline(module, spec, loss_fn=F.mse_loss, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))


def _one_rank(rank: int, world: int) -> None:
    x, y = torch.randn(4, 2), torch.randn(4, 2)
    # A loss that is inf itself: no smaller scale helps, so "raise" stops at the first update, naming the loss.
    model = Makes("inf")
    before = model.linear.weight.detach().clone()
    pipe = _pipeline(model, "raise")
    with pytest.raises(FloatingPointError, match=r"update 1: the loss of stage 0 \(the last\) is not finite \(inf"):
        pipe.step(x, y)
    assert torch.equal(model.linear.weight, before), "a non-finite update changed the weights"
    # "skip" skips every such update, with a warning each time, and the scale backs off alike.
    pipe = _pipeline(Makes("inf"), "skip")
    assert pipe.update.loss_scale is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(30):
            pipe.step(x, y)
    told = [w for w in caught if "is not finite" in str(w.message) and "this update is skipped" in str(w.message)]
    assert len(told) == 30 and pipe.update.loss_scale.skipped == 30
    assert pipe.update.loss_scale.scale == 2.0**16 * 0.5**30
    # Gradients that overflow at every scale, with a finite loss: "raise" stops after a bounded number in a row.
    pipe = _pipeline(Makes("overflow"), "raise")
    with pytest.raises(FloatingPointError, match=f"{MAX_CONSECUTIVE_SKIPS} updates in a row overflowed"):
        for _ in range(MAX_CONSECUTIVE_SKIPS + 5):
            pipe.step(x, y)
    assert pipe.update.loss_scale is not None and pipe.update.loss_scale.skipped == MAX_CONSECUTIVE_SKIPS
    pipe.close()


@pytest.mark.timeout(120)
def test_float16_and_the_non_finite_guard_agree() -> None:
    spawn(_one_rank, 1, timeout_s=100)


def test_the_scale_never_reaches_zero() -> None:
    scale = LossScale()
    for _ in range(2000):  # GradScaler's scale is 0.0 after about 1,100 skips in a row
        scale.update(False)
    assert scale.scale == MIN_SCALE > 0
    scale.update(True)
    assert scale.scale == MIN_SCALE

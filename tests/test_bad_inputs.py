"""Bad input at the pipeline's edge: each a clear error (or warning) naming the stage and what was expected.

Checked on real ranks: one rank for the errors (a rank that raises mid-step would leave its peers
waiting), two for the warning of a stage whose output carries no gradient.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conveyor import Pipeline, PipelineSpec, spawn


class Returns(nn.Module):
    """A linear layer whose forward returns what `make` makes of its output."""

    def __init__(self, make: str = "output") -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.make = make

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        h = self.linear(x)
        return {"output": h, "none": None, "detached": h.detach(), "nan": h * float("nan")}[self.make]


def _pipeline(module: nn.Module, nonfinite: str = "raise", **kwargs: object) -> Pipeline:
    options: dict = {"loss_fn": F.mse_loss} | kwargs  # type: ignore[type-arg]
    return Pipeline(module, PipelineSpec("1f1b", 1, 2, nonfinite=nonfinite), **options)


def _one_rank(rank: int, world: int) -> None:
    x, y = torch.randn(4, 2), torch.randn(4, 2)
    with pytest.raises(ValueError, match="the targets have 3 rows but the inputs 4: each sample needs its target"):
        _pipeline(Returns()).step(x, y[:3])
    with pytest.raises(TypeError, match=r"stage 0 \(the last\) returned None; the loss function needs its output"):
        _pipeline(Returns("none")).step(x, y)
    with pytest.raises(TypeError, match=r"must return a scalar tensor .*micro-batch 0\); got a tensor of shape \[2\]"):
        _pipeline(Returns(), loss_fn=lambda o, t: (o - t).pow(2).mean(1)).step(x, y)
    with pytest.raises(RuntimeError, match=r"stage 0 \(the last\): the loss carries no gradient"):
        _pipeline(Returns("detached")).step(x, y)
    embedding = nn.Sequential(nn.Embedding(10, 2), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(IndexError, match="stage 0: embedding 0 has 10 rows but got ids from 0 to 12"):
        _pipeline(embedding).step(torch.tensor([[0, 1, 12], [1, 2, 3]]), torch.randn(2, 2))
    # A NaN loss never reaches the weights: an error by default, a skipped update on request.
    sgd = {"optimizer": lambda params: torch.optim.SGD(params, lr=0.1)}
    nan = Returns("nan")
    before = nan.linear.weight.detach().clone()
    with pytest.raises(FloatingPointError, match=r"stage 0 \(rank 0\), update 1: the gradients hold NaN or inf"):
        _pipeline(nan, **sgd).step(x, y)
    assert torch.equal(nan.linear.weight, before), "a non-finite update changed the weights"
    skipping = _pipeline(nan, nonfinite="skip", **sgd)
    with pytest.warns(UserWarning, match="update 1: the gradients hold NaN or inf; this update is skipped"):
        skipping.step(x, y)
    assert torch.equal(nan.linear.weight, before) and skipping.update.skipped_steps == 1
    nan.make = "output"  # the next good step trains as usual
    skipping.step(x, y)
    assert not torch.equal(nan.linear.weight, before)


@pytest.mark.timeout(60)
def test_bad_inputs_are_clear_errors() -> None:
    spawn(_one_rank, 1, timeout_s=45)


def _detached_stage(rank: int, world: int) -> None:
    torch.manual_seed(0)
    module = Returns("detached") if rank == 0 else nn.Linear(2, 2)
    pipe = Pipeline(module, PipelineSpec("1f1b", world, 2), loss_fn=F.mse_loss)
    x = torch.randn(4, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.step(x, x)
        pipe.step(x, x)
    mine = [str(w.message) for w in caught if "carries a gradient" in str(w.message)]
    if rank == 0:  # once, naming the stage
        assert mine == [
            "stage 0: none of its outputs carries a gradient, so its parameters and every stage before it get"
            " none (did its forward return a detached tensor?)"
        ], mine
    else:
        assert mine == [], mine
    pipe.close()


@pytest.mark.timeout(60)
def test_a_stage_whose_output_carries_no_gradient_warns() -> None:
    spawn(_detached_stage, 2, timeout_s=45)

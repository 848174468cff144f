"""One pipeline stage: runs forward and backward per micro-batch, keeping only what backward needs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .tensor_meta import TensorMeta

__all__ = ["LossFn", "Stage", "call_module"]

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class _Stash:
    """What one micro-batch's backward needs: the stage's inputs and outputs (or the loss)."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


class Stage:
    """Stage `index` of `num_stages`, wrapping the module that owns its layers.

    The first stage is called with the user's micro-batch (a tensor, a tuple
    of positional arguments or a dict of keyword arguments); later stages with
    the previous stage's outputs as positional arguments. The last stage's
    output goes to `loss_fn(output, target)`.
    """

    def __init__(self, module: nn.Module, index: int, num_stages: int, loss_fn: LossFn | None = None) -> None:
        if index == num_stages - 1 and loss_fn is None:
            raise ValueError(f"stage {index} is the last stage and needs a loss function")
        self.module = module
        self.index = index
        self.num_stages = num_stages
        self.loss_fn = loss_fn
        self._stash: dict[int, _Stash] = {}
        self.losses: dict[int, torch.Tensor] = {}

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def forward(self, mb: int, inputs: Any, target: Any = None, loss_weight: float = 1.0) -> list[torch.Tensor]:
        """Run micro-batch `mb` and return the outputs to hand to the next stage (none on the last stage).

        On the last stage the loss, times `loss_weight`, is kept for backward
        and for the step's reported loss.
        """
        if mb in self._stash:
            raise RuntimeError(f"stage {self.index}: forward of micro-batch {mb} ran twice before its backward")
        with torch.enable_grad():
            output = call_module(self.module, inputs)
            if self.is_last:
                assert self.loss_fn is not None
                loss = self.loss_fn(output, target)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TypeError(f"the loss function must return a scalar tensor; got {type(loss).__name__}")
                loss = loss.reshape(()) * loss_weight
                self.losses[mb] = loss.detach()
                self._stash[mb] = _Stash(_grad_leaves(inputs), [loss])
                return []
        outputs = _flatten_output(output, self.index)
        self._stash[mb] = _Stash(_grad_leaves(inputs), outputs)
        return outputs

    def output_metas(self, mb: int) -> list[TensorMeta]:
        """Shapes of the outputs of `mb` that will receive a gradient from the next stage."""
        return [TensorMeta.of(t) for t in self._stash[mb].outputs if t.requires_grad]

    def backward(self, mb: int, output_grads: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """Backpropagate micro-batch `mb`, accumulating parameter gradients.

        `output_grads` matches the outputs that require grad (empty on the last
        stage). Returns the gradients of the inputs that require grad, for the
        previous stage, and frees everything `mb` kept.
        """
        stash = self._stash.pop(mb, None)
        if stash is None:
            raise RuntimeError(f"stage {self.index}: backward of micro-batch {mb} before its forward")
        outputs = [t for t in stash.outputs if t.requires_grad]
        grads: Sequence[torch.Tensor | None] = [None] if self.is_last else output_grads
        if len(grads) != len(outputs):
            raise RuntimeError(
                f"stage {self.index}, micro-batch {mb}: got {len(grads)} output gradients for {len(outputs)} outputs"
            )
        if outputs:
            torch.autograd.backward(outputs, grads)
        return [t.grad if t.grad is not None else torch.zeros_like(t) for t in stash.inputs]

    def pop_losses(self) -> list[torch.Tensor]:
        losses = [self.losses[mb] for mb in sorted(self.losses)]
        self.losses.clear()
        return losses

    @property
    def activations_held(self) -> int:
        """Micro-batches whose forward ran and whose backward has not."""
        return len(self._stash)


def call_module(module: nn.Module, inputs: Any) -> Any:
    """Call a stage's module the way a stage does: a dict as keyword arguments, a tuple or list as positional ones."""
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    return module(inputs)


def _grad_leaves(inputs: Any) -> list[torch.Tensor]:
    """The stage inputs whose gradient goes back to the previous stage."""
    if isinstance(inputs, torch.Tensor):
        return [inputs] if inputs.requires_grad else []
    if isinstance(inputs, Mapping):
        return [t for v in inputs.values() for t in _grad_leaves(v)]
    if isinstance(inputs, (tuple, list)):
        return [t for v in inputs for t in _grad_leaves(v)]
    return []


def _flatten_output(output: Any, index: int) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in output):
        return list(output)
    raise TypeError(
        f"stage {index} returned {type(output).__name__}; a stage other than the last must return a tensor"
        " or a tuple of tensors (they become the next stage's positional arguments)"
    )

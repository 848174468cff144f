"""One pipeline stage: runs forward and backward per micro-batch, keeping only what backward needs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .microbatch import tensors_in
from .split_backward import WeightWork, backward_input
from .tensor_meta import TensorMeta

__all__ = ["LossFn", "Stage", "call_module"]

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class _Stash:
    """What one micro-batch's backward needs: the stage's inputs and outputs (or the loss)."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    bytes: int = 0  # held for backward, when the stage counts them


class Stage:
    """Stage `index` of `num_stages`, wrapping the module that owns its layers.

    The first stage is called with the user's micro-batch (a tensor, a tuple
    of positional arguments or a dict of keyword arguments); later stages with
    the previous stage's outputs as positional arguments. The last stage's
    output goes to `loss_fn(output, target)`.

    With `recompute`, the forward keeps only the stage's inputs and runs again
    during backward (`torch.utils.checkpoint`, RNG state preserved, so dropout
    draws the same mask). With `track_memory`, the stage counts the bytes each
    micro-batch holds for backward (saved tensors, inputs and outputs, not
    parameters) in `held_bytes` and `peak_held_bytes`.
    """

    def __init__(
        self,
        module: nn.Module,
        index: int,
        num_stages: int,
        loss_fn: LossFn | None = None,
        *,
        recompute: bool = False,
        track_memory: bool = False,
    ) -> None:
        if index == num_stages - 1 and loss_fn is None:
            raise ValueError(f"stage {index} is the last stage and needs a loss function")
        self.module = module
        self.index = index
        self.num_stages = num_stages
        self.loss_fn = loss_fn
        self.recompute = recompute
        self.track_memory = track_memory
        self.held_bytes = 0
        self.peak_held_bytes = 0
        self._stash: dict[int, _Stash] = {}
        self._weight_work: dict[int, tuple[WeightWork, int]] = {}
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
        if mb in self._stash or mb in self._weight_work:
            raise RuntimeError(f"stage {self.index}: forward of micro-batch {mb} ran twice before its backward")
        counter = _SavedBytes(self.module, tensors_in(inputs)) if self.track_memory else None
        with torch.enable_grad(), counter or contextlib.nullcontext():
            if self.recompute:
                output = checkpoint(call_module, self.module, inputs, use_reentrant=False)
            else:
                output = call_module(self.module, inputs)
            if self.is_last:
                assert self.loss_fn is not None
                loss = self.loss_fn(output, target)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TypeError(f"the loss function must return a scalar tensor; got {type(loss).__name__}")
                loss = loss.reshape(()) * loss_weight
                self.losses[mb] = loss.detach()
        outputs = [loss] if self.is_last else _flatten_output(output, self.index)
        stash = _Stash(_grad_leaves(inputs), outputs)
        if counter is not None:
            stash.bytes = counter.total(outputs)
            self._hold(stash.bytes)
        self._stash[mb] = stash
        return [] if self.is_last else outputs

    def output_metas(self, mb: int) -> list[TensorMeta]:
        """Shapes of the outputs of `mb` that will receive a gradient from the next stage."""
        return [TensorMeta.of(t) for t in self._stash[mb].outputs if t.requires_grad]

    def backward(self, mb: int, output_grads: Sequence[torch.Tensor] = (), split: bool = False) -> list[torch.Tensor]:
        """Backpropagate micro-batch `mb` and return the gradients of its inputs that require grad.

        `output_grads` matches the outputs that require grad (empty on the last
        stage). Without `split` this is the whole backward: parameter gradients
        accumulate and everything `mb` kept is freed. With `split` it is only
        B, the input gradients: `weight(mb)` must follow, and frees it.
        """
        stash = self._stash.pop(mb, None)
        if stash is None:
            raise RuntimeError(f"stage {self.index}: backward of micro-batch {mb} before its forward")
        outputs = [t for t in stash.outputs if t.requires_grad]
        grads = [torch.ones_like(outputs[0])] if self.is_last else list(output_grads)
        if len(grads) != len(outputs):
            raise RuntimeError(
                f"stage {self.index}, micro-batch {mb}: got {len(grads)} output gradients for {len(outputs)} outputs"
            )
        if split:
            params = [p for p in self.module.parameters() if p.requires_grad]
            input_grads, work = backward_input(outputs, grads, stash.inputs, params)
            self._weight_work[mb] = (work, stash.bytes)
            return [g if g is not None else torch.zeros_like(t) for g, t in zip(input_grads, stash.inputs, strict=True)]
        if outputs:
            torch.autograd.backward(outputs, grads)
        self._hold(-stash.bytes)
        return [t.grad if t.grad is not None else torch.zeros_like(t) for t in stash.inputs]

    def weight(self, mb: int) -> None:
        """W: accumulate the weight gradients of micro-batch `mb`, whose B ran with `split`, and free it."""
        work = self._weight_work.pop(mb, None)
        if work is None:
            raise RuntimeError(f"stage {self.index}: weight gradient of micro-batch {mb} before its split backward")
        work[0].run()
        self._hold(-work[1])

    def pop_losses(self) -> list[torch.Tensor]:
        losses = [self.losses[mb] for mb in sorted(self.losses)]
        self.losses.clear()
        return losses

    @property
    def activations_held(self) -> int:
        """Micro-batches whose forward ran and whose backward (W, if split) has not."""
        return len(self._stash) + len(self._weight_work)

    def _hold(self, change: int) -> None:
        self.held_bytes += change
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes a forward keeps for backward: saved tensors, inputs and outputs, parameters excepted.

    Each storage counts once. A micro-batch of the first stage is a view of
    the whole batch's storage, so for storages of the inputs only the viewed
    bytes count.
    """

    def __init__(self, module: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
        self._params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._inputs = {t.untyped_storage().data_ptr() for t in inputs}
        self._counted: dict[tuple[int, int], int] = {}
        for tensor in inputs:
            self._count(tensor)
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._count(tensor)
        return tensor

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self._params:
            return
        if storage.data_ptr() in self._inputs:
            self._counted[(tensor.data_ptr(), tensor.nbytes)] = tensor.nbytes
        else:
            self._counted[(storage.data_ptr(), -1)] = storage.nbytes()

    def total(self, outputs: Sequence[torch.Tensor]) -> int:
        for tensor in outputs:
            self._count(tensor)
        return sum(self._counted.values())


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

"""How much each micro-batch's loss counts in the mini-batch's (the loss contract of `conveyor.losses`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .microbatch import batch_size, tensors_in

__all__ = ["LossWeights", "WeightFn"]

WeightFn = Callable[[Any], "torch.Tensor | float | int"]
IGNORE_INDEX = -100


class LossWeights:
    """Micro-batch k's weight: its count c_k (`weigh(target_k)`, by default its samples) over the counts of
    every micro-batch the update applies, so that sum_k w_k * mean_loss_k is the mean over the mini-batch.
    A summed loss (`reduction="sum"`) weighs every micro-batch 1.
    """

    def __init__(self, weigh: WeightFn | None, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"a loss's reduction must be 'mean' or 'sum'; got {reduction!r}")
        self.weigh, self.reduction = weigh, reduction
        self._warned = False

    @classmethod
    def of(cls, loss_fn: Any, loss_weight: WeightFn | None) -> LossWeights:
        """The weights `Pipeline(loss_fn=..., loss_weight=...)` asks for: `loss_weight`, else the loss's own
        `weight` method (`conveyor.losses`), else the samples."""
        weigh = loss_weight if loss_weight is not None else getattr(loss_fn, "weight", None)
        return cls(weigh if callable(weigh) else None, getattr(loss_fn, "reduction", "mean"))

    def __call__(self, targets: Sequence[Any], per_step: int | None = None, *, batch: Any = None) -> list[float]:
        """The weights of the micro-batches `targets` of a mini-batch; with `per_step`, normalized over each
        `per_step` micro-batches (an asynchronous schedule's update) instead of all of them. `batch`, if given,
        is the targets before they were split: checked for padding in one pass instead of one per micro-batch."""
        if self.reduction == "sum":
            return [1.0] * len(targets)
        if self.weigh is None:
            self._warn_if_padded(targets if batch is None else [batch])
            counts = [float(batch_size(t)) for t in targets]
        else:
            found = [self.weigh(t) for t in targets]
            # One transfer for all of them (on a GPU, not one sync per micro-batch).
            counts = torch.stack([torch.as_tensor(c, dtype=torch.float64).cpu() for c in found]).tolist()
        group = per_step or len(counts)
        weights = []
        for first in range(0, len(counts), group):
            part = counts[first : first + group]
            total = sum(part)
            if any(c < 0 for c in part) or not total > 0:
                raise ValueError(
                    f"the loss weights of micro-batches {first} to {first + len(part) - 1} are {part}: they must be"
                    " at least 0 and add up to more than 0 (is every target of the mini-batch ignored?)"
                )
            weights += [c / total for c in part]
        return weights

    def _warn_if_padded(self, targets: Sequence[Any]) -> None:
        """Targets holding -100 are padding a token mean skips; weighing micro-batches by samples then gets the
        loss and the gradients wrong. Checked on CPU targets only (on a GPU it would wait for the device)."""
        if self._warned:
            return
        for target in targets:
            for tensor in tensors_in(target):
                if tensor.device.type != "cpu" or tensor.is_floating_point() or tensor.dtype == torch.bool:
                    continue
                if bool((tensor == IGNORE_INDEX).any()):
                    self._warned = True
                    warnings.warn(
                        "the targets hold -100 (ignored positions), but the micro-batches' losses are weighted by"
                        " their samples: a loss averaged over tokens is then not the mini-batch's. Give"
                        " Pipeline(loss_weight=lambda t: (t != -100).sum()), or a loss of conveyor.losses"
                        " (causal_lm, token_classification, sequence_classification), which weigh themselves",
                        stacklevel=4,
                    )
                    return

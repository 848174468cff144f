"""Losses for a pipeline's last stage, each with the weight that keeps the mini-batch loss exact.

The contract. `loss_fn(output, target)` returns one micro-batch's *mean* loss, and
`loss_weight(target)` what that mean is over: its tokens, its samples. The pipeline weighs micro-batch
k's loss by c_k / (c_1 + ... + c_m), the counts of the whole mini-batch (of every data-parallel and
replicated rank alike; of each update's micro-batches under an asynchronous schedule), so the loss it
returns and the gradients it accumulates are those of the unsplit model's mean over the mini-batch.
Without `loss_weight` a micro-batch's count is its samples: right for a loss that is a mean over
samples, wrong for a mean over tokens when padding spreads unevenly over the micro-batches, which the
pipeline warns about when it sees targets holding -100.

A loss may carry its own weight as a `weight` method, and say it is summed rather than averaged with
`reduction = "sum"` (then every micro-batch weighs 1 and the mini-batch loss is the sum of theirs): the
losses here do, so `Pipeline(model, spec, loss_fn=losses.causal_lm)` needs nothing more.

A micro-batch with nothing to count (every target ignored) has weight 0; these losses return 0 for it
rather than the NaN of an empty mean, and the pipeline leaves its gradients out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "CausalLM",
    "SequenceClassification",
    "Summed",
    "TokenClassification",
    "causal_lm",
    "logits_of",
    "sequence_classification",
    "token_classification",
]

IGNORE_INDEX = -100
"""The target that marks a position without a loss (padding, a prompt), as torch and Hugging Face use it."""


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, a Hugging Face output's `logits`, a dict's "logits", or a
    tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits  # type: ignore[no-any-return]
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]  # type: ignore[no-any-return]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in the last stage's output ({type(output).__name__}): return a tensor")


def _mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy summed over the counted targets, over their count (0 when there are none)."""
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum()
    return total / count.clamp(min=1)


@dataclass(frozen=True)
class CausalLM:
    """Next-token cross-entropy of a causal language model, as Hugging Face's models compute it with `labels=`:
    position t's logits predict `labels[:, t + 1]` (the labels are the input ids, `ignore_index` wherever
    nothing is to be predicted: padding, a prompt). Averaged over the predicted tokens."""

    ignore_index: int = IGNORE_INDEX

    def __call__(self, output: Any, labels: torch.Tensor) -> torch.Tensor:
        logits = logits_of(output)
        if logits.shape[:2] != labels.shape[:2]:
            raise ValueError(
                f"causal LM loss: logits of shape {list(logits.shape)} for labels of shape {list(labels.shape)};"
                " the labels are the input ids (batch, sequence), shifted inside the loss"
            )
        shifted = labels[:, 1:].reshape(-1)
        return _mean_cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted, self.ignore_index)

    def weight(self, labels: torch.Tensor) -> torch.Tensor:
        """The tokens it predicts."""
        return (labels[:, 1:] != self.ignore_index).sum()


@dataclass(frozen=True)
class TokenClassification:
    """Cross-entropy of every token's logits against its label (`ignore_index` for none), averaged over the
    labelled tokens."""

    ignore_index: int = IGNORE_INDEX

    def __call__(self, output: Any, labels: torch.Tensor) -> torch.Tensor:
        logits = logits_of(output)
        return _mean_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), self.ignore_index)

    def weight(self, labels: torch.Tensor) -> torch.Tensor:
        """The labelled tokens."""
        return (labels != self.ignore_index).sum()


@dataclass(frozen=True)
class SequenceClassification:
    """Cross-entropy of one label per sequence (`ignore_index` for none), averaged over the labelled ones."""

    ignore_index: int = IGNORE_INDEX

    def __call__(self, output: Any, labels: torch.Tensor) -> torch.Tensor:
        return _mean_cross_entropy(logits_of(output), labels.reshape(-1), self.ignore_index)

    def weight(self, labels: torch.Tensor) -> torch.Tensor:
        """The labelled sequences."""
        return (labels != self.ignore_index).sum()


@dataclass(frozen=True)
class Summed:
    """`fn`, a loss that returns a micro-batch's *sum* (say `F.cross_entropy(..., reduction="sum")`): every
    micro-batch weighs 1, so the mini-batch loss and its gradients are those of the sum over the mini-batch."""

    fn: Callable[[Any, Any], torch.Tensor]
    reduction: str = "sum"

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        return self.fn(output, target)


causal_lm = CausalLM()
token_classification = TokenClassification()
sequence_classification = SequenceClassification()

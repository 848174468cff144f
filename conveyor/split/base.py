"""What every split gives the pipeline: the stage graph, and each stage's module on demand."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..schedules import StageGraph

__all__ = ["Split"]


@runtime_checkable
class Split(Protocol):
    """A model cut into stages (`ManualSplit`, `TracedSplit`).

    Every rank holds the same split; each builds only the stages it runs.
    `graph` tells which stage's outputs go to which stage and which
    parameters several stages hold; a stage module follows the calling
    conventions of `conveyor/schedules/graph.py`.
    """

    @property
    def graph(self) -> StageGraph: ...

    def build_stage(self, stage: int, device: torch.device | str = "cpu") -> nn.Module: ...

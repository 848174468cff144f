"""The runtime: stages, transfers between ranks, and the executor that runs a schedule."""

from .executor import Executor
from .loss_weights import LossWeights
from .microbatch import batch_size, concat_microbatches, map_tensors, split_microbatches
from .stage import Stage
from .stage_io import StageIO
from .transport import Transport

__all__ = [
    "Executor",
    "LossWeights",
    "Stage",
    "StageIO",
    "Transport",
    "batch_size",
    "concat_microbatches",
    "map_tensors",
    "split_microbatches",
]

"""The runtime: stages, transfers between ranks, and the executor that runs a schedule."""

from .executor import Executor
from .microbatch import batch_size, concat_microbatches, map_tensors, microbatch_weights, split_microbatches
from .stage import Stage
from .stage_io import StageIO
from .transport import Transport

__all__ = [
    "Executor",
    "Stage",
    "StageIO",
    "Transport",
    "batch_size",
    "concat_microbatches",
    "map_tensors",
    "microbatch_weights",
    "split_microbatches",
]

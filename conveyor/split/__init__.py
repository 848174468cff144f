"""Splitting a model into pipeline stages: by hand, or traced with torch.export."""

from .base import Split
from .manual import Layout, ManualSplit, even_split, layout_of, manual_split, split_model, stage_plan
from .traced import TracedSplit, TracedStage, pipe_split, trace_split

__all__ = [
    "Layout",
    "ManualSplit",
    "Split",
    "TracedSplit",
    "TracedStage",
    "even_split",
    "layout_of",
    "manual_split",
    "pipe_split",
    "split_model",
    "stage_plan",
    "trace_split",
]

"""Splitting a model into pipeline stages: by hand, or traced with torch.export."""

from .base import Split
from .manual import Layout, ManualSplit, even_split, layout_of, manual_split, split_model, stage_plan

__all__ = ["Layout", "ManualSplit", "Split", "even_split", "layout_of", "manual_split", "split_model", "stage_plan"]

"""Splitting a model into pipeline stages."""

from .manual import Layout, even_split, layout_of, split_model, stage_plan

__all__ = ["Layout", "even_split", "layout_of", "split_model", "stage_plan"]

"""Data that ships with conveyor or that every machine already has."""

from .stdlib_text import TextBatches, stdlib_source_bytes

__all__ = ["TextBatches", "stdlib_source_bytes"]

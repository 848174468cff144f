"""Models that ship with conveyor, written to be split by hand."""

from .gpt import GPT, GPTConfig, lm_loss

__all__ = ["GPT", "GPTConfig", "lm_loss"]

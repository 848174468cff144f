"""Hugging Face GPT-2 from a config (random weights, no download), for the traced split; needs the [hf] extra."""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["gpt2_config", "gpt2_lm", "logits_loss", "parse_overrides", "sized_gpt2_config"]

_MISSING = "GPT-2 needs Hugging Face transformers: pip install 'conveyor[hf]'"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ImportError(_MISSING) from error
    return transformers


def gpt2_config(overrides: Mapping[str, Any] | None = None, **defaults: Any) -> Any:
    """A `GPT2Config`: `defaults` (conveyor's sizes), then `overrides` (a user's `n_layer=12,...`), checked by name.

    Byte-level by default (vocab_size 256: every text is already tokenized, no tokenizer download), no
    dropout, and no key-value cache (a training pipeline has no use for one, and export cannot trace it).
    """
    config_class = _transformers().GPT2Config
    values: dict[str, Any] = {
        "vocab_size": 256,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "use_cache": False,
        **defaults,
    }
    known = set(config_class().to_dict())
    for key in overrides or {}:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=3)
            raise ValueError(f"GPT2Config has no field {key!r}{f'; did you mean {close}' if close else ''}")
    values.update(overrides or {})
    return config_class(**values)


def sized_gpt2_config(dim: int, layers: int, heads: int, context: int, model_config: str = "") -> Any:
    """The GPT2Config of `--model gpt2` (`conveyor train`, `conveyor plan`): conveyor's sizes, then the
    `n_layer=12,...` fields of `--model-config`."""
    sizes = {"n_embd": dim, "n_layer": layers, "n_head": heads, "n_positions": context}
    return gpt2_config(parse_overrides(model_config), **sizes)


def gpt2_lm(config: Any) -> Callable[[], nn.Module]:
    """A function that builds `GPT2LMHeadModel(config)` (for `trace_split`, which may build it on the meta device)."""
    model_class = _transformers().GPT2LMHeadModel
    return lambda: model_class(config)


def logits_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a Hugging Face output's `logits` against integer targets (tokens or classes)."""
    return F.cross_entropy(output.logits.flatten(0, -2), targets.flatten())


def parse_overrides(text: str) -> dict[str, Any]:
    """``"n_layer=12,n_embd=768,activation_function=gelu"`` -> a dict, values read as Python literals where they are."""
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"model config entry {item!r} is not key=value (e.g. n_layer=12,n_embd=768)")
        try:
            values[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            values[key.strip()] = raw.strip()
    return values

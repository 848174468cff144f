"""Where `conveyor train --model M` gets its model, tokenizer and split: one of four kinds of source.

- `gpt`: conveyor's small GPT (random weights, bytes as tokens), split by hand.
- `gpt2`: Hugging Face's GPT-2 from a config (random weights, bytes as tokens), split by tracing.
- a local Hugging Face folder (written by `save_pretrained`): its config, its pretrained weights, and its
  tokenizer when the folder has one, split by tracing (tied weights stay tied). Nothing is downloaded.
- `package.module:function`: a function returning an `nn.Module` that takes token ids (bytes as tokens),
  split by tracing.

Every kind trains a causal language model: the data's ids go in, and `conveyor.losses.causal_lm` scores
the logits against the same ids, shifted.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.text_files import ByteTokenizer, Tokenizer
from .gpt import GPT, GPTConfig
from .gpt2 import gpt2_lm, parse_overrides, sized_gpt2_config

__all__ = ["BUILT_IN", "ModelSource"]

BUILT_IN = ("gpt", "gpt2")


@dataclass(frozen=True)
class ModelSource:
    """A model to train, as `--model` names it, with conveyor's sizes for the built-in ones."""

    name: str
    kind: str
    """gpt, gpt2, hf (a local folder) or function."""
    context: int = 128
    dim: int = 256
    layers: int = 4
    heads: int = 4
    model_config: str = ""
    """GPT-2 config fields over the sizes (`--model-config`)."""

    @classmethod
    def parse(
        cls, name: str, *, context: int = 128, dim: int = 256, layers: int = 4, heads: int = 4, model_config: str = ""
    ) -> ModelSource:
        """The source `name` names; an error that says what it tried when it names none."""
        sizes: dict[str, Any] = {
            "context": context,
            "dim": dim,
            "layers": layers,
            "heads": heads,
            "model_config": model_config,
        }
        if name in BUILT_IN:
            return cls(name, name, **sizes)
        if Path(name).is_dir():
            if not (Path(name) / "config.json").is_file():
                raise ValueError(
                    f"--model {name}: the folder has no config.json (a Hugging Face save_pretrained folder)"
                )
            return cls(str(Path(name)), "hf", **sizes)
        if ":" in name:
            module, _, function = name.partition(":")
            try:
                found = getattr(importlib.import_module(module), function)
            except (ImportError, AttributeError) as error:
                raise ValueError(f"--model {name}: cannot import {function} from module {module} ({error})") from None
            if not callable(found):
                raise ValueError(f"--model {name}: {function} in {module} is not a function")
            return cls(name, "function", **sizes)
        hub = "; it looks like a hub name, but conveyor loads local folders only" if "/" in name else ""
        raise ValueError(
            f"--model {name!r} is neither a known model ({', '.join(BUILT_IN)}), a local folder (none at"
            f" {os.path.abspath(name)}), nor a package.module:function{hub}: save the model with save_pretrained"
            " and give its folder"
        )

    @property
    def is_hugging_face(self) -> bool:
        return self.kind in ("gpt2", "hf")

    @property
    def manual(self) -> bool:
        """Split by hand (conveyor's GPT), else by tracing."""
        return self.kind == "gpt"

    @property
    def takes_attention_mask(self) -> bool:
        """Whether the model's forward takes `attention_mask` (then the data gives it one)."""
        if self.kind == "gpt":
            return False
        if self.is_hugging_face:
            return True
        return "attention_mask" in inspect.signature(self.build().forward).parameters

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(context=self.context, dim=self.dim, layers=self.layers, heads=self.heads)

    @functools.cached_property
    def _hf_config(self) -> Any:
        if self.kind == "gpt2":
            return sized_gpt2_config(self.dim, self.layers, self.heads, self.context, self.model_config)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.name, local_files_only=True)
        config.use_cache = False
        return config

    def hf_config(self) -> Any:
        """The Hugging Face config: GPT-2's from conveyor's sizes, or the folder's (no key-value cache: a
        training pipeline has no use for one, and export cannot trace it)."""
        return self._hf_config

    @functools.cached_property
    def _function_model(self) -> nn.Module:
        module, _, function = self.name.partition(":")
        built = getattr(importlib.import_module(module), function)()
        if not isinstance(built, nn.Module):
            raise TypeError(f"--model {self.name} returned a {type(built).__name__}, not an nn.Module")
        return built

    def build(self) -> nn.Module:
        """The unsplit model: random weights for the built-in ones, the folder's own for a Hugging Face folder."""
        if self.kind == "gpt":
            return GPT(self.gpt_config())
        if self.kind == "gpt2":
            return gpt2_lm(self.hf_config())()
        if self.kind == "hf":
            from transformers import AutoModelForCausalLM

            _quiet_transformers()
            return AutoModelForCausalLM.from_pretrained(  # type: ignore[no-any-return]
                self.name, config=self.hf_config(), local_files_only=True, dtype=torch.float32
            )
        return self._function_model

    def builder(self) -> Any:
        """What a split builds from: a function for the models with random weights (built on the meta device,
        each rank materializing only its stages), the loaded model for those with weights of their own."""
        if self.kind == "gpt":
            config = self.gpt_config()
            return lambda: GPT(config)
        if self.kind == "gpt2":
            return gpt2_lm(self.hf_config())
        return self.build()

    def tokenizer(self) -> Tokenizer:
        """The folder's tokenizer, or bytes (the built-in models, a function's model, a folder without one whose
        vocabulary is bytes)."""
        if self.kind != "hf":
            return ByteTokenizer()
        found = _folder_tokenizer(Path(self.name))
        if found is not None:
            return found  # type: ignore[no-any-return]
        vocab = self.vocab_size
        if vocab != 256:
            raise ValueError(
                f"--model {self.name} has no tokenizer (tokenizer.json or tokenizer_config.json), and its vocabulary"
                f" has {vocab} tokens, not the 256 bytes conveyor reads text as without one: save the tokenizer"
                " beside the model (tokenizer.save_pretrained(folder))"
            )
        return ByteTokenizer()

    @property
    def vocab_size(self) -> int:
        if self.kind == "gpt":
            return self.gpt_config().vocab_size
        if self.is_hugging_face:
            return int(self.hf_config().vocab_size)
        embeddings = [m for m in self.build().modules() if isinstance(m, nn.Embedding)]
        return embeddings[0].num_embeddings if embeddings else 256

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes (None: no limit it states)."""
        if self.kind == "gpt":
            return self.context
        if self.is_hugging_face:
            config = self.hf_config()
            for field in ("max_position_embeddings", "n_positions", "n_ctx"):
                if isinstance(getattr(config, field, None), int):
                    return int(getattr(config, field))
        return None

    def settings(self) -> dict[str, str | int | float | bool]:
        """What shapes the model, as a checkpoint records it and a resume or an export compares it: the model,
        its sizes and vocabulary (GPT-2's other config fields; a folder's architecture and config sizes)."""
        if self.kind == "gpt":
            gpt = self.gpt_config()
            sizes = {"dim": gpt.dim, "layers": gpt.layers, "heads": gpt.heads, "context": gpt.context}
            return {"model": self.name, **sizes, "vocabulary": gpt.vocab_size}
        if self.kind == "gpt2":
            config = self.hf_config()
            sizes = {
                "dim": config.n_embd,
                "layers": config.n_layer,
                "heads": config.n_head,
                "context": config.n_positions,
            }
            named = {"n_embd", "n_layer", "n_head", "n_positions", "vocab_size"}
            others = sorted((k, v) for k, v in parse_overrides(self.model_config).items() if k not in named)
            extra = ",".join(f"{k}={v!r}" for k, v in others)
            return {"model": self.name, **sizes, "vocabulary": config.vocab_size, "model_config": extra}
        if self.kind == "hf":
            config = self.hf_config()
            fields = (
                *("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"),
                *("num_key_value_heads", "intermediate_size", "max_position_embeddings", "tie_word_embeddings"),
            )
            found = {f: getattr(config, f) for f in fields if isinstance(getattr(config, f, None), (int, str, bool))}
            return {"model": "hf", **found}
        return {"model": self.name}

    def check_sequence_length(self, length: int) -> None:
        limit = self.max_positions
        if limit is not None and length > limit:
            raise ValueError(
                f"--context {length} is longer than --model {self.name} takes ({limit} positions): use --context"
                f" {limit} or less"
            )


def _quiet_transformers() -> None:
    """No progress bars from transformers: one per rank would interleave, and its multiprocessing lock outlives
    a spawned rank (the resource tracker then reports a leaked semaphore)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _folder_tokenizer(folder: Path) -> Any:
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:  # padding only fills what attention masks out and the loss ignores
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer

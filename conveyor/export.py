"""`conveyor export`: a checkpoint of `conveyor train` as the unsplit model's weights, or as a Hugging Face folder.

The checkpoint keeps the run's flags (`conveyor-train.json`), which name the model: export builds the
unsplit model from them, loads the checkpoint's weights into it (`checkpoint.load_model`, which refuses
tied copies that differ), and writes it as a `torch.save` state dict, a safetensors file, or a folder that
`transformers` loads with `from_pretrained` (config, safetensors, and the tokenizer when the model had
one), ties intact.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .models.source import ModelSource

__all__ = ["FORMATS", "export_checkpoint"]

FORMATS = ("auto", "pt", "safetensors", "hf")
"""auto: safetensors for a `.safetensors` name, else torch.save."""


def export_checkpoint(path: str | Path, out: str | Path, format: str = "auto") -> Path:
    """Write checkpoint `path` (a checkpoint folder, or a checkpoint directory, whose latest is taken) to `out`
    as `format` (FORMATS); returns what it wrote."""
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {format!r}")
    folder = _checkpoint_folder(Path(path))
    source = _source_of(folder)
    if format == "hf" and not source.is_hugging_face:
        raise ValueError(
            f"{folder} holds --model {source.name}, which is not a Hugging Face model: use --format safetensors or pt"
        )
    model = _unsplit(source)
    checkpoint.load_model(model, folder, settings=source.settings())  # verifies it first: nothing unpickled
    target = Path(out)
    if format == "hf":
        return _save_pretrained(model, source, target)
    if format == "safetensors" or (format == "auto" and target.suffix == ".safetensors"):
        if importlib.util.find_spec("safetensors") is None:
            raise ValueError("writing safetensors needs the safetensors package: pip install safetensors")
        from safetensors.torch import save_model

        save_model(model, str(target))  # shared tensors (tied weights) are written once
        return target
    torch.save({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, target)
    return target


def _checkpoint_folder(path: Path) -> Path:
    """`path` itself, or the newest checkpoint in it that verifies (each newer one skipped with a warning)."""
    if (path / ".metadata").exists() or (path / checkpoint.MANIFEST_FILE).exists():
        return path
    found = checkpoint.newest_verified(path)
    if found is None:
        held = "checkpoints, none of which verifies" if checkpoint.latest(path) else "no checkpoint"
        raise ValueError(f"{path} holds {held}")
    return found


def _source_of(folder: Path) -> ModelSource:
    """The model the run that wrote `folder` trained, from its flags."""
    flags = folder / "conveyor-train.json"
    if not flags.is_file():
        raise ValueError(
            f"{folder} has no conveyor-train.json: it was not written by `conveyor train`; load it into your own"
            " model with conveyor.checkpoint.load_model(model, folder)"
        )
    saved: dict[str, Any] = json.loads(flags.read_text())
    sizes = {key: saved[key] for key in ("context", "dim", "layers", "heads", "model_config") if key in saved}
    return ModelSource.parse(saved["model"], **sizes)


def _unsplit(source: ModelSource) -> nn.Module:
    """The model to load the weights into (its own values are overwritten; a folder's are not read)."""
    if source.kind == "hf":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(source.hf_config(), dtype=torch.float32)  # type: ignore[no-any-return]
    if source.kind == "function":
        return source.build()
    return source.builder()()  # type: ignore[no-any-return]


def _save_pretrained(model: nn.Module, source: ModelSource, target: Path) -> Path:
    from transformers.utils import logging

    logging.disable_progress_bar()
    config: Any = model.config  # type: ignore[union-attr]
    config.use_cache = True  # a training pipeline turned the cache off; inference wants it back
    model.save_pretrained(str(target), safe_serialization=True)  # type: ignore[operator]
    if source.kind == "hf":
        tokenizer = source.tokenizer()
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(target))
    return target

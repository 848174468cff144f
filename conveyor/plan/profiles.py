"""Profiles on disk: one per model, micro-batch size and optimizer, measured once and reused."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ..observe.profile import LayerCosts, LayerProfile

__all__ = ["cached_profile", "read_profiles", "write_profiles"]


def read_profiles(path: str | Path) -> list[LayerProfile]:
    """Every profile in `path` (none if it does not exist)."""
    file = Path(path)
    if not file.exists():
        return []
    try:
        data = json.loads(file.read_text())
        return [
            LayerProfile(**{**entry, "layers": tuple(LayerCosts(**layer) for layer in entry["layers"])})
            for entry in data["profiles"]
        ]
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is not a profile file written by conveyor plan ({error}): remove it") from None


def write_profiles(path: str | Path, profiles: list[LayerProfile]) -> None:
    entries = [{**asdict(p), "layers": [asdict(layer) for layer in p.layers]} for p in profiles]
    Path(path).write_text(json.dumps({"profiles": entries}, indent=1) + "\n")


def cached_profile(
    path: str | Path | None, fingerprint: str, microbatch_size: int, optimizer: str, measure: Callable[[], LayerProfile]
) -> tuple[LayerProfile, bool]:
    """The profile of this model at this size from `path`, or `measure()`'d and added there; and whether it was
    measured now."""
    profiles = read_profiles(path) if path else []
    for profile in profiles:
        if (profile.fingerprint, profile.microbatch_size, profile.optimizer) == (
            fingerprint,
            microbatch_size,
            optimizer,
        ):
            return profile, False
    profile = measure()
    if profile.fingerprint != fingerprint:
        raise ValueError(f"the measured profile is of model {profile.fingerprint}, not {fingerprint}")
    if path:
        write_profiles(path, [*profiles, profile])
    return profile, True

"""Profiles on disk: one per model, micro-batch size and optimizer, measured once and reused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..observe.profile import LayerProfile

__all__ = ["cached_profile", "read_profiles", "store_profile", "write_profiles"]


def read_profiles(path: str | Path) -> list[LayerProfile]:
    """Every profile in `path` (none if it does not exist)."""
    file = Path(path)
    if not file.exists():
        return []
    try:
        data = json.loads(file.read_text())
        return [LayerProfile.from_json(entry) for entry in data["profiles"]]
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is not a profile file written by conveyor plan ({error}): remove it") from None


def write_profiles(path: str | Path, profiles: list[LayerProfile]) -> None:
    entries = [p.to_json() for p in profiles]
    Path(path).write_text(json.dumps({"profiles": entries}, indent=1) + "\n")


def _key(profile: LayerProfile) -> tuple[str, int, str]:
    return profile.fingerprint, profile.microbatch_size, profile.optimizer


def store_profile(path: str | Path, profile: LayerProfile) -> None:
    """Put `profile` in `path`, in place of the one of the same model, micro-batch size and optimizer if any."""
    others = [p for p in read_profiles(path) if _key(p) != _key(profile)]
    write_profiles(path, [*others, profile])


def cached_profile(
    path: str | Path | None, fingerprint: str, microbatch_size: int, optimizer: str, measure: Callable[[], LayerProfile]
) -> tuple[LayerProfile, bool]:
    """The profile of this model at this size from `path`, or `measure()`'d and added there; and whether it was
    measured now."""
    profiles = read_profiles(path) if path else []
    for profile in profiles:
        if _key(profile) == (fingerprint, microbatch_size, optimizer):
            return profile, False
    profile = measure()
    if profile.fingerprint != fingerprint:
        raise ValueError(f"the measured profile is of model {profile.fingerprint}, not {fingerprint}")
    if path:
        write_profiles(path, [*profiles, profile])
    return profile, True

"""Ranks agree before they run: every rank of a pipeline must build it with the same settings.

Ranks that disagree on the schedule, the stages or the micro-batches would
exchange messages of other sizes or in another order, which crashes a process
(gloo aborts on a size mismatch) or hangs until a timeout. So when a pipeline
is built, its ranks compare what they must agree on, in one small collective,
and on a mismatch every rank raises the same error, naming each setting that
differs and every rank's value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
import torch.distributed as dist

__all__ = ["DisagreementError", "agree"]

Setting = int | bool | str


class DisagreementError(ValueError):
    """The ranks of a pipeline were built with different settings."""


def agree(settings: Mapping[str, Setting], group: dist.ProcessGroup | None, device: torch.device) -> None:
    """Raise DisagreementError on every rank of `group` unless all of them passed the same `settings`.

    One all-gather of a word per setting; only when they differ, a second one with the values, for
    the message. Every rank must call it at the same point (building its pipeline).
    """
    names = sorted(settings)
    words = torch.tensor([_word(settings[name]) for name in names], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(words) for _ in range(world)]
    dist.all_gather(gathered, words, group=group)
    if all(torch.equal(g, words) for g in gathered):
        return
    values: list[dict[str, Setting]] = [{} for _ in range(world)]
    dist.all_gather_object(values, {name: settings[name] for name in names}, group=group)
    lines = []
    for name in names:
        seen = [v.get(name) for v in values]
        if len(set(map(repr, seen))) > 1:
            each = ", ".join(f"rank {rank} has {value!r}" for rank, value in enumerate(seen))
            lines.append(f"{name}: {each}")
    raise DisagreementError(
        "the ranks built the pipeline with different settings (every rank must pass the same):\n  " + "\n  ".join(lines)
    )


def _word(value: Setting) -> int:
    """An int64 that differs when the value does (strings by a hash that is the same in every process)."""
    if isinstance(value, bool | int):
        return int(value)
    digest = hashlib.blake2b(value.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)

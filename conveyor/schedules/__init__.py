"""Schedules as data: generators, lowering, validation and text rendering. No torch here."""

from __future__ import annotations

from collections.abc import Callable

from .actions import Action, Kind, Link, Program, parse_action, parse_actions
from .gpipe import gpipe
from .lowering import insert_transfers, lower, prefetch_receives
from .one_f_one_b import one_f_one_b
from .render import render_steps, render_timeline
from .validate import DeadlockError, ScheduleError, Timing, split_backward_stages, validate

__all__ = [
    "Action", "DeadlockError", "Kind", "Link", "Program", "SCHEDULES", "ScheduleError", "Timing",
    "build_schedule", "gpipe", "insert_transfers", "lower", "one_f_one_b", "parse_action",
    "parse_actions", "prefetch_receives", "render_steps", "render_timeline", "split_backward_stages", "validate",
]

Generator = Callable[[int, int], Program]

SCHEDULES: dict[str, Generator] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
}


def build_schedule(name: str, num_stages: int, num_microbatches: int, prefetch: bool = True) -> Program:
    """The lowered, validated program of schedule `name`, ready for the executor."""
    try:
        generator = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
    program = lower(generator(num_stages, num_microbatches), prefetch=prefetch)
    validate(program)
    return program

"""Traces of real runs: when each action ran on every rank, and how long it waited on receives.

A `Recorder` is attached to a rank's executor (`executor.tracer = recorder`).
`gather_spans` collects every rank's spans on one rank, which writes a Chrome
trace (`write_chrome_trace`, opens in Perfetto or chrome://tracing) and a
timeline picture (`observe.timeline.draw_timeline`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.distributed as dist

from ..schedules import Action, Kind
from .timeline import Span

__all__ = ["Recorder", "gather_spans", "write_chrome_trace"]


class Recorder:
    """Records this rank's actions as spans, times relative to `start()` (in seconds).

    The compute part of an action that waited on a receive starts when the
    data arrived; the wait is a span of its own, of kind "wait".
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.step = 0
        self.step_of: Callable[[Action], int] | None = None
        """How to tell an action's step when steps overlap (a stream); else every span gets `step`."""
        self.spans: list[tuple[int, Span]] = []  # (step, span)
        self._origin = time.perf_counter()
        self._started = 0.0
        self._waited_until: float | None = None

    def start(self, group: dist.ProcessGroup | None = None) -> None:
        """Zero the clock right after a barrier, so ranks' times line up."""
        if dist.is_initialized():
            dist.barrier(group)
        self._origin = time.perf_counter()

    def action_started(self, action: Action) -> None:
        self._started = time.perf_counter()
        self._waited_until = None

    def waited(self, action: Action, start: float, end: float) -> None:
        span = Span(self.rank, "wait", action.stage, action.mb, start - self._origin, end - self._origin)
        self._add(span, action)
        self._waited_until = end

    def action_ended(self, action: Action) -> None:
        # Computes, the reductions of tied gradients (a collective the timeline should show), and host copies
        # (on CPU the copy itself; on CUDA the time to start it on the copy stream).
        if not (action.kind.is_compute or action.kind is Kind.REDUCE or action.kind.is_host_copy):
            return
        start = self._waited_until if self._waited_until is not None else self._started
        end = time.perf_counter()
        span = Span(self.rank, action.kind.value, action.stage, action.mb, start - self._origin, end - self._origin)
        self._add(span, action)

    def _add(self, span: Span, action: Action) -> None:
        self.spans.append((self.step if self.step_of is None else self.step_of(action), span))


def gather_spans(recorder: Recorder, dst: int = 0, group: dist.ProcessGroup | None = None) -> list[tuple[int, Span]]:
    """Every rank's spans on rank `dst` (an empty list elsewhere). Collective."""
    gathered: list[list[tuple[int, Span]]] | None = [[] for _ in range(dist.get_world_size(group))]
    if dist.get_rank(group) != dst:
        gathered = None
    dist.gather_object(recorder.spans, gathered, dst=dst, group=group)
    return [item for spans in gathered or [] for item in spans]


_TRACKS = {"wait": 1, Kind.OFFLOAD.value: 2, Kind.RELOAD.value: 2}  # the rest: compute, track 0


def write_chrome_trace(spans: Sequence[tuple[int, Span]], path: str | Path) -> Path:
    """Write spans as Chrome trace events: a process per rank, waits on a track of their own."""
    events: list[dict[str, object]] = []
    for rank in sorted({span.rank for _, span in spans}):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": "compute"}})
        events.append(
            {"name": "thread_name", "ph": "M", "pid": rank, "tid": 1, "args": {"name": "waiting on receives"}}
        )
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 2, "args": {"name": "host copies"}})
    for step, span in spans:
        mb = "" if span.mb is None else span.mb
        name = f"{span.stage}{span.kind}{mb}" if span.kind != "wait" else f"wait {span.stage}:{mb}"
        events.append(
            {
                "name": name,
                "cat": span.kind,
                "ph": "X",
                "ts": span.start * 1e6,
                "dur": (span.end - span.start) * 1e6,
                "pid": span.rank,
                "tid": _TRACKS.get(span.kind, 0),
                "args": {"step": step, "stage": span.stage, "micro-batch": span.mb},
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return path

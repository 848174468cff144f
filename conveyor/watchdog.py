"""Progress heartbeats, and the watchdog that names a rank which stopped making progress.

A rank counts its progress in one cell of a small array in shared memory: `heartbeat()` adds one each
time the rank's own thread begins an action of its schedule, and when it begins and ends a wait for a
peer (`conveyor.runtime`). A beat is a store into memory the launcher maps too: no system call, no lock.
The launcher (`Heartbeats`) samples the cells; a rank whose count has not moved for the watchdog's limit
is stuck in one place (stopped by a signal, in a kernel, a lock or I/O that never returns), which no
wait of its peers may notice (nobody waits on it, or its peers wait without a bound, as NCCL's do).

Only the thread that attached beats: a helper thread that beat on its own would hide a stuck main
thread. A rank's longest legitimate silence is one compute, or one wait for a peer (which can last the
wait timeout before it raises), so the limit defaults to twice the wait timeout and at least
`MIN_LIMIT_S`; before its first beat a rank is starting (imports, building its stages, loading a
checkpoint), which takes long on a loaded machine, so there the limit is never below `MIN_LIMIT_S`.

Under torchrun there is no conveyor launcher: `watch_this_rank` runs the same check on a thread of the
rank itself, which ends the rank (torchrun then restarts or reports it); a stopped process stops that
thread too, and is found by its peers' bounded waits instead.
"""

from __future__ import annotations

import faulthandler
import mmap
import os
import sys
import threading
import time

__all__ = ["Heartbeats", "attach", "default_limit", "heartbeat", "watch_this_rank"]

MIN_LIMIT_S = 120.0

_CELL = 8  # bytes of one rank's count

# This rank's count (a one-element view of the shared array) and the thread allowed to move it.
_count: memoryview | None = None
_owner: int | None = None
_mapping: mmap.mmap | None = None  # kept open while `_count` views it


def heartbeat() -> None:
    """Count one step of this rank's progress; does nothing when no watchdog listens.

    Call it from the thread that does the rank's work wherever that work moves on (the executor per
    action, a wait for a peer at its start and end); a call from any other thread is ignored.
    """
    count = _count
    if count is not None and threading.get_ident() == _owner:
        count[0] += 1


def default_limit(timeout_s: float) -> float:
    """The watchdog's limit for ranks whose waits for a peer give up after `timeout_s`: twice that, at least
    MIN_LIMIT_S (one wait, one compute as long, and the start before the first beat)."""
    return max(2 * timeout_s, MIN_LIMIT_S)


def attach(path: str, rank: int) -> None:
    """Make this thread beat into cell `rank` of the launcher's heartbeat file `path` (in a spawned rank)."""
    global _mapping
    with open(path, "r+b") as file:  # the mapping outlives the descriptor
        _mapping = mmap.mmap(file.fileno(), 0)
    _listen(memoryview(_mapping).cast("Q")[rank : rank + 1])


def _listen(count: memoryview) -> None:
    global _count, _owner
    _count, _owner = count, threading.get_ident()


class Heartbeats:
    """The launcher's side: one count per rank in the file `path`, and when each last moved.

    `silence(rank)` is how long the rank's count has not changed, as far as the calls to it saw (the
    launcher samples about twice a second); `has_beaten(rank)`, whether it moved since `restart_clocks`.
    """

    def __init__(self, path: str, world_size: int) -> None:
        self.path = path
        with open(path, "wb") as file:
            file.write(bytes(_CELL * world_size))
        with open(path, "r+b") as file:
            self._mapping = mmap.mmap(file.fileno(), 0)
        self._counts = memoryview(self._mapping).cast("Q")
        self.restart_clocks()

    def restart_clocks(self) -> None:
        """Start every rank's silence now (a fresh start of every rank)."""
        self._started = list(self._counts)
        self._seen = list(self._started)
        self._moved = [time.monotonic()] * len(self._seen)

    def silence(self, rank: int) -> float:
        now, count = time.monotonic(), self._counts[rank]
        if count != self._seen[rank]:
            self._seen[rank], self._moved[rank] = count, now
        return now - self._moved[rank]

    def has_beaten(self, rank: int) -> bool:
        return self._seen[rank] != self._started[rank]

    def close(self) -> None:
        self._counts.release()
        self._mapping.close()


def watch_this_rank(rank: int, limit_s: float) -> None:
    """Beat from this thread, and end this process (after printing every thread's stack) when it makes no
    progress for `limit_s` seconds: the watchdog of a rank that no conveyor launcher watches (torchrun)."""
    _listen(memoryview(bytearray(_CELL)).cast("Q"))
    count = _count
    assert count is not None
    threading.Thread(target=_watch, args=(count, rank, limit_s), name="conveyor-watchdog", daemon=True).start()


def _watch(count: memoryview, rank: int, limit_s: float) -> None:
    seen, moved = count[0], time.monotonic()
    while True:
        time.sleep(min(1.0, limit_s / 4))  # a wake-up a second costs nothing next to gloo's 100 a second
        now = time.monotonic()
        if count[0] != seen:
            seen, moved = count[0], now
        elif now - moved > limit_s:
            sys.stderr.write(
                f"conveyor: rank {rank} made no progress for {now - moved:.0f} s (the watchdog's limit is"
                f" {limit_s:g} s: no action of its schedule begun, no wait for a peer begun or ended); it is stuck"
                " in one call (a kernel, a lock, I/O). Its threads' stacks, then it ends:\n"
            )
            sys.stderr.flush()
            faulthandler.dump_traceback(all_threads=True)
            os._exit(1)

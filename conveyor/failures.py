"""Which failure of a spawned run came first, and how the launcher reports it.

When one rank fails, its peers fail after it: a wait for it times out, a send to it finds the link
closed, gloo raises "Connection closed by peer" in a collective. Each rank notes its failure beside the
rendezvous file as it happens (`note_failure`), and the launcher reports the first cause
(`first_cause`): a rank a signal ended or stopped, else the first note, following a chain of timed-out
waits to the rank at its end; a failure that came after it is a consequence, never reported instead.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import time
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

__all__ = ["RankFailure", "describe_failure", "first_cause", "is_stopped", "note_failure", "noted_first"]


class RankFailure(mp.ProcessRaisedException):
    """The first failure of a spawned run: the rank, its traceback, and `cause`, the same in one line."""

    def __init__(self, rank: int, pid: int, trace: str, cause: str, note: str = "") -> None:
        super().__init__(f"\n\n-- Process {rank} terminated with the following error:\n{trace}{note}", rank, pid)
        self.cause = cause


def describe_failure(error: BaseException) -> str:
    """One line naming the rank that failed and how (for the log of a restart)."""
    if isinstance(error, RankFailure):
        return error.cause
    if isinstance(error, mp.ProcessExitedException):
        if error.signal_name:
            return f"rank {error.error_index} was ended by signal {error.signal_name}"
        return f"rank {error.error_index} exited with code {error.exit_code}"
    return str(error)


def first_cause(
    processes: list[Any], failed: list[int], rendezvous: str, error_files: list[str]
) -> mp.ProcessRaisedException | mp.ProcessExitedException:
    """The error that names the run's first failure, once rank(s) `failed` ended in error.

    A rank a signal ended (SIGKILL, SIGSEGV: not SIGABRT, which gloo raises in a rank whose peer left) or
    stopped (SIGSTOP) failed first: its peers only lost their link to it. Otherwise the first error a rank
    noted, following a chain of timed-out waits to its end.
    """
    stopped = [rank for rank, p in enumerate(processes) if p.exitcode is None and is_stopped(p.pid)]
    # The other ranks fail on their own within a moment; their notes may continue a chain of waits. And a
    # rank a signal killed can close its links (which its peers see and note) before it can be reaped.
    until = time.monotonic() + 1.0
    for rank, process in enumerate(processes):
        if process.exitcode is None and rank not in stopped:
            process.join(max(0.0, until - time.monotonic()))
    # No rank was stopped by the launcher yet: a signal that ended one came from outside, a first cause.
    ended = {rank: p.exitcode for rank, p in enumerate(processes) if p.exitcode is not None}
    killed = [rank for rank, code in ended.items() if code < 0 and code != -signal.SIGABRT]
    if killed:
        return _exited(processes, killed[0])
    first = _first_failure(rendezvous)
    if first is None:
        trace = _torch_error(error_files[failed[0]])
        if trace is None:
            return _exited(processes, failed[0])
        first = (failed[0], trace)
    rank, trace = first
    lines = [line for line in trace.splitlines() if line and not line.startswith(" ")]
    raised = f"rank {rank} raised {(lines[-1] if lines else 'an error')[:300]}"
    if stopped:
        who = f"rank {stopped[0]} was" if len(stopped) == 1 else f"ranks {stopped} were"
        note = f"({who} stopped by a signal (SIGSTOP, or a debugger) when rank {rank} failed: the first cause)\n"
        cause = f"{who} stopped by a signal (SIGSTOP, or a debugger); then {raised}"
        return RankFailure(rank, processes[rank].pid, trace, cause, note)
    return RankFailure(rank, processes[rank].pid, trace, raised)


def _exited(processes: list[Any], rank: int) -> mp.ProcessExitedException:
    code = processes[rank].exitcode
    if code < 0:
        name = signal.Signals(-code).name
        return mp.ProcessExitedException(
            f"process {rank} terminated with signal {name}",
            error_index=rank,
            error_pid=processes[rank].pid,
            exit_code=code,
            signal_name=name,
        )
    return mp.ProcessExitedException(
        f"process {rank} terminated with exit code {code}",
        error_index=rank,
        error_pid=processes[rank].pid,
        exit_code=code,
    )


def _torch_error(path: str) -> str | None:
    """The traceback torch.multiprocessing recorded for a rank that raised before conveyor's note could."""
    try:
        with open(path, "rb") as file:
            return str(pickle.load(file))
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


def is_stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (state T or t in /proc, on Linux; False where /proc is absent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] in ("T", "t")  # the state follows the command name's ")"


def note_failure(rendezvous: str, rank: int, trace: str) -> None:
    """Record each rank's failure, and which came first (before its links close and its peers fail in turn)."""
    with open(f"{rendezvous}.failure-{rank}", "w") as file:
        file.write(trace)
    # Written whole, then linked into place: the launcher never reads half of it, and only the first link wins.
    candidate = f"{rendezvous}.first-failure.{rank}"
    with open(candidate, "w") as file:
        file.write(f"{rank}\n{trace}")
    try:
        os.link(candidate, f"{rendezvous}.first-failure")
    except FileExistsError:
        pass
    finally:
        os.unlink(candidate)


def noted_first(rendezvous: str) -> int | None:
    """The rank whose failure was noted first, if one was."""
    try:
        with open(f"{rendezvous}.first-failure") as file:
            return int(file.readline())
    except (FileNotFoundError, ValueError):
        return None  # none yet, or being written


_WAITED_FOR = re.compile(r"the message from rank (\d+) over .* did not arrive within")
# A link that closed: a consequence of its other end leaving (gloo's errors, and the transport's own), never a
# cause on its own.
_LINK_LOST = re.compile(
    r"Connection closed by peer|Connection reset by peer|that rank ended \(returned, exited or crashed\)"
)


def _first_failure(rendezvous: str) -> tuple[int, str] | None:
    """The failure to report: the first, or, when that is a wait for a rank that was itself waiting, the wait
    at the end of that chain, which names the rank that stopped (the others only waited on it)."""
    try:
        with open(f"{rendezvous}.first-failure") as file:
            rank, trace = file.read().split("\n", 1)
    except (FileNotFoundError, ValueError):
        return None
    if _LINK_LOST.search(trace):
        # A rank whose peer left can note its lost link before that peer notes why it left (a wait that timed
        # out closes the link before its error reaches the note): report the peer's own failure if one came.
        rank, trace = _own_failure(rendezvous) or (rank, trace)
    chain = [int(rank)]
    while (waited := _WAITED_FOR.search(trace)) is not None:
        blamed = int(waited.group(1))
        if blamed in chain or not os.path.exists(f"{rendezvous}.failure-{blamed}"):
            break  # the blamed rank did not fail on its own: it is the one that stopped
        with open(f"{rendezvous}.failure-{blamed}") as file:
            blamed_trace = file.read()
        if _WAITED_FOR.search(blamed_trace) is None:
            # The blamed rank failed after this wait gave up, and not in a wait of its own: a consequence
            # of this rank leaving (gloo's "Connection closed by peer"), so this wait is the first cause.
            break
        trace = blamed_trace
        chain.append(blamed)
    return chain[-1], trace


def _own_failure(rendezvous: str) -> tuple[str, str] | None:
    """The first noted failure (by time) that is not a lost link, if any rank noted one."""
    noted = sorted(Path(rendezvous).parent.glob(Path(rendezvous).name + ".failure-*"), key=lambda f: f.stat().st_mtime)
    for path in noted:
        trace = path.read_text()
        if not _LINK_LOST.search(trace):
            return path.name.rpartition("-")[2], trace
    return None

"""Starting ranks: under torchrun, or spawned by conveyor itself on one machine.

A rank that raises (or dies) stops the others: the launcher terminates them and
raises the first failure, not its consequences in other ranks. A watchdog names
a rank that makes no progress (`conveyor.watchdog`); an optional deadline bounds
the whole run. With restarts, a failure stops every rank and starts them all
again, as torchrun's elastic agent does; each rank reads its attempt with
`restart_count()` and resumes from its last checkpoint. However the launcher
ends (a rank's error, the watchdog, the deadline, Ctrl-C, SIGTERM), it stops and
reaps every rank and removes its rendezvous folder: nothing is left behind.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import watchdog
from .failures import describe_failure, first_cause, is_stopped, note_failure, noted_first
from .watchdog import heartbeat

__all__ = [
    "NoProgressError",
    "default_backend",
    "exit_rank",
    "heartbeat",
    "init_from_env",
    "restart_count",
    "run_ranks",
    "spawn",
    "under_torchrun",
]

RankFn = Callable[..., Any]

log = logging.getLogger(__name__)

# The attempt a spawned rank belongs to (0: the first start); torchrun's elastic agent sets its own.
RESTART_COUNT = "CONVEYOR_RESTART_COUNT"
TORCHRUN_RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"


class NoProgressError(TimeoutError):
    """A rank made no progress (no heartbeat) for longer than the watchdog's limit."""


def restart_count() -> int:
    """How many times the launcher (conveyor's, or torchrun's elastic agent) restarted this run's ranks before
    this attempt: 0 on the first. A program resumes from its latest checkpoint when it is above 0."""
    for name in (RESTART_COUNT, TORCHRUN_RESTART_COUNT):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def under_torchrun() -> bool:
    """True when torchrun (or another launcher) set this process's rank in the environment."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def default_backend(device: str, world_size: int) -> str:
    """NCCL when every rank can have a GPU of its own, else gloo (CUDA tensors then travel through the host).

    (NCCL refuses two ranks on one GPU.)
    """
    if device.startswith("cuda") and dist.is_nccl_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def init_from_env(backend: str, timeout_s: float = 300) -> tuple[int, int]:
    """Join the process group torchrun describes; returns (rank, world size)."""
    timeout = timedelta(seconds=timeout_s)
    store = _attempt_store(timeout)
    if store is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _attempt_store(timeout: timedelta) -> dist.Store | None:
    """torchrun's shared store, seen through a prefix of this attempt's own; None when it shares none.

    torchrun's elastic agent hosts the store its workers meet in and keeps it across restarts, with no
    prefix per attempt: a restarted rank could read an address its dead predecessor published and fail
    to connect ("Connection refused"), or not, depending on which rank gets there first (pytorch issue
    135712). The restart count tells the attempts apart. It agrees on all ranks of one node; on several
    nodes an agent counts a restart caused by another node as a membership change, so there set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun, which gives every attempt a store of its own.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    shared = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"conveyor/attempt-{restart_count()}/", shared)


def run_ranks(
    fn: RankFn,
    world_size: int,
    args: tuple[Any, ...] = (),
    *,
    backend: str = "gloo",
    threads_per_rank: int | None = 1,
    timeout_s: float | None = None,
    watchdog_s: float | None = None,
    max_restarts: int = 0,
) -> None:
    """Run `fn(rank, world_size, *args)` on every rank: in this process under torchrun, else on spawned ranks.

    `timeout_s` bounds each wait for a peer (the process group's timeout; 300 s by default), not the run:
    a run that makes progress is never stopped. A rank silent for `watchdog_s` (default
    `watchdog.default_limit(timeout_s)`) is stopped and named. Under torchrun (which sets the world size
    itself, so `world_size` is ignored there) the process joins torchrun's group, runs `fn` with the
    watchdog on a thread of its own and ends as a spawned rank does (`exit_rank`); restarts are then
    torchrun's (`torchrun --max-restarts`). Otherwise this is `spawn`, restarting up to `max_restarts` times.
    """
    wait_s = timeout_s or 300
    limit_s = watchdog_s or watchdog.default_limit(wait_s)
    if not under_torchrun():
        spawn(
            fn,
            world_size,
            args,
            backend=backend,
            threads_per_rank=threads_per_rank,
            wait_timeout_s=wait_s,
            watchdog_s=limit_s,
            max_restarts=max_restarts,
        )
        return
    if max_restarts and not int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")):
        log.warning("under torchrun, restarts are torchrun's: give torchrun --max-restarts %d", max_restarts)
    if threads_per_rank is not None:
        torch.set_num_threads(threads_per_rank)
    rank, world = init_from_env(backend, wait_s)
    watchdog.watch_this_rank(rank, limit_s)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    exit_rank()


def spawn(
    fn: RankFn,
    world_size: int,
    args: tuple[Any, ...] = (),
    *,
    backend: str = "gloo",
    threads_per_rank: int | None = 1,
    timeout_s: float | None = None,
    wait_timeout_s: float | None = None,
    watchdog_s: float | None = None,
    max_restarts: int = 0,
) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` new processes joined in a process group.

    Returns when all ranks return. Raises the first failing rank's error (with its traceback) after
    stopping the others. `fn` must be importable (a module-level function): ranks start as fresh
    interpreters.

    - `timeout_s`: a deadline on the whole run, every restart included (for tests and benchmarks): then
      every rank is stopped and TimeoutError names those still running. None: no deadline.
    - `wait_timeout_s`: the process group's timeout, how long a collective waits for a peer (default
      `timeout_s`, else 300 s).
    - `watchdog_s`: a rank that makes no progress (`heartbeat()`) for this long is stopped, and
      NoProgressError names it, how long it was silent, and whether a signal stopped it. None: no watchdog.
      Keep it above `wait_timeout_s`: a rank in a collective of its own (not conveyor's transport, whose
      waits beat) is silent until the collective ends; before its first beat a rank is starting, and
      has at least `watchdog.MIN_LIMIT_S`.
    - `max_restarts`: when a rank fails (raises, dies, or makes no progress), every rank is stopped and all
      are started again, at most this many times, each restart logged with its cause; a rank reads its
      attempt with `restart_count()`. The deadline is never restarted.
    """
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be 0 or more; got {max_restarts}")
    if watchdog_s is not None and not watchdog_s > 0:
        raise ValueError(f"watchdog_s must be a positive number of seconds (or None: no watchdog); got {watchdog_s}")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    attempt = _Attempt(fn, world_size, args, backend, threads_per_rank, timeout_s, wait_timeout_s, watchdog_s)
    with tempfile.TemporaryDirectory(prefix="conveyor-") as scratch, _terminate_raises():
        beats = watchdog.Heartbeats(os.path.join(scratch, "heartbeats"), world_size) if watchdog_s else None
        try:
            for restarts in range(max_restarts + 1):
                try:
                    attempt.run(os.path.join(scratch, f"rendezvous-{restarts}"), restarts, beats, deadline)
                    return
                except (mp.ProcessRaisedException, mp.ProcessExitedException, NoProgressError) as error:
                    if restarts == max_restarts:
                        if max_restarts:
                            log.error("the run failed after %d restarts, the most allowed", max_restarts)
                        raise
                    log.warning("restart %d of %d after %s", restarts + 1, max_restarts, describe_failure(error))
        finally:
            if beats is not None:
                beats.close()


class _Attempt:
    """One start of every rank, watched until all return or one fails."""

    def __init__(
        self,
        fn: RankFn,
        world_size: int,
        args: tuple[Any, ...],
        backend: str,
        threads_per_rank: int | None,
        timeout_s: float | None,
        wait_timeout_s: float | None,
        watchdog_s: float | None,
    ) -> None:
        self.fn, self.world_size, self.args = fn, world_size, args
        self.backend, self.threads_per_rank = backend, threads_per_rank
        self.timeout_s, self.watchdog_s = timeout_s, watchdog_s
        self.wait_timeout_s = wait_timeout_s or timeout_s or 300

    def run(self, rendezvous: str, restarts: int, beats: watchdog.Heartbeats | None, deadline: float | None) -> None:
        context = mp.start_processes(
            _rank_main,
            args=(
                self.fn,
                self.world_size,
                rendezvous,
                self.backend,
                self.threads_per_rank,
                self.wait_timeout_s,
                restarts,
                None if beats is None else beats.path,
                self.args,
            ),
            nprocs=self.world_size,
            join=False,
            start_method="spawn",
        )
        processes = context.processes
        if beats is not None:
            beats.restart_clocks()
        try:
            while True:
                # A rank that noted its failure has failed, though it may take a while to end (tearing
                # down its process group, Python's shutdown): it is not one that makes no progress.
                failed = [rank for rank, p in enumerate(processes) if p.exitcode not in (None, 0)]
                failed += [rank for rank in [noted_first(rendezvous)] if rank is not None and rank not in failed]
                if failed:
                    raise first_cause(processes, failed, rendezvous, context.error_files)
                running = [p.sentinel for p in processes if p.exitcode is None]
                if not running:
                    return
                if deadline is not None and time.monotonic() > deadline:
                    raise self._past_deadline(processes)
                if beats is not None:
                    self._check_progress(processes, beats)
                multiprocessing.connection.wait(running, timeout=0.5)
        finally:
            _stop(processes)
            for path in context.error_files:  # torch's record of a failed rank's error (ours are in `rendezvous`)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def _past_deadline(self, processes: list[Any]) -> TimeoutError:
        running = [rank for rank, p in enumerate(processes) if p.is_alive()]
        stopped = [rank for rank in running if is_stopped(processes[rank].pid)]
        why = f"; rank(s) {stopped} stopped by a signal (SIGSTOP, or a debugger)" if stopped else ""
        return TimeoutError(
            f"ranks {running} of {self.world_size} were still running after {self.timeout_s:.0f} s{why}"
        )

    def _check_progress(self, processes: list[Any], beats: watchdog.Heartbeats) -> None:
        assert self.watchdog_s is not None
        silent: dict[int, tuple[float, float, bool]] = {}  # rank: its silence, its limit, whether it has beaten
        for rank, process in enumerate(processes):
            if process.exitcode is None:
                started = beats.has_beaten(rank)
                limit_s = self.watchdog_s if started else max(self.watchdog_s, watchdog.MIN_LIMIT_S)
                if (silent_s := beats.silence(rank)) > limit_s:
                    silent[rank] = (silent_s, limit_s, started)
        if not silent:
            return
        # Ranks waiting (without a beat) on a silent rank go silent too: blame a stopped one, else the longest.
        stopped = [rank for rank in silent if is_stopped(processes[rank].pid)]
        rank = stopped[0] if stopped else max(silent, key=lambda r: silent[r][0])
        silent_s, limit_s, started = silent[rank]
        since = "" if started else " since it started"
        what = (
            f"rank {rank} made no progress for {silent_s:.0f} s (the watchdog's limit is {limit_s:g} s: no"
            f" action of its schedule begun, no wait for a peer begun or ended{since})"
        )
        if stopped:
            raise NoProgressError(f"{what}; it is stopped by a signal (SIGSTOP, or a debugger)")
        with contextlib.suppress(ProcessLookupError):
            os.kill(processes[rank].pid, signal.SIGUSR1)  # its threads' stacks (faulthandler, see _rank_main)
            time.sleep(0.5)
        raise NoProgressError(
            f"{what}; it is running but stuck in one call (a kernel, a lock, I/O): its threads' stacks are"
            " printed above"
        )


def _stop(processes: list[Any]) -> None:
    """End the ranks still running (SIGTERM; SIGKILL for a stopped rank, which ignores SIGTERM, and for one
    that does not end within 5 s) and reap them all."""
    for process in processes:
        if process.is_alive():
            if is_stopped(process.pid):
                process.kill()
            else:
                process.terminate()
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """SIGTERM raises SystemExit while the launcher waits, so it stops its ranks and cleans up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _rank_main(
    rank: int,
    fn: RankFn,
    world_size: int,
    rendezvous: str,
    backend: str,
    threads_per_rank: int | None,
    wait_timeout_s: float,
    restarts: int,
    heartbeats: str | None,
    args: tuple[Any, ...],
) -> None:
    os.environ[RESTART_COUNT] = str(restarts)
    if heartbeats is not None:
        watchdog.attach(heartbeats, rank)
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the watchdog asks a stuck rank where it is
    if threads_per_rank is not None:
        torch.set_num_threads(threads_per_rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=wait_timeout_s),
    )
    try:
        fn(rank, world_size, *args)
        heartbeat()  # done: what is left (the group's teardown) is no sign of a stuck rank
    except (KeyboardInterrupt, SystemExit):
        raise  # the launcher stopping this rank, or the rank's own exit status
    except BaseException:
        # Any BaseException, not only an Exception (which is all torch.multiprocessing records):
        # DCP's CheckpointException is one.
        note_failure(rendezvous, rank, traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    exit_rank()


def exit_rank() -> None:
    """End a rank that finished its work, skipping Python's shutdown.

    Threads that torch.distributed leaves behind (gloo's workers and network
    threads) can still be dropping a tensor, which takes the GIL; while Python
    shuts down that aborts the process ("terminate called without an active
    exception"), as this project's tests saw now and then after a rank's last
    collective. A rank has nothing left to do at exit but flush its output.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)

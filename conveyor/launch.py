"""Starting ranks: under torchrun, or spawned by conveyor itself on one machine.

A rank that raises stops the others: the launcher terminates them and raises
the failing rank's error. A deadline turns a hang into a TimeoutError. However
the launcher ends (a rank's error, the deadline, Ctrl-C, SIGTERM), it stops and
reaps every rank and removes its rendezvous folder: nothing is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["default_backend", "exit_rank", "init_from_env", "run_ranks", "spawn", "under_torchrun"]

RankFn = Callable[..., Any]


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
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def run_ranks(
    fn: RankFn,
    world_size: int,
    args: tuple[Any, ...] = (),
    *,
    backend: str = "gloo",
    threads_per_rank: int | None = 1,
    timeout_s: float | None = None,
) -> None:
    """Run `fn(rank, world_size, *args)` on every rank: in this process under torchrun, else on spawned ranks.

    Under torchrun (which sets the world size itself, so `world_size` is ignored there) the process joins
    torchrun's group, runs `fn` and ends as a spawned rank does (`exit_rank`); otherwise this is `spawn`.
    """
    if not under_torchrun():
        spawn(fn, world_size, args, backend=backend, threads_per_rank=threads_per_rank, timeout_s=timeout_s)
        return
    if threads_per_rank is not None:
        torch.set_num_threads(threads_per_rank)
    rank, world = init_from_env(backend, timeout_s or 300)
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
) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` new processes joined in a process group.

    Returns when all ranks return. Raises the first failing rank's error
    (with its traceback) after stopping the others, or TimeoutError naming the
    ranks still running after `timeout_s` seconds. `fn` must be importable
    (a module-level function) because ranks start as fresh interpreters.
    """
    with tempfile.TemporaryDirectory(prefix="conveyor-") as scratch, _terminate_raises():
        rendezvous = os.path.join(scratch, "rendezvous")
        context = mp.start_processes(
            _rank_main,
            args=(fn, world_size, rendezvous, backend, threads_per_rank, timeout_s, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while not context.join(timeout=0.5, grace_period=1.0):  # a stopped rank ignores SIGTERM: kill it soon
                if deadline is not None and time.monotonic() > deadline:
                    running = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                    stopped = [rank for rank in running if _is_stopped(context.processes[rank].pid)]
                    why = f"; rank(s) {stopped} stopped by a signal (SIGSTOP, or a debugger)" if stopped else ""
                    raise TimeoutError(
                        f"ranks {running} of {world_size} were still running after {timeout_s:.0f} s{why}"
                    )
        except mp.ProcessRaisedException as error:
            # torch names the rank whose process ended first, which may be a peer that lost
            # its link to the rank that really failed: name the rank that failed first.
            first = _first_failure(rendezvous)
            if first is None or first[0] == error.error_index:
                raise
            rank, trace = first
            raise mp.ProcessRaisedException(
                f"\n\n-- Process {rank} terminated with the following error:\n{trace}"
                f"(process {error.error_index} failed after it)",
                rank,
                context.processes[rank].pid,
            ) from None
        finally:
            _stop(context.processes)


def _is_stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (state T or t in /proc, on Linux; False where /proc is absent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] in ("T", "t")  # the state follows the command name's ")"


def _stop(processes: list[Any]) -> None:
    """Terminate the ranks still running, kill those that do not stop (or are stopped), and reap them all."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()  # SIGKILL also ends a rank stopped by SIGSTOP
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
    timeout_s: float | None,
    args: tuple[Any, ...],
) -> None:
    if threads_per_rank is not None:
        torch.set_num_threads(threads_per_rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s or 300),
    )
    try:
        fn(rank, world_size, *args)
    except Exception:
        _note_failure(rendezvous, rank, traceback.format_exc())
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


def _note_failure(rendezvous: str, rank: int, trace: str) -> None:
    """Record each rank's failure, and which came first (before its links close and its peers fail in turn)."""
    with open(f"{rendezvous}.failure-{rank}", "w") as file:
        file.write(trace)
    try:
        with open(f"{rendezvous}.first-failure", "x") as file:
            file.write(f"{rank}\n{trace}")
    except FileExistsError:
        pass


_WAITED_FOR = re.compile(r"the message from rank (\d+) over .* did not arrive within")


def _first_failure(rendezvous: str) -> tuple[int, str] | None:
    """The failure to report: the first, or, when that is a wait for a rank that was itself waiting, the wait
    at the end of that chain, which names the rank that stopped (the others only waited on it)."""
    try:
        with open(f"{rendezvous}.first-failure") as file:
            rank, trace = file.read().split("\n", 1)
    except (FileNotFoundError, ValueError):
        return None
    chain = [int(rank)]
    while (waited := _WAITED_FOR.search(trace)) is not None:
        blamed = int(waited.group(1))
        if blamed in chain or not os.path.exists(f"{rendezvous}.failure-{blamed}"):
            break  # the blamed rank did not fail on its own: it is the one that stopped
        with open(f"{rendezvous}.failure-{blamed}") as file:
            trace = file.read()
        chain.append(blamed)
    return chain[-1], trace

"""How much slower a model's layers compute inside a pipeline's rank than in a profile.

A profile runs each layer back to back in one process while the rest of the machine idles. In a pipeline
nearly every compute follows a message, and the other rank computes at the same time. On the 2-CPU VM of
docs/benchmarks.md that made a GPT block 4-8 % slower (its thread's own CPU time grew alike, so the work ran
slower, not later), and a small MLP 13-20 %: the factor depends on the work, so it is measured with the
model's own layers, here, rather than with a synthetic kernel in `measure_transfers`.

The profiling process pairs with one spawned partner over a gloo group of their own (so it works whether or
not torch.distributed is initialized). Rounds of two kinds are interleaved in a shuffled order, so that a
machine drifting for a while shifts both alike: "alone", each layer's work back to back with the partner
idle (the profile's conditions), and "pipeline", each layer's work right after an exchange with the partner,
which then computes about as long as that work took last time (gloo has no way to compute until a message
arrives: a receive's `is_completed` stays False until it is waited on). The slowdown is the ratio of the two
kinds' summed median times.

Not yet good enough to predict with, so nothing turns it on by default: in two benchmark runs minutes apart
on that VM it came out 1.020-1.275 for the same model (docs/benchmarks.md, "Measuring the slowdown in a
pipeline's rank"), where the runs' own errors asked for a steady 1.05 or so.
"""

from __future__ import annotations

import datetime
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["ROUNDS", "measure_pipeline_slowdown"]

ROUNDS = 16
"""Timed rounds of each kind. A round runs every layer's work once."""
WARMUP = 2

_EXCHANGE, _STOP = 0.0, 1.0
"""Commands to the partner, in the first element of each message (the second: seconds to compute)."""


def measure_pipeline_slowdown(
    works: Sequence[Callable[[], Any]], nbytes: int, *, rounds: int = ROUNDS, timeout_s: float = 300
) -> float:
    """How many times longer `works` (each a layer's profiled work) take in a pipeline's rank than back to back:
    the "pipeline" rounds' summed median times over the "alone" rounds' (see the module's doc). Messages carry
    `nbytes`. Takes about 2 x (rounds + WARMUP) x the time of all `works`."""
    if not works:
        raise ValueError("no work to time")
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    numel = max(2, nbytes // 4)
    partner = mp.get_context("spawn").Process(target=_partner, args=(store.port, numel, timeout_s), daemon=True)
    partner.start()
    try:
        group = dist.ProcessGroupGloo(store, 0, 2, datetime.timedelta(seconds=timeout_s))
        times = _timed_rounds(group, works, numel, rounds)
    except BaseException:
        partner.kill()  # it would wait for a message until its timeout
        raise
    finally:
        partner.join(timeout=timeout_s)
        if partner.is_alive():
            partner.kill()
    if partner.exitcode != 0:
        raise RuntimeError(f"the slowdown measurement's partner process failed (exit code {partner.exitcode})")
    alone = sum(statistics.median(t) for t in times["alone"])
    pipeline = sum(statistics.median(t) for t in times["pipeline"])
    return pipeline / alone


def _timed_rounds(
    group: Any, works: Sequence[Callable[[], Any]], numel: int, rounds: int
) -> dict[str, list[list[float]]]:
    """Per kind of round, per work, its times; then tells the partner to stop."""
    message = torch.zeros(numel)
    kinds = ["alone", "pipeline"] * rounds
    random.Random(0).shuffle(kinds)
    times: dict[str, list[list[float]]] = {"alone": [[] for _ in works], "pipeline": [[] for _ in works]}
    last = [0.0 for _ in works]  # each work's latest time: how long the partner computes after its exchange
    after_exchange = False

    def tell(command: float, seconds: float = 0.0) -> None:
        message[0], message[1] = command, seconds
        group.send([message], 1, 0).wait()

    for index, kind in enumerate(["alone", "pipeline"] * WARMUP + kinds):
        if kind == "alone" and after_exchange:
            after_exchange = False
            works[-1]()  # so that the first timed work follows a compute, not the last exchange
        for number, (work, of_work) in enumerate(zip(works, times[kind], strict=True)):
            if kind == "pipeline":
                tell(_EXCHANGE, last[number])
                group.recv([message], 1, 0).wait()
                after_exchange = True
            start = time.perf_counter()
            work()
            last[number] = time.perf_counter() - start
            if index >= 2 * WARMUP:
                of_work.append(last[number])
    tell(_STOP)
    return times


def _partner(port: int, numel: int, timeout_s: float) -> None:
    """The other rank: answers each exchange, then computes for as long as the message says."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    group: Any = dist.ProcessGroupGloo(store, 1, 2, datetime.timedelta(seconds=timeout_s))  # send/recv untyped
    message = torch.zeros(numel)
    work = torch.randn(128, 128)
    while True:
        group.recv([message], 0, 0).wait()
        if float(message[0]) == _STOP:
            return
        group.send([message], 0, 0).wait()
        end = time.perf_counter() + float(message[1])
        while time.perf_counter() < end:
            torch.mm(work, work)

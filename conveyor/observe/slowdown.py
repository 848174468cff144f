"""How much slower a model's layers compute inside a pipeline's rank than in a profile.

A profile runs each layer back to back in one process while the rest of the machine idles. In a pipeline
nearly every compute follows a message, and the other rank computes the model's other layers at the same
time, through the same caches and memory. On the 2-CPU VM of docs/benchmarks-log.md, a GPT's layers computed
2-3 % slower after an exchange with a partner running a small matmul loop, and 7-18 % slower with a partner
streaming through megabytes (a large matmul, a softmax over a vocabulary's logits): the factor depends on
the work of both ranks, so it is measured with the model's own layers on both sides, here, rather than with
a synthetic kernel in `measure_transfers`.

The profiling process pairs with one spawned partner over a gloo group of their own (so it works whether or
not torch.distributed is initialized). The partner builds its own copy of the layers' work (`partner_works`)
and cycles through it whenever told to compute. The profiling process times pairs of rounds, the two in a
shuffled order: "alone", each layer's work back to back with the partner idle (the profile's conditions),
and "pipeline", each layer's work right after an exchange with the partner, which then computes about as
long as that work took last time (gloo has no way to compute until a message arrives: a receive's
`is_completed` stays False until it is waited on). Each pair gives a ratio, its pipeline round's time over
its alone round's, and the slowdown is the median ratio: the two rounds of a pair run within a second of
each other, so a machine whose speed drifts from one minute to the next shifts both alike.
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

ROUNDS = 24
"""Timed pairs of rounds. A round runs every layer's work once."""
WARMUP = 2

_EXCHANGE, _STOP = 0.0, 1.0
"""Commands to the partner, in the first element of each message (the second: seconds to compute)."""

Works = Sequence[Callable[[], Any]]


def measure_pipeline_slowdown(
    works: Works,
    nbytes: int,
    partner_works: Callable[[], Works],
    *,
    rounds: int = ROUNDS,
    timeout_s: float = 300,
) -> float:
    """How many times longer `works` (each a layer's profiled work) take in a pipeline's rank than back to back:
    the median over `rounds` pairs of a pipeline round's time over an alone round's (see the module's doc).
    Messages carry `nbytes`. `partner_works`, called in the partner process, builds the work it computes (it
    is pickled there, so a module-level function or a `functools.partial` of one). Takes about
    2 x (rounds + WARMUP) x the time of all `works`."""
    if not works:
        raise ValueError("no work to time")
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    numel = max(2, nbytes // 4)
    args = (store.port, numel, partner_works, timeout_s)
    partner = mp.get_context("spawn").Process(target=_partner, args=args, daemon=True)
    partner.start()
    try:
        group = dist.ProcessGroupGloo(store, 0, 2, datetime.timedelta(seconds=timeout_s))
        ratios = _paired_ratios(group, works, numel, rounds)
    except BaseException:
        partner.kill()  # it would wait for a message until its timeout
        raise
    finally:
        partner.join(timeout=timeout_s)
        if partner.is_alive():
            partner.kill()
    if partner.exitcode != 0:
        raise RuntimeError(f"the slowdown measurement's partner process failed (exit code {partner.exitcode})")
    return statistics.median(ratios)


def _paired_ratios(group: Any, works: Works, numel: int, rounds: int) -> list[float]:
    """Per timed pair of rounds, its pipeline round's time over its alone round's; then tells the partner to
    stop."""
    message = torch.zeros(numel)
    order = random.Random(0)
    last = [0.0 for _ in works]  # each work's latest time: how long the partner computes after its exchange
    after_exchange = False

    def tell(command: float, seconds: float = 0.0) -> None:
        message[0], message[1] = command, seconds
        group.send([message], 1, 0).wait()

    def timed_round(kind: str) -> float:
        nonlocal after_exchange
        if kind == "alone" and after_exchange:
            after_exchange = False
            works[-1]()  # so that the first timed work follows a compute, not the last exchange
        for number, work in enumerate(works):
            if kind == "pipeline":
                tell(_EXCHANGE, last[number])
                group.recv([message], 1, 0).wait()
                after_exchange = True
            start = time.perf_counter()
            work()
            last[number] = time.perf_counter() - start
        return sum(last)

    ratios = []
    for index in range(WARMUP + rounds):
        kinds = ["alone", "pipeline"]
        order.shuffle(kinds)
        took = {kind: timed_round(kind) for kind in kinds}
        if index >= WARMUP:
            ratios.append(took["pipeline"] / took["alone"])
    tell(_STOP)
    return ratios


def _partner(port: int, numel: int, partner_works: Callable[[], Works], timeout_s: float) -> None:
    """The other rank: answers each exchange, then computes its works in turn for as long as the message says."""
    torch.set_num_threads(1)
    works = partner_works()
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    group: Any = dist.ProcessGroupGloo(store, 1, 2, datetime.timedelta(seconds=timeout_s))  # send/recv untyped
    message = torch.zeros(numel)
    turn = 0
    while True:
        group.recv([message], 0, 0).wait()
        if float(message[0]) == _STOP:
            return
        group.send([message], 0, 0).wait()
        end = time.perf_counter() + float(message[1])
        while time.perf_counter() < end:
            works[turn % len(works)]()
            turn += 1

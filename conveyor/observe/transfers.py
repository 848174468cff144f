"""What a message between two ranks costs, measured on this machine: the simulator's latency, send, recv and
late_recv.

A send and a receive's post are not free on CPU: gloo starts the transfer in the calling thread, and its own
network thread competes with the ranks' compute for the cores. On the 2-CPU VM of docs/benchmarks-log.md a send
kept its rank busy 0.3-0.5 ms on average and a post 0.2-0.8 ms, 12-63 ms per step of a 2-rank ZBV over both
ranks, which a simulator that gave them no time left out of its prediction. So they are measured much as a
pipeline incurs them: two spawned gloo ranks (one thread each), both computing between messages, exchange
tensors through conveyor's own `Transport`, and each send and post is timed where it is called. The posts
come out cheaper than a pipeline's (docs/planning.md, "Messages between ranks"). A post made after its message
arrived is timed apart (`late_recv`): gloo then has the receiver ask the sender to start the transfer.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..launch import spawn
from ..runtime.host_memory import keep_freed_host_memory
from ..runtime.transport import Transport
from .simulate import CostModel

__all__ = ["TransferCosts", "measure_transfers", "with_transfers"]

ROUNDS = 100
WARMUP = 5
COMPUTE_S = 0.01
"""Compute between two messages on each rank: about one stage's action, so gloo's thread competes with it."""


@dataclass(frozen=True)
class TransferCosts:
    """One message of a boundary's size between two ranks (seconds)."""

    latency: float
    """One-way time of a message with both ranks waiting for it: half a median round trip."""
    send: float
    """Mean time a send keeps its rank busy, while both ranks compute between messages."""
    recv: float
    """Mean time posting a receive keeps its rank busy, likewise (posted as its message is sent)."""
    nbytes: int = 0
    """The message size they were measured with."""
    late_recv: float | None = None
    """Mean time posting a receive keeps its rank busy when its message arrived first (None: not measured)."""


def with_transfers(costs: CostModel, transfers: TransferCosts | None) -> CostModel:
    """`costs` with each message costing what `transfers` says (nothing, if not measured)."""
    if transfers is None:
        return dataclasses.replace(costs, latency=0.0, send=0.0, recv=0.0, late_recv=None)
    return dataclasses.replace(
        costs,
        latency=transfers.latency,
        send=transfers.send,
        recv=transfers.recv,
        late_recv=transfers.late_recv,
    )


def measure_transfers(nbytes: int, rounds: int = ROUNDS, timeout_s: float = 120) -> TransferCosts:
    """Measure `TransferCosts` of an `nbytes` message between two spawned gloo ranks on this machine.

    Means, not medians, for the send and the post: their slow instances (several times the median, under
    contention) add up along a step's critical path as the median does not. Takes about `rounds` x 20 ms.
    """
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        spawn(_exchange, 2, (nbytes, rounds, out.name), timeout_s=timeout_s)
        data = json.loads(Path(out.name).read_text())
    return TransferCosts(data["latency"], data["send"], data["recv"], nbytes, data["late_recv"])


def _exchange(rank: int, world: int, nbytes: int, rounds: int, out: str) -> None:
    torch.set_num_threads(1)
    keep_freed_host_memory()  # as a Pipeline does
    forward, backward = ("act", 0, 1), ("grad", 0, 1)  # rank 0 sends activations, rank 1 gradients back
    transport = Transport.open({forward: (0, 1), backward: (1, 0)}, torch.device("cpu"))
    mine, theirs = (forward, backward) if rank == 0 else (backward, forward)
    payload = torch.zeros(max(1, nbytes // 4), dtype=torch.float32)
    work = torch.randn(128, 128)

    round_trips = []
    for _ in range(WARMUP + rounds // 5):
        start = time.perf_counter()
        if rank == 0:
            transport.send(payload, mine)
            transport.recv_now(payload.shape, payload.dtype, theirs)
        else:
            transport.recv_now(payload.shape, payload.dtype, theirs)
            transport.send(payload, mine)
        round_trips.append(time.perf_counter() - start)

    # As a rank of a pipeline does: compute, send its result, post the next receive, compute, use what came.
    sends, posts = [], []
    for index in range(WARMUP + rounds):
        _compute(work, COMPUTE_S / 2)
        outgoing = payload.clone()
        start = time.perf_counter()
        transport.send(outgoing, mine)
        sent = time.perf_counter()
        incoming = transport.recv(payload.shape, payload.dtype, theirs)
        posted = time.perf_counter()
        _compute(work, COMPUTE_S / 2)
        incoming.wait()
        if index >= WARMUP:
            sends.append(sent - start)
            posts.append(posted - sent)

    # A receive posted after its message arrived, while the sender computes on (each rank receives in turn).
    late_posts = []
    for index in range(WARMUP + rounds):
        if index % 2 == rank:
            transport.send(payload.clone(), mine)
            _compute(work, COMPUTE_S)
            continue
        _compute(work, COMPUTE_S / 2)
        start = time.perf_counter()
        incoming = transport.recv(payload.shape, payload.dtype, theirs)
        posted = time.perf_counter()
        incoming.wait()
        _compute(work, COMPUTE_S / 2)
        if index >= WARMUP:
            late_posts.append(posted - start)
    transport.flush()
    gathered: list[list[list[float]]] = [[], []]
    dist.all_gather_object(gathered, [sends, posts, late_posts])
    if rank == 0:
        result = {
            "latency": statistics.median(round_trips[WARMUP:]) / 2,
            "send": statistics.mean(t for of_rank in gathered for t in of_rank[0]),
            "recv": statistics.mean(t for of_rank in gathered for t in of_rank[1]),
            "late_recv": statistics.mean(t for of_rank in gathered for t in of_rank[2]),
        }
        Path(out).write_text(json.dumps(result))


def _compute(work: torch.Tensor, seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        torch.mm(work, work)

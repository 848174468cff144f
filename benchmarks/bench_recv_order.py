"""What a gloo receive costs when it is posted before the matching send, and when after.

Gloo's TCP transport meets sends and receives halfway: a send whose receive
is already posted writes its data at once, in the sender's thread; otherwise
it only announces itself, and the data moves when the receive is posted,
which takes a round trip through both ranks' gloo threads. conveyor's
lowering posts each receive one compute early (`prefetch_receives`) for this
reason. Here rank 0 computes, sends one activation-sized tensor, and computes
on; rank 1 computes, and posts its receive before ("early") or after
("late") that compute. Rank 1 reports what posting the receive and waiting
for the data cost it.

    python benchmarks/bench_recv_order.py [--steps 40] [--size 2 128 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from conveyor import spawn


def busy(ms: float) -> None:
    """Keep this rank's one core computing for `ms` milliseconds."""
    a = torch.randn(256, 256)
    start = time.perf_counter()
    while time.perf_counter() - start < ms / 1e3:
        a = (a @ a).tanh_()


def exchange(rank: int, world: int, order: str, steps: int, size: list[int]) -> None:
    torch.set_num_threads(1)
    payload, buffer = torch.randn(size), torch.empty(size)
    post_ms, wait_ms = [], []
    for _ in range(steps):
        dist.barrier()
        if rank == 0:
            busy(10)  # produce the activation
            work = dist.isend(payload, 1)
            assert work is not None
            busy(30)  # the next micro-batch; rank 1 asks for the data meanwhile
            work.wait()
            continue
        if order == "early":
            start = time.perf_counter()
            work = dist.irecv(buffer, 0)
            post_ms.append(1e3 * (time.perf_counter() - start))
            busy(20)
        else:
            busy(20)
            start = time.perf_counter()
            work = dist.irecv(buffer, 0)
            post_ms.append(1e3 * (time.perf_counter() - start))
        assert work is not None
        start = time.perf_counter()
        work.wait()
        wait_ms.append(1e3 * (time.perf_counter() - start))
    if rank == 1:
        post, wait = post_ms[5:], wait_ms[5:]  # the first exchanges open connections
        print(
            f"{order:5s} receive: posting median {statistics.median(post):6.3f} ms (max {max(post):6.3f}),"
            f" waiting after the compute median {statistics.median(wait):6.3f} ms (max {max(wait):6.3f})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="exchanges per measurement (40)")
    parser.add_argument("--rounds", type=int, default=2, help="times each order is measured, interleaved (2)")
    parser.add_argument("--size", type=int, nargs="+", default=[2, 128, 256], help="tensor shape (2 128 256)")
    args = parser.parse_args()
    if args.steps <= 5:
        parser.error("--steps must be above 5 (the first 5 exchanges are dropped)")
    for _ in range(args.rounds):
        for order in ("early", "late"):
            spawn(exchange, 2, (order, args.steps, args.size), timeout_s=300)


if __name__ == "__main__":
    main()

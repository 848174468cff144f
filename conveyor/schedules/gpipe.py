"""GPipe's fill-drain schedule: all forwards, then all backwards, then one step."""

from __future__ import annotations

from collections.abc import Sequence

from .actions import Action, Kind, Program
from .placement import chain, check_sizes, worker_microbatches

__all__ = ["gpipe"]


def gpipe(num_ranks: int, num_microbatches: int, replicas: Sequence[int] | None = None) -> Program:
    """One stage per rank; every rank keeps all `num_microbatches` activations alive.

    Bubble fraction with equal stage costs: (p - 1) / (m + p - 1). With
    `replicas`, stage s is held by replicas[s] ranks that take its
    micro-batches round-robin (see `one_f_one_b`).
    """
    check_sizes("gpipe", num_ranks, num_microbatches)
    placement = chain("gpipe", num_ranks, num_microbatches, replicas)
    program = Program(placement, num_microbatches, name="gpipe")
    for stage, ranks in enumerate(placement):
        for rank in ranks:
            mbs = worker_microbatches(ranks, rank, num_microbatches)
            forwards = [Action(stage, Kind.FORWARD, mb) for mb in mbs]
            backwards = [Action(stage, Kind.BACKWARD, mb) for mb in mbs]
            program.actions[rank] = [*forwards, *backwards, Action(stage, Kind.STEP)]
    return program

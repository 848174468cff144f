"""1F1B (PipeDream-Flush): warm up with forwards, then alternate one forward and one backward."""

from __future__ import annotations

from collections.abc import Sequence

from .actions import Action, Kind, Program
from .placement import chain, check_sizes, worker_microbatches

__all__ = ["one_f_one_b"]


def one_f_one_b(num_ranks: int, num_microbatches: int, replicas: Sequence[int] | None = None) -> Program:
    """One stage per rank; rank i keeps at most min(p - i, m) activations alive.

    Same bubble as GPipe, (p - 1) / (m + p - 1), with far less memory. Any
    m >= 1 is accepted: with m < p the warm-up is cut to m forwards, which is
    correct but leaves most of the pipeline idle (use m >= p for speed).

    With `replicas` (PipeDream's 1F1B-RR), stage s is held by replicas[s]
    ranks that take its micro-batches round-robin. Each rank admits
    ceil(ranks from its stage on / replicas of its stage) micro-batches before
    its first backward: the same count of work in flight per rank below it as
    without replicas, and PipeDream's NOAM on the input stage.
    """
    check_sizes("1f1b", num_ranks, num_microbatches)
    placement = chain("1f1b", num_ranks, num_microbatches, replicas)
    program = Program(placement, num_microbatches, name="1f1b")
    for stage, ranks in enumerate(placement):
        downstream = sum(len(r) for r in placement[stage:])  # ranks from this stage to the last
        for rank in ranks:
            mbs = worker_microbatches(ranks, rank, num_microbatches)
            warmup = min(-(-downstream // len(ranks)) - 1, len(mbs))
            actions = [Action(stage, Kind.FORWARD, mb) for mb in mbs[:warmup]]
            for k in range(len(mbs) - warmup):
                actions += [Action(stage, Kind.FORWARD, mbs[warmup + k]), Action(stage, Kind.BACKWARD, mbs[k])]
            actions += [Action(stage, Kind.BACKWARD, mb) for mb in mbs[len(mbs) - warmup :]]
            program.actions[rank] = [*actions, Action(stage, Kind.STEP)]
    return program

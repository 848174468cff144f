"""1F1B (PipeDream-Flush): warm up with forwards, then alternate one forward and one backward."""

from __future__ import annotations

from .actions import Action, Kind, Program
from .placement import check_sizes

__all__ = ["one_f_one_b"]


def one_f_one_b(num_stages: int, num_microbatches: int) -> Program:
    """One stage per rank; rank i keeps at most min(p - i, m) activations alive.

    Same bubble as GPipe, (p - 1) / (m + p - 1), with far less memory. Any
    m >= 1 is accepted: with m < p the warm-up is cut to m forwards, which is
    correct but leaves most of the pipeline idle (use m >= p for speed).
    """
    check_sizes("1f1b", num_stages, num_microbatches)
    m = num_microbatches
    program = Program(tuple(range(num_stages)), m, name="1f1b")
    for stage in range(num_stages):
        warmup = min(num_stages - 1 - stage, m)
        actions = [Action(stage, Kind.FORWARD, mb) for mb in range(warmup)]
        for k in range(m - warmup):
            actions += [Action(stage, Kind.FORWARD, warmup + k), Action(stage, Kind.BACKWARD, k)]
        actions += [Action(stage, Kind.BACKWARD, mb) for mb in range(m - warmup, m)]
        program.actions[stage] = [*actions, Action(stage, Kind.STEP)]
    return program

"""GPipe's fill-drain schedule: all forwards, then all backwards, then one step."""

from __future__ import annotations

from .actions import Action, Kind, Program
from .placement import check_sizes

__all__ = ["gpipe"]


def gpipe(num_stages: int, num_microbatches: int) -> Program:
    """One stage per rank; every rank keeps all `num_microbatches` activations alive.

    Bubble fraction with equal stage costs: (p - 1) / (m + p - 1).
    """
    check_sizes("gpipe", num_stages, num_microbatches)
    program = Program(tuple(range(num_stages)), num_microbatches, name="gpipe")
    for stage in range(num_stages):
        forwards = [Action(stage, Kind.FORWARD, mb) for mb in range(num_microbatches)]
        backwards = [Action(stage, Kind.BACKWARD, mb) for mb in range(num_microbatches)]
        program.actions[stage] = [*forwards, *backwards, Action(stage, Kind.STEP)]
    return program

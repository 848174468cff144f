"""The zero-bubble family (Qi et al., 2023): the backward split into B (input gradient) and W (weights).

B is on the critical path (the previous stage waits for it), W is not: it
can run whenever the rank would otherwise wait. The three schedules trade
memory for bubble.
"""

from __future__ import annotations

from .actions import Action, Kind, Program
from .list_scheduling import list_schedule
from .one_f_one_b import one_f_one_b
from .placement import check_sizes, one_rank_each, v_shape

__all__ = ["zb_h1", "zb_h2", "zbv"]


def zb_h1(num_ranks: int, num_microbatches: int) -> Program:
    """ZB-H1: 1F1B's order and 1F1B's activation memory, with rank r's W delayed by r backwards.

    The B chain runs up the pipeline without waiting for weight gradients,
    and each rank's delayed W's fill its cool-down. With equal F, B, W costs
    the bubble is a third of 1F1B's: (p - 1)(F + B - W) per rank. Any m >= 1.
    """
    check_sizes("zb-h1", num_ranks, num_microbatches)
    m = num_microbatches
    base = one_f_one_b(num_ranks, m)
    program = Program(base.placement, m, name="zb-h1")
    for rank in range(num_ranks):
        lag = rank  # the last rank holds p - 1 weight gradients back for the cool-down
        actions: list[Action] = []
        for action in base.actions[rank]:
            if action.kind is Kind.STEP:
                continue
            actions.append(action)
            if action.kind is Kind.BACKWARD and action.mb is not None and action.mb >= lag:
                actions.append(Action(rank, Kind.WEIGHT, action.mb - lag))
        actions += [Action(rank, Kind.WEIGHT, mb) for mb in range(max(0, m - lag), m)]
        program.actions[rank] = [*actions, Action(rank, Kind.STEP)]
    return program


def zb_h2(num_ranks: int, num_microbatches: int) -> Program:
    """ZB-H2: up to 2p - 1 micro-batches in flight per rank, enough to fill every bubble.

    Built by greedy list scheduling (B first, then F within the memory
    budget, else a W). With equal costs and m >= 2p the bubble is zero.
    """
    check_sizes("zb-h2", num_ranks, num_microbatches)
    limits = [2 * num_ranks - 1] * num_ranks
    return list_schedule("zb-h2", range(num_ranks), num_microbatches, limits, split_backward=True)


def zbv(num_ranks: int, num_microbatches: int) -> Program:
    """ZB-V: two stages per rank in a V (rank r holds stages r and 2P-1-r), zero bubble with 1F1B's memory.

    Phases per rank r, writing F0/B0/W0 for its first stage and F1/B1/W1
    for its second: warm up with 2(P - r) - 1 F0s, then r pairs F1 F0, then
    P - r triples F1 B1 W1; the steady phase repeats F0 B0 W0 F1 B1 W1; the
    cool-down runs r pairs B0 B1, then P - r pairs B0 W, then the W's left.
    Needs m >= 2P - 1 (the warm-up alone forwards 2P - 1 micro-batches).
    """
    check_sizes("zbv", num_ranks, num_microbatches)
    p, m = num_ranks, num_microbatches
    if m < 2 * p - 1:
        raise ValueError(f"zbv needs at least 2P - 1 = {2 * p - 1} micro-batches for {p} ranks; got {m}")
    program = Program(one_rank_each(v_shape(p)), m, name="zbv")
    for rank in range(p):
        program.actions[rank] = _zbv_rank(p, m, rank)
    return program


def _zbv_rank(p: int, m: int, rank: int) -> list[Action]:
    down, up = rank, 2 * p - 1 - rank
    counts = {(s, k): 0 for s in (down, up) for k in (Kind.FORWARD, Kind.BACKWARD, Kind.WEIGHT)}
    actions: list[Action] = []

    def run(stage: int, kind: Kind) -> None:
        actions.append(Action(stage, kind, counts[(stage, kind)]))
        counts[(stage, kind)] += 1

    for _ in range(2 * (p - rank) - 1):
        run(down, Kind.FORWARD)
    for _ in range(rank):
        run(up, Kind.FORWARD)
        run(down, Kind.FORWARD)
    for _ in range(p - rank):
        run(up, Kind.FORWARD)
        run(up, Kind.BACKWARD)
        run(up, Kind.WEIGHT)
    while counts[(up, Kind.FORWARD)] < m:
        if counts[(down, Kind.FORWARD)] < m:
            run(down, Kind.FORWARD)
        run(down, Kind.BACKWARD)
        run(down, Kind.WEIGHT)
        run(up, Kind.FORWARD)
        run(up, Kind.BACKWARD)
        run(up, Kind.WEIGHT)
    for _ in range(rank):
        run(down, Kind.BACKWARD)
        run(up, Kind.BACKWARD)
    for _ in range(p - rank):
        run(down, Kind.BACKWARD)
        run(down, Kind.WEIGHT)
    while counts[(up, Kind.WEIGHT)] < m:
        run(up, Kind.WEIGHT)
    while counts[(down, Kind.WEIGHT)] < m:
        run(down, Kind.WEIGHT)
    return [*actions, Action(down, Kind.STEP), Action(up, Kind.STEP)]

"""Greedy list scheduling: build a program by playing the pipeline forward on a unit clock.

The zero-bubble schedules are rules more than fixed patterns: "run a backward
as soon as one is ready; else a forward, if memory allows; else fill the gap
with a pending weight-gradient". This module plays those rules on a clock
where F, B and W each take one tick (B takes two when W is not split off),
and records the order each rank ran its actions in. The result is an
ordinary program: the executor runs it with real costs, and the validator
proves it (deadlock freedom depends only on the order, not the costs).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from .actions import Action, Kind, Program
from .placement import one_rank_each

__all__ = ["list_schedule"]


def list_schedule(
    name: str,
    placement: Sequence[int],
    num_microbatches: int,
    in_flight_limits: Sequence[int],
    split_backward: bool,
) -> Program:
    """The program that the greedy rules produce.

    `in_flight_limits[r]` caps the micro-batch-stages rank r may hold, from
    their F until their backward is complete (W, when split): the schedule's
    activation-memory budget.
    Priorities at each free moment of a rank: a ready B (the oldest first),
    then a ready F (the deepest stage first, so micro-batches reach the loss
    soon), then a pending W (the oldest first); if none is ready the rank
    waits for the next arrival, filling the wait with a W when it has one.
    """
    placement = tuple(placement)
    m, num_stages = num_microbatches, len(placement)
    last = num_stages - 1
    ranks = max(placement) + 1
    local = {r: [s for s in range(num_stages) if placement[s] == r] for r in range(ranks)}
    next_f = dict.fromkeys(range(num_stages), 0)  # next micro-batch each stage forwards
    next_b = dict.fromkeys(range(num_stages), 0)
    forward_end: dict[tuple[int, int], float] = {}
    backward_end: dict[tuple[int, int], float] = {}
    pending_w: dict[int, deque[tuple[int, int]]] = {r: deque() for r in range(ranks)}
    in_flight = dict.fromkeys(range(ranks), 0)
    free_at = dict.fromkeys(range(ranks), 0.0)
    program = Program(one_rank_each(placement), m, {r: [] for r in range(ranks)}, name)
    b_cost = 1.0 if split_backward else 2.0

    def f_ready(s: int) -> float:
        mb = next_f[s]
        if mb >= m:
            return math.inf
        return 0.0 if s == 0 else forward_end.get((s - 1, mb), math.inf)

    def b_ready(s: int) -> float:
        mb = next_b[s]
        if mb >= m or (s, mb) not in forward_end:
            return math.inf
        after = forward_end[(s, mb)]
        return after if s == last else max(after, backward_end.get((s + 1, mb), math.inf))

    def decide(r: int) -> tuple[float, Action | None]:
        now = free_at[r]
        backwards = [(b_ready(s), -s, s) for s in local[r]]
        forwards = [(f_ready(s), -s, s) for s in local[r]] if in_flight[r] < in_flight_limits[r] else []
        ready_b = min((c for c in backwards if c[0] <= now), default=None)
        if ready_b is not None:
            return now, Action(ready_b[2], Kind.BACKWARD, next_b[ready_b[2]])
        ready_f = min(((-s, s) for t, _, s in forwards if t <= now), default=None)
        if ready_f is not None:
            return now, Action(ready_f[1], Kind.FORWARD, next_f[ready_f[1]])
        if pending_w[r]:
            s, mb = pending_w[r][0]
            return now, Action(s, Kind.WEIGHT, mb)
        soonest = min((c for c in backwards + forwards if c[0] < math.inf), default=None)
        if soonest is None:
            return math.inf, None
        s = soonest[2]
        kind = Kind.BACKWARD if soonest in backwards else Kind.FORWARD
        return soonest[0], Action(s, kind, next_b[s] if kind is Kind.BACKWARD else next_f[s])

    total = sum(len(local[r]) for r in range(ranks)) * m * (3 if split_backward else 2)
    for _ in range(total):
        when, action, rank = min(((*decide(r), r) for r in range(ranks)), key=lambda d: (d[0], d[2]))
        if action is None:
            raise ValueError(
                f"{name}: in-flight limits {list(in_flight_limits)} are too small for the pipeline to make progress"
            )
        assert action.mb is not None
        s, mb = action.stage, action.mb
        if action.kind is Kind.FORWARD:
            free_at[rank] = when + 1.0
            forward_end[(s, mb)] = free_at[rank]
            next_f[s] += 1
            in_flight[rank] += 1
        elif action.kind is Kind.BACKWARD:
            free_at[rank] = when + b_cost
            backward_end[(s, mb)] = free_at[rank]
            next_b[s] += 1
            if split_backward:
                pending_w[rank].append((s, mb))
            else:
                in_flight[rank] -= 1
        else:
            free_at[rank] = when + 1.0
            pending_w[rank].popleft()
            in_flight[rank] -= 1
        program.actions[rank].append(action)
    for r in range(ranks):
        program.actions[r] += [Action(s, Kind.STEP) for s in local[r]]
    return program

"""DualPipeV (DeepSeek): the V-shaped, cut-in-half DualPipe, written as its eight phases."""

from __future__ import annotations

from collections import deque

from .actions import Action, Kind, Program
from .placement import check_sizes, one_rank_each, v_shape

__all__ = ["dualpipev"]


def dualpipev(num_ranks: int, num_microbatches: int) -> Program:
    """DualPipeV on P ranks: rank r holds stages r ("down", 0 below) and 2P-1-r ("up", 1 below).

    Micro-batches enter on rank 0, run down the ranks and back up. The
    original overlaps a forward of one stage with a backward of the other
    (to hide MoE all-to-all); here the pair runs back to back, in the same
    order. Some backwards are split (B now, W queued, run later to fill a
    gap); the others run whole. Needs m >= 2P.

    Phases of rank r (F0 = forward of the down stage, B1 = input-gradient of
    the up stage, W = the oldest queued weight-gradient; "full" = a B that is
    the whole backward, with no W):

    1. 2(P-r-1) x F0          5. P-r-1 x (full B1, F1, full B0)
    2. r+1 x (F0, F1)          6. r+1 x (B1, B0), split from the middle on
    3. P-r-1 x (B1, W, F1)     7. P-r-1 x (W, B0)
    4. m-2P+r+1 x (F0, full B1, F1, full B0)     8. r+1 x W
    """
    check_sizes("dualpipev", num_ranks, num_microbatches)
    p, m = num_ranks, num_microbatches
    if m < 2 * p:
        raise ValueError(f"dualpipev needs at least 2P = {2 * p} micro-batches for {p} ranks; got {m}")
    program = Program(one_rank_each(v_shape(p)), m, name="dualpipev")
    for rank in range(p):
        program.actions[rank] = _rank_actions(p, m, rank)
    return program


def _rank_actions(p: int, m: int, rank: int) -> list[Action]:
    stage = {0: rank, 1: 2 * p - 1 - rank}
    forwards = {0: 0, 1: 0}
    backwards = {0: 0, 1: 0}
    queued: deque[Action] = deque()  # split-off weight gradients, oldest first
    actions: list[Action] = []

    def forward(chunk: int) -> None:
        actions.append(Action(stage[chunk], Kind.FORWARD, forwards[chunk]))
        forwards[chunk] += 1

    def backward(chunk: int, split: bool = False) -> None:
        mb = backwards[chunk]
        backwards[chunk] += 1
        actions.append(Action(stage[chunk], Kind.BACKWARD, mb))  # without a W: the whole backward
        if split:
            queued.append(Action(stage[chunk], Kind.WEIGHT, mb))

    def weight() -> None:
        actions.append(queued.popleft())

    for _ in range(2 * (p - rank - 1)):  # 1
        forward(0)
    for _ in range(rank + 1):  # 2
        forward(0)
        forward(1)
    for _ in range(p - rank - 1):  # 3
        backward(1, split=True)
        weight()
        forward(1)
    for _ in range(m - 2 * p + rank + 1):  # 4
        forward(0)
        backward(1)
        forward(1)
        backward(0)
    for _ in range(p - rank - 1):  # 5
        backward(1)
        forward(1)
        backward(0)
    half = (rank + 1) // 2
    for i in range(rank + 1):  # 6: odd ranks split from B1 of the middle pair, even ranks from B0
        backward(1, split=i > half or (i == half and rank % 2 == 1))
        backward(0, split=i >= half)
    for _ in range(p - rank - 1):  # 7
        weight()
        backward(0, split=True)
    while queued:  # 8
        weight()
    return [*actions, Action(stage[0], Kind.STEP), Action(stage[1], Kind.STEP)]

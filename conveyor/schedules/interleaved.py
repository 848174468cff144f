"""Schedules with several stages per rank on a looped placement (stage s on rank s mod P)."""

from __future__ import annotations

from .actions import Action, Kind, Program
from .placement import check_sizes, looped, one_rank_each

__all__ = ["interleaved_1f1b", "looped_bfs"]


def interleaved_1f1b(num_ranks: int, num_microbatches: int, virtual: int) -> Program:
    """Megatron's interleaved 1F1B: each rank runs `virtual` stages and alternates them.

    Micro-batches go through a rank's stages in rounds of P: P forwards on
    the rank's first stage, then P on its second, and so on; backwards walk
    the stages in reverse. Rank r warms up with (v - 1)P + 2(P - 1 - r)
    forwards. Bubble with equal costs: (P - 1) / (v m + P - 1), a v-th of
    1F1B's; memory: about v P + P - 1 - 2r stage-activations on rank r.
    Needs m to be a multiple of P (rounds of P micro-batches).
    """
    check_sizes("interleaved-1f1b", num_ranks, num_microbatches)
    if virtual < 2:
        raise ValueError(f"interleaved-1f1b needs at least 2 stages per rank; got {virtual}: use 1f1b for one")
    if num_microbatches % num_ranks:
        below = num_microbatches // num_ranks * num_ranks
        options = f"{below} or {below + num_ranks}" if below else f"{num_ranks}"
        raise ValueError(
            f"interleaved-1f1b needs micro-batches to be a multiple of ranks ({num_ranks});"
            f" got {num_microbatches}: use {options}"
        )
    p, m, v = num_ranks, num_microbatches, virtual
    program = Program(one_rank_each(looped(p, v)), m, name="interleaved-1f1b")
    total = m * v

    def nth(k: int, rank: int, backward: bool) -> Action:
        """The k-th forward (or backward) of `rank`: rounds of P micro-batches, stage by stage."""
        chunk = (k // p) % v
        if backward:
            chunk = v - 1 - chunk
        mb = (k // (p * v)) * p + k % p
        return Action(chunk * p + rank, Kind.BACKWARD if backward else Kind.FORWARD, mb)

    for rank in range(p):
        warmup = min((v - 1) * p + 2 * (p - 1 - rank), total)
        actions = [nth(k, rank, False) for k in range(warmup)]
        for k in range(total - warmup):
            actions += [nth(warmup + k, rank, False), nth(k, rank, True)]
        actions += [nth(k, rank, True) for k in range(total - warmup, total)]
        program.actions[rank] = actions + [Action(s, Kind.STEP) for s in program.stages_of(rank)]
    return program


def looped_bfs(num_ranks: int, num_microbatches: int, virtual: int) -> Program:
    """Breadth-first looping: each rank runs all micro-batches through its first stage, then its next...

    Then the backwards, last stage first. GPipe's memory (every micro-batch
    of every local stage), but few switches between stages; any m >= 1.
    """
    check_sizes("looped-bfs", num_ranks, num_microbatches)
    program = Program(one_rank_each(looped(num_ranks, virtual)), num_microbatches, name="looped-bfs")
    for rank in range(num_ranks):
        stages = program.stages_of(rank)
        forwards = [Action(s, Kind.FORWARD, mb) for s in stages for mb in range(num_microbatches)]
        backwards = [Action(s, Kind.BACKWARD, mb) for s in reversed(stages) for mb in range(num_microbatches)]
        program.actions[rank] = forwards + backwards + [Action(s, Kind.STEP) for s in stages]
    return program

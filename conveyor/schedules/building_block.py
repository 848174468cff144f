"""Schedules built by repeating a V-shaped building block, whose lifespan sets the memory (V-Min, V-Half).

After Qi et al., "Pipeline Parallelism with Controllable Memory" (NeurIPS 2024): rank r holds stages r
("down") and 2P-1-r ("up"), as in zbv. A *block* says, on a clock of unit slots, when each rank starts
the four passes of micro-batch 0: the forward of its down stage, the forward of its up stage, then the
backward (input gradient) of its up stage and of its down stage. Micro-batch k repeats the block
`PERIOD` slots later; the weight gradients (W) fill the two slots of each period the block leaves free.
A micro-batch's activations live on a rank from its forward to its W, so the span between a rank's
forward and backward of one stage, the block's *lifespan*, fixes how many micro-batches a rank holds.

The spacing between the same pass on neighbouring ranks sets that lifespan: `spacing` slots between a
forward on rank r and on rank r + 1 on the way down, and between the up stage's backwards on the way
back, one slot on the other two legs. The lifespan of rank r's two stages together is then about
(2 spacing + 2) P slots, so it holds about (spacing + 1) / 6 of the micro-batches 1F1B holds (of stages
half the size): spacing 1 is V-Min (a third), 2 is V-Half (a half), 3 two thirds, and 5 holds what
1F1B holds with zbv's bubble (spacing 4 puts two passes of some rank on one slot, whatever the gaps). The
repeated blocks leave the warm-up and cool-down sparse; two passes tighten them: `_squeeze` starts each
pass at the first free slot its inputs allow, provided no rank then holds more than the repeated block
did, and `_fill_weights` keeps that order of forwards and backwards but runs each W where its rank
would otherwise wait, or where the next forward needs the memory.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .actions import Action, Kind, Program
from .placement import check_sizes, one_rank_each, v_shape

__all__ = ["PERIOD", "Block", "v_block", "v_half", "v_min", "v_schedule"]

PERIOD = 6
"""Slots per micro-batch on a rank: F, B and W of each of its two stages, one slot each."""

_PASSES = 4  # forward down, forward up, backward up, backward down

# One unit of work on the slot clock: (stage, kind, micro-batch), kind F, B or W.
Work = tuple[int, Kind, int]


@dataclass(frozen=True)
class Block:
    """Per rank, the slot at which each pass of micro-batch 0 starts (micro-batch k starts PERIOD k later).

    `starts[r]` is (forward of stage r, forward of stage 2P-1-r, backward of stage 2P-1-r, backward of
    stage r). Within a rank the four starts differ modulo PERIOD, so repeated blocks never collide.
    """

    starts: tuple[tuple[int, int, int, int], ...]
    spacing: int

    @property
    def num_ranks(self) -> int:
        return len(self.starts)


@functools.cache
def v_block(num_ranks: int, spacing: int) -> Block:
    """The V-shaped block with `spacing` slots between neighbouring ranks on the way down (and back up for the
    up stage's backward): 1 gives V-Min, 2 V-Half; larger spacings hold more and idle less.

    Where the rank's four passes would collide modulo PERIOD, the block waits a few slots between the up
    stage's forward and backward on rank 0 (`top`) or between the up and down backwards on the last rank
    (`bottom`); of the gaps that avoid every collision, the one whose block holds the fewest micro-batches.
    """
    if num_ranks < 1:
        raise ValueError(f"a V-shaped block needs at least 1 rank; got {num_ranks}")
    if not 1 <= spacing < PERIOD:
        raise ValueError(f"a V-shaped block's spacing is 1 (V-Min) to {PERIOD - 1} slots; got {spacing}")
    candidates = []
    for top in range(PERIOD):
        for bottom in range(PERIOD):
            block = _v_starts(num_ranks, spacing, top, bottom)
            if _apart(block):
                held = max(_peaks(_repeat(block, 2 * num_ranks + 2)).values())
                candidates.append((held, top + bottom, top, block))
    if not candidates:
        fitting = [str(s) for s in range(1, PERIOD) if s != spacing and _fits(num_ranks, s)]
        choices = fitting[0] if len(fitting) == 1 else f"{', '.join(fitting[:-1])} or {fitting[-1]}"
        raise ValueError(
            f"no V-shaped block with spacing {spacing} fits {num_ranks} ranks: some rank's forward and backward"
            f" passes fall on the same slot of every period, whatever the gaps; use spacing {choices}"
        )
    return min(candidates, key=lambda c: c[:3])[3]


def _fits(num_ranks: int, spacing: int) -> bool:
    """Whether some gaps keep every rank's four passes apart modulo PERIOD."""
    return any(_apart(_v_starts(num_ranks, spacing, t, b)) for t in range(PERIOD) for b in range(PERIOD))


def _apart(block: Block) -> bool:
    """Whether each rank's four passes start at different slots modulo PERIOD (repeated blocks never collide)."""
    return all(len({s % PERIOD for s in starts}) == _PASSES for starts in block.starts)


def _v_starts(p: int, spacing: int, top: int, bottom: int) -> Block:
    down_forward = [spacing * r for r in range(p)]
    up_forward = [down_forward[-1] + p - r for r in range(p)]  # the bottom turns at once, then one slot a rank
    up_backward = [up_forward[0] + 1 + top + spacing * r for r in range(p)]
    down_backward = [up_backward[-1] + 1 + bottom + (p - 1 - r) for r in range(p)]
    starts = zip(down_forward, up_forward, up_backward, down_backward, strict=True)
    return Block(tuple(starts), spacing)


def v_schedule(num_ranks: int, num_microbatches: int, spacing: int, name: str | None = None) -> Program:
    """The program of `v_block(num_ranks, spacing)` repeated for `num_microbatches` micro-batches, tightened.

    Split backward (B, then W); any m >= 1. The busiest rank holds the repeated block's peak (fewer for
    small m), counted in micro-batches of one stage: stages are half 1F1B's, so half as many bytes each.
    """
    label = name or f"v-spacing-{spacing}"
    check_sizes(label, num_ranks, num_microbatches)
    p, m = num_ranks, num_microbatches
    repeated = _repeat(v_block(p, spacing), m)
    cap = max(_peaks(repeated).values())
    orders = {
        rank: [work for _, work in sorted(slots.items()) if work[1] is not Kind.WEIGHT]
        for rank, slots in _squeeze(repeated, cap, p).items()
    }
    program = Program(one_rank_each(v_shape(p)), m, name=label)
    for rank, actions in _fill_weights(orders, cap, p).items():
        steps = [Action(rank, Kind.STEP), Action(2 * p - 1 - rank, Kind.STEP)]
        program.actions[rank] = [Action(stage, kind, mb) for stage, kind, mb in actions] + steps
    return program


def v_half(num_ranks: int, num_microbatches: int) -> Program:
    """V-Half: half 1F1B's activation memory, 2 floor((P+2)/2) micro-batches of a (half-size) stage per rank,
    and about half its bubble with equal F, B, W. Any m >= 1."""
    return v_schedule(num_ranks, num_microbatches, 2, "v-half")


def v_min(num_ranks: int, num_microbatches: int) -> Program:
    """V-Min: a third of 1F1B's activation memory, 2 floor((P+4)/3) micro-batches of a (half-size) stage per
    rank, and about two thirds of its bubble with equal F, B, W (more when they differ). Any m >= 1."""
    return v_schedule(num_ranks, num_microbatches, 1, "v-min")


def _repeat(block: Block, m: int) -> dict[int, dict[int, Work]]:
    """Per rank, slot -> work: the block for micro-batches 0..m-1, each W in its rank's first free slot after
    its B (oldest first)."""
    p = block.num_ranks
    timeline: dict[int, dict[int, Work]] = {}
    for rank, starts in enumerate(block.starts):
        down, up = rank, 2 * p - 1 - rank
        passes = ((down, Kind.FORWARD), (up, Kind.FORWARD), (up, Kind.BACKWARD), (down, Kind.BACKWARD))
        slots = {
            start + PERIOD * mb: (stage, kind, mb)
            for start, (stage, kind) in zip(starts, passes, strict=True)
            for mb in range(m)
        }
        waiting: deque[Work] = deque()
        filled: dict[int, Work] = {}
        slot, last = 0, max(slots)
        while slot <= last or waiting:
            if slot in slots:
                filled[slot] = work = slots[slot]
                if work[1] is Kind.BACKWARD:
                    waiting.append((work[0], Kind.WEIGHT, work[2]))
            elif waiting:
                filled[slot] = waiting.popleft()
            slot += 1
        timeline[rank] = filled
    return timeline


def _peaks(timeline: Mapping[int, Mapping[int, Work]]) -> dict[int, int]:
    """Per rank, the most micro-batches held at once: from a forward to its W."""
    peaks = {}
    for rank, slots in timeline.items():
        held = most = 0
        for slot in sorted(slots):
            held += _held_change(slots[slot][1])
            most = max(most, held)
        peaks[rank] = most
    return peaks


def _held_change(kind: Kind) -> int:
    return 1 if kind is Kind.FORWARD else -1 if kind is Kind.WEIGHT else 0


def _inputs(work: Work, num_stages: int) -> list[Work]:
    """The work whose result `work` reads (the stages chain down and back up the V)."""
    stage, kind, mb = work
    if kind is Kind.FORWARD:
        return [(stage - 1, Kind.FORWARD, mb)] if stage > 0 else []
    if kind is Kind.BACKWARD:
        later = [(stage + 1, Kind.BACKWARD, mb)] if stage < num_stages - 1 else []
        return [(stage, Kind.FORWARD, mb), *later]
    return [(stage, Kind.BACKWARD, mb)]


def _squeeze(timeline: Mapping[int, Mapping[int, Work]], cap: int, p: int) -> dict[int, dict[int, Work]]:
    """Move each work, in the order of its slot, to the first free slot its inputs allow, keeping each stage's
    passes in micro-batch order, and moving a forward only where its rank holds fewer than `cap` until the
    forward's old slot. Nothing moves later, so the result never ends after the timeline, nor holds more."""
    end = max(max(slots) for slots in timeline.values()) + 1
    held: dict[int, list[int]] = {}  # per rank and slot, micro-batches held after that slot's work
    for rank, slots in timeline.items():
        count, row = 0, []
        for slot in range(end):
            count += _held_change(slots[slot][1]) if slot in slots else 0
            row.append(count)
        held[rank] = row
    moved: dict[int, dict[int, Work]] = {rank: {} for rank in timeline}
    occupied = {rank: set(slots) for rank, slots in timeline.items()}
    placed: dict[Work, int] = {}
    previous: dict[tuple[int, Kind], int] = {}  # (stage, kind) -> slot of the micro-batch before
    for slot, rank, work in sorted((s, r, w) for r, slots in timeline.items() for s, w in slots.items()):
        stage, kind, _ = work
        earliest = max([placed[w] + 1 for w in _inputs(work, 2 * p)] + [previous.get((stage, kind), -1) + 1])
        change = _held_change(kind)
        target = next(
            (
                t
                for t in range(earliest, slot)
                if t not in occupied[rank] and (change <= 0 or max(held[rank][t:slot]) < cap)
            ),
            slot,
        )
        if target != slot:
            occupied[rank] ^= {slot, target}
            for t in range(target, slot):
                held[rank][t] += change
        placed[work] = previous[(stage, kind)] = target
        moved[rank][target] = work
    return moved


def _fill_weights(orders: Mapping[int, Sequence[Work]], cap: int, p: int) -> dict[int, list[Work]]:
    """Each rank's forwards and backwards in the given order, with every W placed on a unit clock where the
    rank would wait for an input, or where the next forward needs memory (more than `cap` held), else last.

    Always possible: the order came from a timeline that held at most `cap` with W's no earlier than here.
    """
    ranks = sorted(orders)
    position = dict.fromkeys(ranks, 0)
    free_at = dict.fromkeys(ranks, 0.0)
    held = dict.fromkeys(ranks, 0)
    waiting: dict[int, deque[Work]] = {rank: deque() for rank in ranks}
    done: dict[Work, float] = {}
    result: dict[int, list[Work]] = {rank: [] for rank in ranks}

    def choice(rank: int) -> tuple[float, Work] | None:
        """When `rank` next starts work, and which."""
        now = free_at[rank]
        if position[rank] == len(orders[rank]):
            return (now, waiting[rank][0]) if waiting[rank] else None
        work = orders[rank][position[rank]]
        ready = max((done.get(w, math.inf) for w in _inputs(work, 2 * p)), default=0.0)
        if ready <= now and (work[1] is not Kind.FORWARD or held[rank] < cap):
            return now, work
        if waiting[rank]:
            return now, waiting[rank][0]
        assert work[1] is not Kind.FORWARD or held[rank] < cap, "the order holds more than its memory cap"
        return (ready, work) if ready < math.inf else None

    remaining = sum(len(order) for order in orders.values())
    remaining += sum(work[1] is Kind.BACKWARD for order in orders.values() for work in order)
    for _ in range(remaining):
        options = [(option, rank) for rank in ranks if (option := choice(rank)) is not None]
        assert options, "no rank can start: the order is not one a timeline ran"
        (start, work), rank = min(options, key=lambda o: (o[0][0], o[1]))
        free_at[rank] = done[work] = start + 1.0
        result[rank].append(work)
        held[rank] += _held_change(work[1])
        if work[1] is Kind.WEIGHT:
            waiting[rank].popleft()
        else:
            position[rank] += 1
            if work[1] is Kind.BACKWARD:
                waiting[rank].append((work[0], Kind.WEIGHT, work[2]))
    return result

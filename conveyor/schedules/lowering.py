"""Lowering passes: turn a generator's compute-only program into one the executor runs."""

from __future__ import annotations

from .actions import Action, Kind, Program

__all__ = ["fuse_backwards", "insert_transfers", "prefetch_receives", "lower"]


def fuse_backwards(program: Program) -> Program:
    """Run a backward whole where splitting it gains nothing: a W right after its own B,
    when B's input gradient does not leave the rank.

    A split backward costs more than a whole one (two passes through autograd:
    7-14 % more backward on CPU, docs/benchmarks.md); it pays only when W moves
    into a gap, or when B's input gradient is sent on before W runs. When W
    directly follows its B and that gradient goes to no other rank (the first
    stage has none; at the bottom of a V the rank hands it to its own next
    stage, which runs after W anyway), one whole backward in B's place ends when
    W would have, minus the split's cost, so no action anywhere starts later.
    Runs on a generator's compute-only program.
    """
    fused = Program(program.placement, program.num_microbatches, {}, program.name)
    for rank, actions in program.actions.items():
        out: list[Action] = []
        for action in actions:
            previous = out[-1] if out else None
            if (
                action.kind is Kind.WEIGHT
                and previous == Action(action.stage, Kind.BACKWARD, action.mb)
                and _gradient_stays(program, action.stage)
            ):
                continue
            out.append(action)
        fused.actions[rank] = out
    return fused


def _gradient_stays(program: Program, stage: int) -> bool:
    """Whether stage's input gradient stays on its rank (or there is none, on the first stage)."""
    return stage == 0 or program.rank_of(stage - 1) == program.rank_of(stage)


def insert_transfers(program: Program) -> Program:
    """Add a send right after each compute whose result another rank needs, and
    a receive right before each compute that needs another rank's result.

    Neighbouring stages on the same rank hand tensors over in memory, with no
    transfer.
    """
    last = program.num_stages - 1
    lowered = Program(program.placement, program.num_microbatches, {}, program.name)
    for rank, actions in program.actions.items():
        out: list[Action] = []
        for action in actions:
            s, mb = action.stage, action.mb
            if action.kind is Kind.FORWARD:
                if s > 0 and program.rank_of(s - 1) != rank:
                    out.append(Action(s, Kind.RECV_F, mb))
                out.append(action)
                if s < last and program.rank_of(s + 1) != rank:
                    out.append(Action(s, Kind.SEND_F, mb))
            elif action.kind is Kind.BACKWARD:
                if s < last and program.rank_of(s + 1) != rank:
                    out.append(Action(s, Kind.RECV_B, mb))
                out.append(action)
                if s > 0 and program.rank_of(s - 1) != rank:
                    out.append(Action(s, Kind.SEND_B, mb))
            else:
                out.append(action)
        lowered.actions[rank] = out
    return lowered


def prefetch_receives(program: Program) -> Program:
    """Post each receive one compute earlier, so the transfer overlaps that compute.

    A receive only posts a buffer; the compute that reads it waits for the data.
    Receives keep their relative order, so every channel still matches in order.
    A gradient receive stays behind its stage's forward of the same micro-batch,
    which tells it the gradient's shape.
    """
    moved = Program(program.placement, program.num_microbatches, {}, program.name)
    for rank, actions in program.actions.items():
        out: list[Action] = []
        last_compute = -1  # index in `out` of the latest compute action
        for action in actions:
            if action.kind.is_recv and last_compute >= 0 and not _shaped_by(action, out[last_compute]):
                out.insert(last_compute, action)
                last_compute += 1
            else:
                if action.kind.is_compute:
                    last_compute = len(out)
                out.append(action)
        moved.actions[rank] = out
    return moved


def lower(program: Program, prefetch: bool = True, fuse: bool = True) -> Program:
    """The lowering the executor expects: (by default) fusing, transfers, then (by default) prefetching.

    `fuse` runs `fuse_backwards` first, which never delays an action; turn it
    off to see a generator's program exactly as it was written.
    """
    lowered = insert_transfers(fuse_backwards(program) if fuse else program)
    return prefetch_receives(lowered) if prefetch else lowered


def _shaped_by(receive: Action, compute: Action) -> bool:
    return receive.kind is Kind.RECV_B and compute == Action(receive.stage, Kind.FORWARD, receive.mb)

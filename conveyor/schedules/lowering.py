"""Lowering passes: turn a generator's compute-only program into one the executor runs."""

from __future__ import annotations

from .actions import Action, Kind, Program

__all__ = ["insert_transfers", "prefetch_receives", "lower"]


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


def lower(program: Program, prefetch: bool = True) -> Program:
    """The full lowering the executor expects: transfers, then (optionally) prefetching."""
    lowered = insert_transfers(program)
    return prefetch_receives(lowered) if prefetch else lowered


def _shaped_by(receive: Action, compute: Action) -> bool:
    return receive.kind is Kind.RECV_B and compute == Action(receive.stage, Kind.FORWARD, receive.mb)

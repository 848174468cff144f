"""Lowering passes: turn a generator's compute-only program into one the executor runs."""

from __future__ import annotations

from .actions import Action, Kind, Program

__all__ = ["fuse_backwards", "insert_transfers", "prefetch_receives", "lower"]


def fuse_backwards(program: Program) -> Program:
    """Drop each W that directly follows its own B: that backward runs whole, as one B.

    A split backward costs more than a whole one (two passes through
    autograd, a few percent here), which only pays when W moves into a gap.
    Runs on a generator's compute-only program.
    """
    fused = Program(program.placement, program.num_microbatches, {}, program.name)
    for rank, actions in program.actions.items():
        out: list[Action] = []
        for action in actions:
            previous = out[-1] if out else None
            if action.kind is Kind.WEIGHT and previous == Action(action.stage, Kind.BACKWARD, action.mb):
                continue
            out.append(action)
        fused.actions[rank] = out
    return fused


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


def lower(program: Program, prefetch: bool = True, fuse: bool = False) -> Program:
    """The lowering the executor expects: transfers, then (by default) prefetching.

    With `fuse`, a W right after its own B is dropped first (see `fuse_backwards`): measured
    on ZBV (docs/benchmarks.md) it saved about 2 % of a step on CPU, but with equal costs it
    adds a bubble the schedule was built to avoid, so it is off unless asked for.
    """
    lowered = insert_transfers(fuse_backwards(program) if fuse else program)
    return prefetch_receives(lowered) if prefetch else lowered


def _shaped_by(receive: Action, compute: Action) -> bool:
    return receive.kind is Kind.RECV_B and compute == Action(receive.stage, Kind.FORWARD, receive.mb)

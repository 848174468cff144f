"""Lowering passes: turn a generator's compute-only program into one the executor runs."""

from __future__ import annotations

from collections.abc import Collection

from .actions import Action, Kind, Program
from .offload import insert_offloads

__all__ = ["forward_only", "fuse_backwards", "insert_reductions", "insert_transfers", "lower", "prefetch_receives"]


def forward_only(program: Program) -> Program:
    """The forwards of a generator's program, in its order, for evaluation and inference.

    Dropping every backward and step keeps a sound program sound: a forward
    waits only on forwards, which keep their relative order on every rank.
    """
    actions = {rank: [a for a in acts if a.kind is Kind.FORWARD] for rank, acts in program.actions.items()}
    kept = program.derive(actions, f"{program.name} (forward only)" if program.name else "")
    kept.forward_only = True
    kept.weight_versions = kept.microbatches_per_step = None  # a forward-only run uses the weights as they are
    return kept


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
    fused: dict[int, list[Action]] = {}
    for rank, actions in program.actions.items():
        out: list[Action] = []
        for action in actions:
            previous = out[-1] if out else None
            if (
                action.kind is Kind.WEIGHT
                and previous == Action(action.stage, Kind.BACKWARD, action.mb)
                and _gradient_stays(program, action.stage, action.mb)
            ):
                continue
            out.append(action)
        fused[rank] = out
    return program.derive(fused)


def _gradient_stays(program: Program, stage: int, mb: int | None) -> bool:
    """Whether every input gradient of `stage` for `mb` stays on its rank (none leaves the first stage)."""
    return all(program.same_rank(e.src, stage, mb) for e in program.graph.in_edges(stage) if e.grad)


def insert_reductions(program: Program) -> Program:
    """Add a REDUCE for each stage that shares gradients, right after its last backward before each step:
    a stage with tied parameters, and each replica of a replicated stage.

    A REDUCE only starts the sum of the shared gradients (the tied stages' or
    the replicas' ranks exchange them); the STEP behind it waits for the other
    ranks' contributions, so the exchange overlaps whatever the rank runs between.
    """
    tied = {s for tie in program.graph.ties for s in tie.stages}
    tied |= {s for s in range(program.num_stages) if len(program.replicas_of(s)) > 1}
    if not tied:
        return program
    reduced: dict[int, list[Action]] = {}
    for rank, actions in program.actions.items():
        after: dict[int, list[Action]] = {}  # index -> the REDUCEs to insert after that action
        last_backward: dict[int, int] = {}  # stage -> index of its latest B or W since its last STEP
        for index, action in enumerate(actions):
            if action.stage not in tied:
                continue
            if action.kind in (Kind.BACKWARD, Kind.WEIGHT):
                last_backward[action.stage] = index
            elif action.kind is Kind.STEP:
                at = last_backward.pop(action.stage, index - 1)
                after.setdefault(at, []).append(Action(action.stage, Kind.REDUCE, action.mb))
        out = list(after.get(-1, []))
        for index, action in enumerate(actions):
            out += [action, *after.get(index, [])]
        reduced[rank] = out
    return program.derive(reduced)


def insert_transfers(program: Program) -> Program:
    """Add a send right after each compute whose result another rank needs, and
    a receive right before each compute that needs another rank's result, one
    per edge of the stage graph that crosses ranks.

    Stages on the same rank hand tensors over in memory, with no transfer.
    """
    graph = program.graph
    lowered: dict[int, list[Action]] = {}
    for rank, actions in program.actions.items():
        out: list[Action] = []
        for action in actions:
            s, mb = action.stage, action.mb
            if action.kind is Kind.FORWARD:
                for edge in graph.in_edges(s):
                    if not program.same_rank(edge.src, s, mb):
                        out.append(Action(s, Kind.RECV_F, mb, edge.src))
                out.append(action)
                for edge in graph.out_edges(s):
                    if not program.same_rank(edge.dst, s, mb):
                        out.append(Action(s, Kind.SEND_F, mb, edge.dst))
            elif action.kind is Kind.BACKWARD:
                for edge in graph.out_edges(s):
                    if edge.grad and not program.same_rank(edge.dst, s, mb):
                        out.append(Action(s, Kind.RECV_B, mb, edge.dst))
                out.append(action)
                for edge in graph.in_edges(s):
                    if edge.grad and not program.same_rank(edge.src, s, mb):
                        out.append(Action(s, Kind.SEND_B, mb, edge.src))
            else:
                out.append(action)
        lowered[rank] = out
    return program.derive(lowered)


def prefetch_receives(program: Program) -> Program:
    """Post each receive one compute earlier, so the transfer overlaps that compute.

    A receive only posts a buffer; the compute that reads it waits for the data.
    Receives keep their relative order, so every channel still matches in order.
    A gradient receive stays behind its stage's forward of the same micro-batch,
    which tells it the gradient's shape.
    """
    moved: dict[int, list[Action]] = {}
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
        moved[rank] = out
    return program.derive(moved)


def lower(program: Program, prefetch: bool = True, fuse: bool = True, offload: Collection[int] = ()) -> Program:
    """The lowering the executor expects: (by default) fusing, reductions, transfers, then (by default) prefetching,
    and the offloads of the stages in `offload` (`schedules/offload.py`).

    `fuse` runs `fuse_backwards` first, which never delays an action; turn it
    off to see a generator's program exactly as it was written.
    """
    lowered = insert_transfers(insert_reductions(fuse_backwards(program) if fuse else program))
    return insert_offloads(prefetch_receives(lowered) if prefetch else lowered, offload)


def _shaped_by(receive: Action, compute: Action) -> bool:
    return receive.kind is Kind.RECV_B and compute == Action(receive.stage, Kind.FORWARD, receive.mb)

"""Activation offload as program actions: which micro-batches move to host memory between forward and backward.

After PipeOffload (Wan et al., 2025): a micro-batch whose backward comes long after its forward need not keep
its activations on the device in between. `OFFLOAD` (``1OF3``) starts copying what stage 1 saved for micro-batch
3's backward to host memory, right after the forward has handed its outputs on; `RELOAD` (``1RL3``) starts the
copy back one compute before the backward, so that compute hides it; the backward waits until it is there.
Copies run on a copy stream of their own (one per rank, in program order), so they overlap computes; the
simulator charges their time there, and counts an offloaded micro-batch off the device from the end of its
offload to the start of its reload.
"""

from __future__ import annotations

from collections.abc import Collection

from .actions import Action, Kind, Program

__all__ = ["MIN_BETWEEN", "insert_offloads", "offload_stages", "offloaded"]

MIN_BETWEEN = 3
"""Computes a micro-batch's forward and backward must have between them on its rank to be offloaded: one hides
the offload's copy, one the reload's (it runs one compute ahead), and in between its memory is free."""


def offload_stages(spec: str | Collection[int], num_stages: int) -> frozenset[int]:
    """The stages whose activations are offloaded: "none", "all", stage indices as text ("0,2") or a collection."""
    if isinstance(spec, str):
        if spec in ("none", ""):
            return frozenset()
        if spec == "all":
            return frozenset(range(num_stages))
        try:
            stages = [int(word) for word in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"offload is 'none', 'all' or stage indices separated by commas (e.g. '0,1'); got {spec!r}"
            ) from None
    else:
        stages = [int(s) for s in spec]
    wrong = sorted(s for s in stages if not 0 <= s < num_stages)
    if wrong:
        raise ValueError(f"offload names stages {wrong}, but the model has stages 0..{num_stages - 1}")
    return frozenset(stages)


def offloaded(program: Program) -> set[tuple[int, int]]:
    """The (stage, micro-batch) pairs whose activations the program offloads."""
    actions = (a for acts in program.actions.values() for a in acts)
    return {(a.stage, a.mb) for a in actions if a.kind is Kind.OFFLOAD and a.mb is not None}


def insert_offloads(program: Program, stages: Collection[int], min_between: int = MIN_BETWEEN) -> Program:
    """Offload every micro-batch of `stages` whose backward comes at least `min_between` computes after its
    forward on its rank: an OFFLOAD after the forward and its sends, a RELOAD right before the compute that
    precedes the backward. Runs on a lowered program; others (the rest of `stages` too) are left as they are.
    """
    if min_between < 2:
        raise ValueError(
            f"an offloaded micro-batch needs at least 2 computes between its forward and its backward (one hides"
            f" the offload, one the reload); got min_between={min_between}"
        )
    chosen = set(stages)
    if not chosen or program.forward_only:
        return program
    result: dict[int, list[Action]] = {}
    for rank, actions in program.actions.items():
        computes = [i for i, a in enumerate(actions) if a.kind.is_compute]
        order = {actions[i]: n for n, i in enumerate(computes)}  # a compute's position among the rank's computes
        after: dict[int, list[Action]] = {}  # index -> actions to insert after it
        before: dict[int, list[Action]] = {}  # index -> actions to insert before it
        for index, action in enumerate(actions):
            if action.kind is not Kind.FORWARD or action.stage not in chosen or action.mb is None:
                continue
            backward = order.get(Action(action.stage, Kind.BACKWARD, action.mb))
            if backward is None or backward - order[action] - 1 < min_between:
                continue
            last_send = index
            while last_send + 1 < len(actions) and _sends_output_of(actions[last_send + 1], action):
                last_send += 1
            after.setdefault(last_send, []).append(Action(action.stage, Kind.OFFLOAD, action.mb))
            before.setdefault(computes[backward - 1], []).append(Action(action.stage, Kind.RELOAD, action.mb))
        out: list[Action] = []
        for index, action in enumerate(actions):
            out += [*before.get(index, []), action, *after.get(index, [])]
        result[rank] = out
    return program.derive(result)


def _sends_output_of(action: Action, forward: Action) -> bool:
    return action.kind is Kind.SEND_F and (action.stage, action.mb) == (forward.stage, forward.mb)

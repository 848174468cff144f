"""PipeDream's asynchronous pipeline: 1F1B that never flushes, an update after every backward, stashed weights.

A synchronous schedule covers one mini-batch and ends empty. These cover a
stream of mini-batches in one program: the pipeline stays full across
mini-batch boundaries and drains only at the program's end (the end of
training, a checkpoint, an evaluation). Every forward says which weight
version it uses (`Program.weight_versions`: version v is the weights after v
updates of that stage); its backward (and a recompute) must use the same one,
so the runtime keeps that version until then (weight stashing).
"""

from __future__ import annotations

from collections.abc import Sequence

from .actions import Action, Kind, Program
from .one_f_one_b import one_f_one_b
from .placement import check_sizes

__all__ = [
    "noam",
    "pipedream",
    "pipedream_2bw",
    "replica_gradient_scale",
    "step_group",
    "versions_from_steps",
    "versions_held",
]


def noam(num_workers: int, input_replicas: int = 1) -> int:
    """PipeDream's NOAM: how many micro-batches the input stage admits before its first backward."""
    return -(-num_workers // input_replicas)


def pipedream(
    num_ranks: int,
    num_microbatches: int,
    mini_batches: int,
    vertical_sync: bool = False,
    replicas: Sequence[int] | None = None,
) -> Program:
    """PipeDream's asynchronous 1F1B over `mini_batches` mini-batches of `num_microbatches` each.

    Phases of rank r (stage r), over all N = mini_batches * num_microbatches micro-batches:

    1. warm-up: P - r forwards (the input stage admits NOAM = P micro-batches);
    2. steady state: one backward, its optimizer update, one forward;
    3. drain: the remaining backwards and updates, once the stream ends.

    Each forward uses the weights as the stage has them (the version after all
    updates so far on that stage), or with `vertical_sync` the version the
    input stage used for that micro-batch, so that every stage of a
    micro-batch sees the same version.

    With `replicas` (1F1B-RR), stage s is held by replicas[s] ranks that take
    its micro-batches round-robin and step together: each update of the stage
    applies the mean gradient of one micro-batch per replica (see
    `step_group`), and the input stage admits NOAM = ceil(P / its replicas)
    micro-batches per replica.
    """
    check_sizes("pipedream", num_ranks, num_microbatches)
    _check_replicas("pipedream", num_microbatches, replicas)
    total = _stream_length("pipedream", num_microbatches, mini_batches)
    program = _with_updates(one_f_one_b(num_ranks, total, replicas), "pipedream", every=1)
    program.weight_versions = versions_from_steps(program, vertical_sync)
    return program


def pipedream_2bw(
    num_ranks: int, num_microbatches: int, mini_batches: int, replicas: Sequence[int] | None = None
) -> Program:
    """PipeDream-2BW: 1F1B over the stream, gradients accumulated over each mini-batch, double-buffered weights.

    Each stage updates once per mini-batch (after its last backward). Every
    micro-batch of mini-batch t uses version t - 1 (the weights before the
    previous mini-batch's update), so W(t+1) = W(t) - lr * grad f(W(t-1)) with
    SGD, and a stage holds at most two versions. Needs at least P - 1
    micro-batches per mini-batch on P ranks: otherwise a forward would need a
    version its stage has not made yet. With `replicas`, a replicated stage's
    ranks sum their parts of each mini-batch's gradient before the update.
    """
    check_sizes("pipedream-2bw", num_ranks, num_microbatches)
    _check_replicas("pipedream-2bw", num_microbatches, replicas)
    if num_microbatches < num_ranks - 1:
        raise ValueError(
            f"pipedream-2bw on {num_ranks} ranks needs at least P - 1 = {num_ranks - 1} micro-batches per mini-batch"
            f" (a forward would need a weight version its stage has not made); got {num_microbatches}"
        )
    m = num_microbatches
    total = _stream_length("pipedream-2bw", m, mini_batches)
    program = _with_updates(one_f_one_b(num_ranks, total, replicas), "pipedream-2bw", every=m)
    stages = program.num_stages
    program.weight_versions = {(s, k): max(0, k // m - 1) for s in range(stages) for k in range(total)}
    return program


def _check_replicas(name: str, num_microbatches: int, replicas: Sequence[int] | None) -> None:
    """A replicated stage's ranks step together, each after its share of the same micro-batches."""
    for stage, count in enumerate(replicas or ()):
        if num_microbatches % count:
            raise ValueError(
                f"{name}: stage {stage} has {count} replicas, which step together, so the micro-batches of a"
                f" mini-batch must be a multiple of {count}; got {num_microbatches}"
            )


def step_group(program: Program, stage: int) -> int:
    """How many micro-batches one update of `stage` in an asynchronous program applies.

    `microbatches_per_step` of them (1 for pipedream, a mini-batch for 2BW),
    rounded up to a multiple of the stage's replicas: its ranks step
    together, each after its share of the group.
    """
    per = program.microbatches_per_step
    assert per is not None, "a synchronous program steps once, after all its micro-batches"
    replicas = len(program.replicas_of(stage))
    return replicas * -(-per // replicas)


def replica_gradient_scale(program: Program, stage: int) -> float:
    """What the sum of a replicated stage's gradients is multiplied by before its update.

    Every update applies the mean gradient of the micro-batches it covers. A
    micro-batch's loss is weighted for `microbatches_per_step` of them (the
    whole mini-batch in a synchronous program, where the plain sum is that
    mean); a replicated stage of pipedream covers one per replica, so its sum
    is divided by the replicas.
    """
    if not program.asynchronous:
        return 1.0
    per = program.microbatches_per_step
    assert per is not None
    return per / step_group(program, stage)


def _stream_length(name: str, num_microbatches: int, mini_batches: int) -> int:
    if mini_batches < 1:
        raise ValueError(f"{name} needs at least 1 mini-batch in its stream; got {mini_batches}")
    return num_microbatches * mini_batches


def _with_updates(base: Program, name: str, every: int) -> Program:
    """`base` without its flush-time STEPs, with a STEP after every `every`-th backward of each stage.

    A replicated stage's ranks step together after each group of `step_group` micro-batches: each rank
    after its last backward of the group, the STEP named by the group's last micro-batch on every rank.
    """
    program = Program(base.placement, base.num_microbatches, {}, name, microbatches_per_step=every)
    for rank, acts in base.actions.items():
        out: list[Action] = []
        for action in acts:
            if action.kind is Kind.STEP:
                continue
            out.append(action)
            if action.kind is Kind.BACKWARD and action.mb is not None:
                s, k = action.stage, action.mb
                group = step_group(program, s)
                end = (k // group + 1) * group  # one past the group's last micro-batch
                if k + len(base.replicas_of(s)) >= end:  # this rank's next micro-batch of the stage is in the next
                    out.append(Action(s, Kind.STEP, end - 1))
        program.actions[rank] = out
    return program


def versions_from_steps(program: Program, vertical_sync: bool = False) -> dict[tuple[int, int], int]:
    """The version each forward uses when a stage runs the weights it has: its updates before that forward.

    With `vertical_sync`, every stage uses the input stage's version of each micro-batch instead.
    """
    versions: dict[tuple[int, int], int] = {}
    for actions in program.actions.values():
        steps: dict[int, int] = {}
        for action in actions:
            if action.kind is Kind.STEP:
                steps[action.stage] = steps.get(action.stage, 0) + 1
            elif action.kind is Kind.FORWARD and action.mb is not None:
                versions[(action.stage, action.mb)] = steps.get(action.stage, 0)
    if vertical_sync:
        versions = {(s, k): versions[(0, k)] for (s, k) in versions}
    return versions


def versions_held(program: Program) -> dict[int, int]:
    """The most weight versions each stage holds at once: its live weights, and every older version
    that an in-flight micro-batch (forward run, backward not) or a coming forward still needs.

    1 on every stage of a synchronous program: it never needs an old version.
    """
    versions = program.weight_versions
    if versions is None:
        return dict.fromkeys(range(program.num_stages), 1)
    peak: dict[int, int] = {}
    for actions in program.actions.values():
        live: dict[int, int] = {}
        in_flight: dict[int, dict[int, int]] = {}  # stage -> micro-batch -> version
        coming: dict[int, list[int]] = {}  # stage -> versions of forwards still to run, in order
        for action in actions:
            if action.kind is Kind.FORWARD and action.mb is not None:
                coming.setdefault(action.stage, []).append(versions[(action.stage, action.mb)])
        for stage in coming:
            coming[stage].reverse()  # popped from the end as forwards run
        for action in actions:
            s = action.stage
            if action.kind is Kind.FORWARD and action.mb is not None:
                in_flight.setdefault(s, {})[action.mb] = coming[s].pop()
            elif action.kind is Kind.BACKWARD and action.mb is not None:
                in_flight[s].pop(action.mb)
            elif action.kind is Kind.STEP:
                live[s] = live.get(s, 0) + 1
            else:
                continue
            current = live.get(s, 0)
            held = {current} | set(in_flight.get(s, {}).values()) | {v for v in coming.get(s, []) if v < current}
            peak[s] = max(peak.get(s, 0), len(held))
    return peak

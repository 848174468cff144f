"""The validator: proves a program runs to the end, and times it on a unit clock.

Semantics, shared with the executor: a send never blocks; a receive posts a
buffer and never blocks; a compute that reads a received tensor waits until the
matching send has run. Each link (an edge's activations, or its gradients back)
is a channel of its own whose messages match in the order they are posted (NCCL
ignores tags), so each link's sends and receives must agree in order, not just
as sets. A REDUCE never blocks either: it offers the stage's shared gradients,
and the stage's STEP waits until every stage that shares them has offered its
own (a collective of the tied stages, or of a replicated stage's ranks). An
OFFLOAD or RELOAD only starts a copy on the rank's copy stream (copies run one
after another, in program order); a RELOAD's copy follows its OFFLOAD's, and
the backward of an offloaded micro-batch waits until its reload's copy ended.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .actions import Action, Channel, Kind, Program
from .offload import offloaded
from .render import render_steps

__all__ = ["DeadlockError", "ScheduleError", "Timing", "split_backwards", "validate"]

# A message is named by what it carries and is posted by one action:
# ("act", src, dst, mb)   src's outputs for dst (posted by src's SF),
# ("grad", src, dst, mb)  the gradient of dst's inputs from src (posted by dst's SB),
# ("reduce", s, key, r)   stage s's offer of its shared gradients on rank r (posted by its REDUCE; key -1
#                         for a whole mini-batch, else the micro-batch of an asynchronous step),
# ("offload", s, s, mb)   stage s's activations of micro-batch mb are in host memory (its OFFLOAD's copy ended),
# ("reload", s, s, mb)    and back on the device (its RELOAD's copy ended).
Message = tuple[str, int, int, int]

_WHOLE = -1  # the key of a STEP or REDUCE that covers the whole mini-batch


class ScheduleError(ValueError):
    """A program that cannot run correctly; the message shows where."""


class DeadlockError(ScheduleError):
    """Every unfinished rank waits on another: the program would hang."""


@dataclass(frozen=True)
class Timing:
    """When each action of a validated program starts and ends, per rank; and for each OFFLOAD and RELOAD
    (by rank, then index in the rank's actions) when its copy ran on the rank's copy stream."""

    start: dict[int, list[float]]
    end: dict[int, list[float]]
    copies: dict[int, dict[int, tuple[float, float]]] = field(default_factory=dict)

    @property
    def makespan(self) -> float:
        return max((max(ends) for ends in self.end.values() if ends), default=0.0)

    @property
    def span(self) -> float:
        """From the first action's start to the last action's end over all ranks: the synchronous step."""
        return self.makespan - min((t for starts in self.start.values() for t in starts), default=0.0)


def unit_cost(action: Action) -> float:
    """Every compute takes one tick, transfers, reductions, host copies and steps take none."""
    return 1.0 if action.kind.is_compute else 0.0


def _no_copy(action: Action) -> float:
    return 0.0


def validate(
    program: Program,
    cost: Callable[[Action], float] = unit_cost,
    latency: float = 0.0,
    late_recv: float | None = None,
    copy: Callable[[Action], float] | None = None,
) -> Timing:
    """Check `program` and return its timing under `cost`; raise ScheduleError if it cannot run.

    `cost(action)` is how long an action keeps its rank busy; a received
    tensor (or another stage's shared gradient) arrives `latency` after its send.
    With `late_recv`, a receive posted after its message arrived takes that long
    instead (gloo moves a message whose receive was not posted only once the
    receiver tells the sender to start, and that costs the receiver).
    `copy(action)` is how long an OFFLOAD's or RELOAD's copy keeps the rank's
    copy stream busy (0 if None), from the end of the action itself.

    Catches: actions on a rank that does not own their stage, missing or
    repeated computes, steps and reductions, a compute whose input was not
    produced or received before it, transfers over edges the stage graph does
    not have, sends without receives (and the reverse), channels whose sends
    and receives disagree in order, tied stages that reduce in different orders,
    offloads without their reload (or the reverse) or out of order, and
    deadlocks (naming the ranks that wait on each other).
    """
    _check_placement(program)
    _check_computes(program)
    _check_channels(program)
    _check_reductions(program)
    timing = _run(program, cost, latency, late_recv, copy or _no_copy)
    _check_versions(program)
    return timing


def _fail(
    program: Program, rank: int, index: int, why: str, kind: type[ScheduleError] = ScheduleError
) -> ScheduleError:
    action = program.actions[rank][index]
    grid = render_steps(program, mark={(rank, index)})
    return kind(f"{program.name or 'schedule'}: rank {rank}, action {index} ({action}): {why}\n{grid}")


def _check_placement(program: Program) -> None:
    for rank, actions in program.actions.items():
        for index, action in enumerate(actions):
            if not 0 <= action.stage < program.num_stages:
                raise _fail(
                    program, rank, index, f"there is no stage {action.stage} (stages 0..{program.num_stages - 1})"
                )
            if action.mb is not None and not 0 <= action.mb < program.num_microbatches:
                raise _fail(program, rank, index, f"no micro-batch {action.mb} (0..{program.num_microbatches - 1})")
            replicas = program.replicas_of(action.stage)
            if action.kind.optional_mb:  # every replica steps and reduces
                if rank not in replicas:
                    raise _fail(program, rank, index, f"stage {action.stage} lives on ranks {list(replicas)}, not here")
            elif program.rank_of(action.stage, action.mb) != rank:
                owner = program.rank_of(action.stage, action.mb)
                whose = (
                    f"micro-batch {action.mb} of stage {action.stage} runs"
                    if len(replicas) > 1
                    else (f"stage {action.stage} lives")
                )
                raise _fail(program, rank, index, f"{whose} on rank {owner}, not rank {rank}")


def split_backwards(program: Program) -> set[tuple[int, int | None]]:
    """The (stage, micro-batch) pairs whose backward is split: a W action exists for them.

    For every other pair, B is the whole backward.
    """
    return {(a.stage, a.mb) for actions in program.actions.values() for a in actions if a.kind is Kind.WEIGHT}


def _check_computes(program: Program) -> None:
    """Each stage runs each micro-batch's F and B exactly once (W at most once); STEP and REDUCE never repeat."""
    what = program.name or "schedule"
    computes = (Kind.FORWARD,) if program.forward_only else (Kind.FORWARD, Kind.BACKWARD)
    wanted: set[tuple[int, Kind, int | None]] = {
        (s, kind, mb) for s in range(program.num_stages) for kind in computes for mb in range(program.num_microbatches)
    }
    seen: Counter[tuple[int, Kind, int | None]] = Counter()
    collective: Counter[tuple[int, Kind, int | None, int]] = Counter()  # STEP and REDUCE: once on each replica
    for rank, actions in program.actions.items():
        for index, a in enumerate(actions):
            if a.kind.is_transfer:
                continue
            if program.forward_only and a.kind is not Kind.FORWARD:
                raise _fail(program, rank, index, "a forward-only program runs forwards and their transfers only")
            if a.kind is Kind.REDUCE and not program.shares_gradients(a.stage):
                raise _fail(program, rank, index, f"stage {a.stage} shares no parameter with another stage or rank")
            if a.kind.optional_mb:
                collective[(a.stage, a.kind, a.mb, rank)] += 1
            else:
                seen[(a.stage, a.kind, a.mb)] += 1
    for (stage, kind, mb, _), n in collective.items():  # each replica's count must be 1
        seen[(stage, kind, mb)] = max(seen[(stage, kind, mb)], n)
    for stage, kind, mb, rank in sorted(collective, key=str):
        missing_on = [r for r in program.replicas_of(stage) if (stage, kind, mb, r) not in collective]
        if missing_on:
            raise ScheduleError(
                f"{what}: rank {rank} runs {Action(stage, kind, mb)} but rank {missing_on[0]}, another replica of"
                f" stage {stage}, does not: a replicated stage's ranks step and reduce together"
                f"\n{render_steps(program)}"
            )
    # W, STEP and REDUCE are optional (a program may accumulate gradients over several runs), but never repeated.
    wanted |= {key for key in seen if key[1] in (Kind.WEIGHT, Kind.STEP, Kind.REDUCE)}
    repeated = sorted(str(Action(s, k, mb)) for (s, k, mb), n in seen.items() if n > 1)
    missing = sorted(str(Action(s, k, mb)) for (s, k, mb) in wanted - set(seen))
    if repeated or missing:
        runs = "F" if program.forward_only else "F and B (and W if split)"
        raise ScheduleError(
            f"{what}: every stage must run each micro-batch's {runs} once, and STEP and REDUCE at most once"
            f" per mini-batch or micro-batch; missing {missing or 'none'}, repeated {repeated or 'none'}"
            f"\n{render_steps(program)}"
        )
    for s in range(program.num_stages):
        keys = {mb for (stage, kind, mb) in seen if stage == s and kind is Kind.STEP}
        if None in keys and len(keys) > 1:
            raise ScheduleError(
                f"{what}: stage {s} steps both once per mini-batch ({s}STEP) and after single micro-batches;"
                f" use one or the other\n{render_steps(program)}"
            )


def _edge_of(program: Program, action: Action) -> str | None:
    """Why a transfer's peer is wrong, or None if the stage graph has that edge (with a gradient, for SB/RB)."""
    assert action.peer is not None
    _, src, dst = action.link
    if not 0 <= action.peer < program.num_stages:
        return f"there is no stage {action.peer} to talk to"
    try:
        edge = program.graph.edge(src, dst)
    except KeyError:
        return f"the stage graph has no edge from stage {src} to stage {dst}"
    if action.kind in (Kind.SEND_B, Kind.RECV_B) and (not edge.grad or program.forward_only):
        return f"the edge {src}->{dst} carries no gradient"
    return None


def _message_of(action: Action) -> Message:
    """The message a transfer sends or receives."""
    kind, src, dst = action.link
    assert action.mb is not None
    return (kind, src, dst, action.mb)


def _check_channels(program: Program) -> None:
    """Every send meets one receive, in the same order on each link."""
    sends: dict[Channel, list[tuple[Message, int, int]]] = {}
    recvs: dict[Channel, list[tuple[Message, int, int]]] = {}
    channels = program.channels()
    for rank, actions in program.actions.items():
        for index, action in enumerate(actions):
            if not action.kind.is_transfer:
                continue
            problem = _edge_of(program, action)
            if problem is not None:
                raise _fail(program, rank, index, problem)
            assert action.peer is not None and action.mb is not None
            if program.same_rank(action.stage, action.peer, action.mb):
                raise _fail(
                    program, rank, index, "both stages live on this rank: they hand over in memory, not by a transfer"
                )
            book = sends if action.kind.is_send else recvs
            book.setdefault(program.channel(action.link, action.mb), []).append((_message_of(action), rank, index))
    for channel in sorted(set(sends) | set(recvs)):
        sent, received = sends.get(channel, []), recvs.get(channel, [])
        sender_rank, receiver_rank = channels[channel]
        what = f"link {channel[0]} of edge {channel[1]}->{channel[2]}"
        if len(channel) > 3:
            what += f" from rank {sender_rank} to rank {receiver_rank}"
        for position in range(max(len(sent), len(received))):
            if position >= len(received):
                _, rank, index = sent[position]
                raise _fail(program, rank, index, f"send has no matching receive on rank {receiver_rank} ({what})")
            if position >= len(sent):
                _, rank, index = received[position]
                raise _fail(program, rank, index, f"receive has no matching send on rank {sender_rank} ({what})")
            if sent[position][0] != received[position][0]:
                _, rank, index = received[position]
                sender, at = sent[position][1:]
                raise _fail(
                    program,
                    rank,
                    index,
                    f"message {position} on {what} is sent as {program.actions[sender][at]} (rank {sender}) but"
                    " received as this action: a link's messages match in posting order",
                )


def _check_reductions(program: Program) -> None:
    """Stages that share parameters, and the replicas of a stage, offer their gradients for the same steps,
    in the same order."""
    order: dict[int, list[int]] = {}
    where: dict[int, tuple[int, int]] = {}
    for rank, actions in program.actions.items():
        reduces: dict[int, list[int]] = {}
        for index, action in enumerate(actions):
            if action.kind is Kind.REDUCE:
                reduces.setdefault(action.stage, []).append(_WHOLE if action.mb is None else action.mb)
                where.setdefault(action.stage, (rank, index))
        for stage, keys in reduces.items():
            if order.setdefault(stage, keys) != keys:
                raise _fail(
                    program,
                    rank,
                    actions.index(Action(stage, Kind.REDUCE, keys[0] if keys[0] != _WHOLE else None)),
                    f"the replicas of stage {stage} reduce for different steps or in another order"
                    f" ({_keys(order[stage])} against {_keys(keys)})",
                )
    for tie in program.graph.ties:
        first = tie.stages[0]
        for other in tie.stages[1:]:
            if order.get(other, []) != order.get(first, []):
                rank, index = where.get(other, where.get(first, (program.replicas_of(other)[0], 0)))
                if not program.actions.get(rank):
                    raise ScheduleError(f"{program.name or 'schedule'}: tied stages {tie.stages} never reduce")
                raise _fail(
                    program,
                    rank,
                    index,
                    f"stages {first} and {other} share a parameter but reduce for different steps or in another"
                    f" order ({_keys(order.get(first, []))} against {_keys(order.get(other, []))})",
                )


def _check_versions(program: Program) -> None:
    """In an asynchronous program each forward names a weight version its stage has made by then."""
    versions = program.weight_versions
    if versions is None:
        _check_no_step_in_flight(program)
        return
    for rank, actions in program.actions.items():
        steps: dict[int, int] = {}
        for index, action in enumerate(actions):
            if action.kind is Kind.STEP:
                steps[action.stage] = steps.get(action.stage, 0) + 1
            elif action.kind is Kind.FORWARD and action.mb is not None:
                version = versions.get((action.stage, action.mb))
                made = steps.get(action.stage, 0)
                if version is None:
                    raise _fail(program, rank, index, "an asynchronous program names no weight version for it")
                if not 0 <= version <= made:
                    raise _fail(
                        program,
                        rank,
                        index,
                        f"uses weight version {version}, but stage {action.stage} has made versions 0..{made} by then",
                    )
            elif action.kind is Kind.WEIGHT:
                raise _fail(program, rank, index, "an asynchronous program runs each backward whole (no W)")


def _check_no_step_in_flight(program: Program) -> None:
    """Without weight versions, a step must not change weights that an in-flight micro-batch's backward needs."""
    for rank, actions in program.actions.items():
        in_flight: dict[int, set[int]] = {}
        for index, action in enumerate(actions):
            if action.kind is Kind.FORWARD and action.mb is not None:
                in_flight.setdefault(action.stage, set()).add(action.mb)
            elif action.kind is Kind.BACKWARD and action.mb is not None:
                in_flight.get(action.stage, set()).discard(action.mb)
            elif action.kind is Kind.STEP and in_flight.get(action.stage):
                waiting = sorted(in_flight[action.stage])
                raise _fail(
                    program,
                    rank,
                    index,
                    f"steps while micro-batches {waiting} of stage {action.stage} wait for their backward: without"
                    " weight versions (an asynchronous program) their backward would use other weights than"
                    " their forward",
                )


def _keys(keys: list[int]) -> str:
    return "[" + ", ".join("mini-batch" if k == _WHOLE else f"micro-batch {k}" for k in keys) + "]"


def _backward_done(program: Program, stage: int, mb: int, split: set[tuple[int, int | None]]) -> Action:
    """The action after which micro-batch `mb`'s gradients of `stage` are complete."""
    return Action(stage, Kind.WEIGHT if (stage, mb) in split else Kind.BACKWARD, mb)


def _local_prerequisites(
    program: Program, rank: int, action: Action, split: set[tuple[int, int | None]], moved: set[tuple[int, int]]
) -> list[Action]:
    """What must already have run on `rank` before `action` (`moved`: the offloaded stages and micro-batches)."""
    s, mb, graph = action.stage, action.mb, program.graph
    if action.kind is Kind.OFFLOAD:
        return [Action(s, Kind.FORWARD, mb)]
    if action.kind is Kind.RELOAD:
        return [Action(s, Kind.OFFLOAD, mb)]
    if action.kind is Kind.FORWARD:
        return [
            Action(e.src, Kind.FORWARD, mb) if program.same_rank(e.src, s, mb) else Action(s, Kind.RECV_F, mb, e.src)
            for e in graph.in_edges(s)
        ]
    if action.kind is Kind.BACKWARD:
        needs = [Action(s, Kind.FORWARD, mb)]
        if (s, mb) in moved:
            needs.append(Action(s, Kind.RELOAD, mb))
        for e in graph.out_edges(s):
            if e.grad:
                same = program.same_rank(e.dst, s, mb)
                needs.append(Action(e.dst, Kind.BACKWARD, mb) if same else Action(s, Kind.RECV_B, mb, e.dst))
        return needs
    if action.kind in (Kind.SEND_F, Kind.RECV_B):  # a gradient's shape is that of the forward's output
        return [Action(s, Kind.FORWARD, mb)]
    if action.kind is Kind.SEND_B:
        return [Action(s, Kind.BACKWARD, mb)]
    if action.kind is Kind.WEIGHT:
        return [Action(s, Kind.BACKWARD, mb)]
    if action.kind in (Kind.STEP, Kind.REDUCE):
        replicas = program.replicas_of(s)
        # A whole mini-batch's step needs all of this rank's micro-batches; an asynchronous step named by
        # micro-batch `mb` this rank's last one up to `mb` (its earlier ones ran before, in order).
        window = range(program.num_microbatches) if mb is None else range(max(0, mb - len(replicas) + 1), mb + 1)
        mine = [k for k in window if program.rank_of(s, k) == rank]
        needs = [_backward_done(program, s, k, split) for k in mine]
        if action.kind is Kind.STEP and program.shares_gradients(s):
            needs.append(Action(s, Kind.REDUCE, mb))
        return needs
    return []


def _awaited(program: Program, rank: int, action: Action, moved: set[tuple[int, int]]) -> list[Message]:
    """The messages from other ranks (or other stages' offers, or the rank's own copies) an action on `rank`
    waits for."""
    s, mb, graph = action.stage, action.mb, program.graph
    if action.kind is Kind.FORWARD and mb is not None:
        return [("act", e.src, s, mb) for e in graph.in_edges(s) if not program.same_rank(e.src, s, mb)]
    if action.kind is Kind.BACKWARD and mb is not None:
        reload: list[Message] = [("reload", s, s, mb)] if (s, mb) in moved else []
        return reload + [
            ("grad", s, e.dst, mb) for e in graph.out_edges(s) if e.grad and not program.same_rank(e.dst, s, mb)
        ]
    if action.kind is Kind.RELOAD and mb is not None:
        return [("offload", s, s, mb)]
    if action.kind is Kind.STEP:
        key = _WHOLE if mb is None else mb
        sharing = sorted(set(graph.tied_with(s)) | {s})
        return [("reduce", t, key, r) for t in sharing for r in program.replicas_of(t) if (t, r) != (s, rank)]
    return []


def _posted(program: Program, rank: int, action: Action) -> Message | None:
    """The message an action on `rank` sends, if any."""
    if action.kind.is_send:
        return _message_of(action)
    if action.kind is Kind.REDUCE:
        return ("reduce", action.stage, _WHOLE if action.mb is None else action.mb, rank)
    if action.kind.is_host_copy and action.mb is not None:
        return ("offload" if action.kind is Kind.OFFLOAD else "reload", action.stage, action.stage, action.mb)
    return None


def _run(
    program: Program,
    cost: Callable[[Action], float],
    latency: float,
    late_recv: float | None,
    copy: Callable[[Action], float],
) -> Timing:
    """Run all ranks on a clock, one action at a time, until done or stuck."""
    ranks = sorted(program.actions)
    split = split_backwards(program)
    moved = offloaded(program)
    copy_stream_free = dict.fromkeys(ranks, 0.0)
    copies: dict[int, dict[int, tuple[float, float]]] = {rank: {} for rank in ranks}
    position = dict.fromkeys(ranks, 0)
    clock = dict.fromkeys(ranks, 0.0)
    done: dict[int, set[Action]] = {rank: set() for rank in ranks}
    sent_at: dict[Message, float] = {}
    start: dict[int, list[float]] = {rank: [] for rank in ranks}
    end: dict[int, list[float]] = {rank: [] for rank in ranks}
    while True:
        progressed = False
        for rank in ranks:
            actions = program.actions[rank]
            while position[rank] < len(actions):
                index = position[rank]
                action = actions[index]
                for need in _local_prerequisites(program, rank, action, split, moved):
                    if need not in done[rank]:
                        raise _fail(program, rank, index, f"needs {need}, which has not run on this rank before it")
                awaited = _awaited(program, rank, action, moved)
                if any(message not in sent_at for message in awaited):
                    break
                # What another rank sent arrives `latency` after its send; a stage on this rank hands over at once.
                arrivals = [sent_at[m] + (latency if _sender(program, m)[0] != rank else 0.0) for m in awaited]
                begin = max([clock[rank], *arrivals])
                clock[rank] = begin + cost(action)
                if late_recv is not None and action.kind.is_recv:
                    message = _message_of(action)
                    if message in sent_at and sent_at[message] + latency <= begin:
                        clock[rank] = begin + late_recv
                start[rank].append(begin)
                end[rank].append(clock[rank])
                posted = _posted(program, rank, action)
                if action.kind.is_host_copy:  # the copy follows the rank's earlier copies on its copy stream
                    copy_start = max(clock[rank], copy_stream_free[rank])
                    copy_stream_free[rank] = copy_start + copy(action)
                    copies[rank][index] = (copy_start, copy_stream_free[rank])
                    assert posted is not None
                    sent_at[posted] = copy_stream_free[rank]
                elif posted is not None:
                    sent_at[posted] = clock[rank]
                done[rank].add(action)
                position[rank] += 1
                progressed = True
        if all(position[rank] == len(program.actions[rank]) for rank in ranks):
            return Timing(start, end, copies)
        if not progressed:
            raise _deadlock(program, position)


def _sender(program: Program, message: Message) -> tuple[int, Action]:
    """The rank and action that post `message`."""
    if message[0] == "reduce":
        _, stage, key, rank = message
        return rank, Action(stage, Kind.REDUCE, None if key == _WHOLE else key)
    if message[0] in ("offload", "reload"):
        kind, stage, _, mb = message
        return program.rank_of(stage, mb), Action(stage, Kind.OFFLOAD if kind == "offload" else Kind.RELOAD, mb)
    kind, src, dst, mb = message
    if kind == "act":
        return program.rank_of(src, mb), Action(src, Kind.SEND_F, mb, dst)
    return program.rank_of(dst, mb), Action(dst, Kind.SEND_B, mb, src)


def _deadlock(program: Program, position: dict[int, int]) -> DeadlockError:
    """Name the ranks that wait on each other, and what each waits for."""
    sent = _posted_before(program, position)
    moved = offloaded(program)
    waiting_on: dict[int, tuple[int, Action]] = {}
    for rank, index in position.items():
        if index == len(program.actions[rank]):
            continue
        action = program.actions[rank][index]
        missing = [m for m in _awaited(program, rank, action, moved) if m not in sent]
        waiting_on[rank] = _sender(program, missing[0])
    # Follow the wait-for edges from any waiting rank until a rank repeats: that is the cycle.
    rank = next(iter(waiting_on))
    path: list[int] = []
    while rank not in path and rank in waiting_on:
        path.append(rank)
        rank = waiting_on[rank][0]
    cycle = path[path.index(rank) :] if rank in path else path
    lines = [
        f"rank {r} waits at {program.actions[r][position[r]]} for {waiting_on[r][1]} on rank {waiting_on[r][0]}"
        for r in cycle
    ]
    marks = {(r, position[r]) for r in waiting_on}
    grid = render_steps(program, mark=marks)
    return DeadlockError(
        f"{program.name or 'schedule'} deadlocks: ranks {', '.join(map(str, cycle))} wait on each other in a cycle:\n  "
        + "\n  ".join(lines)
        + f"\n{grid}"
    )


def _posted_before(program: Program, position: dict[int, int]) -> set[Message]:
    """Messages posted by the actions each rank ran before getting stuck."""
    posted: set[Message] = set()
    for rank, index in position.items():
        for action in program.actions[rank][:index]:
            message = _posted(program, rank, action)
            if message is not None:
                posted.add(message)
    return posted

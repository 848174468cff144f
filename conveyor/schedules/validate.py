"""The validator: proves a program runs to the end, and times it on a unit clock.

Semantics, shared with the executor: a send never blocks; a receive posts a
buffer and never blocks; a compute that reads a received tensor waits until the
matching send has run. Each link (stage s's activations to s + 1, or its input
gradients to s - 1) is a channel of its own whose messages match in the order
they are posted (NCCL ignores tags), so each link's sends and receives must
agree in order, not just as sets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .actions import Action, Kind, Program
from .render import render_steps

__all__ = ["DeadlockError", "ScheduleError", "Timing", "split_backwards", "validate"]

# A message is named by what it carries: ("act", s, mb) is stage s's output,
# ("grad", s, mb) the gradient of stage s's input.
Message = tuple[str, int, int]


class ScheduleError(ValueError):
    """A program that cannot run correctly; the message shows where."""


class DeadlockError(ScheduleError):
    """Every unfinished rank waits on another: the program would hang."""


@dataclass(frozen=True)
class Timing:
    """When each action of a validated program starts and ends, per rank."""

    start: dict[int, list[float]]
    end: dict[int, list[float]]

    @property
    def makespan(self) -> float:
        return max((max(ends) for ends in self.end.values() if ends), default=0.0)


def unit_cost(action: Action) -> float:
    """Every compute takes one tick, transfers and steps take none."""
    return 1.0 if action.kind.is_compute else 0.0


def validate(program: Program, cost: Callable[[Action], float] = unit_cost, latency: float = 0.0) -> Timing:
    """Check `program` and return its timing under `cost`; raise ScheduleError if it cannot run.

    `cost(action)` is how long an action keeps its rank busy; a received
    tensor arrives `latency` after its send.

    Catches: actions on a rank that does not own their stage, missing or
    repeated computes, a compute whose input was not produced or received
    before it, sends without receives (and the reverse), channels whose sends
    and receives disagree in order, and deadlocks (naming the ranks that wait
    on each other).
    """
    _check_placement(program)
    _check_computes(program)
    _check_channels(program)
    return _run(program, cost, latency)


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
            if program.rank_of(action.stage) != rank:
                owner = program.rank_of(action.stage)
                raise _fail(program, rank, index, f"stage {action.stage} lives on rank {owner}, not rank {rank}")
            if action.mb is not None and not 0 <= action.mb < program.num_microbatches:
                raise _fail(program, rank, index, f"no micro-batch {action.mb} (0..{program.num_microbatches - 1})")


def split_backwards(program: Program) -> set[tuple[int, int | None]]:
    """The (stage, micro-batch) pairs whose backward is split: a W action exists for them.

    For every other pair, B is the whole backward.
    """
    return {(a.stage, a.mb) for actions in program.actions.values() for a in actions if a.kind is Kind.WEIGHT}


def _check_computes(program: Program) -> None:
    """Each stage runs each micro-batch's F and B exactly once (and W at most once: if it splits the backward)."""
    wanted: set[tuple[int, Kind, int | None]] = {
        (s, kind, mb)
        for s in range(program.num_stages)
        for kind in (Kind.FORWARD, Kind.BACKWARD)
        for mb in range(program.num_microbatches)
    }
    seen: Counter[tuple[int, Kind, int | None]] = Counter()
    for actions in program.actions.values():
        seen.update((a.stage, a.kind, a.mb) for a in actions if a.kind.is_compute)
    # W and STEP are optional (a program may accumulate gradients over several runs), but never repeated.
    for actions in program.actions.values():
        seen.update((a.stage, a.kind, None) for a in actions if a.kind is Kind.STEP)
    wanted |= {key for key in seen if key[1] in (Kind.WEIGHT, Kind.STEP)}
    repeated = sorted(str(Action(s, k, mb)) for (s, k, mb), n in seen.items() if n > 1)
    missing = sorted(str(Action(s, k, mb)) for (s, k, mb) in wanted - set(seen))
    if repeated or missing:
        raise ScheduleError(
            f"{program.name or 'schedule'}: every stage must run each micro-batch's F and B (and W if split) once,"
            " and STEP at most once;"
            f" missing {missing or 'none'}, repeated {repeated or 'none'}\n{render_steps(program)}"
        )


def _message_sent(program: Program, action: Action) -> tuple[Message, int]:
    """What a send carries and to which rank."""
    assert action.mb is not None
    if action.kind is Kind.SEND_F:
        return ("act", action.stage, action.mb), program.rank_of(action.stage + 1)
    return ("grad", action.stage, action.mb), program.rank_of(action.stage - 1)


def _message_received(program: Program, action: Action) -> tuple[Message, int]:
    """What a receive expects and from which rank."""
    assert action.mb is not None
    if action.kind is Kind.RECV_F:
        return ("act", action.stage - 1, action.mb), program.rank_of(action.stage - 1)
    return ("grad", action.stage + 1, action.mb), program.rank_of(action.stage + 1)


def _has_neighbour(program: Program, action: Action) -> bool:
    if action.kind in (Kind.SEND_F, Kind.RECV_B):
        return action.stage + 1 < program.num_stages
    return action.stage > 0


def _check_channels(program: Program) -> None:
    """Every send meets one receive, in the same order on each link."""
    sends: dict[tuple[str, int], list[tuple[Message, int, int]]] = {}
    recvs: dict[tuple[str, int], list[tuple[Message, int, int]]] = {}
    for rank, actions in program.actions.items():
        for index, action in enumerate(actions):
            if not (action.kind.is_send or action.kind.is_recv):
                continue
            if not _has_neighbour(program, action):
                raise _fail(program, rank, index, "there is no neighbouring stage on that side to talk to")
            if action.kind.is_send:
                message, peer = _message_sent(program, action)
                book = sends
            else:
                message, peer = _message_received(program, action)
                book = recvs
            if peer == rank:
                raise _fail(
                    program, rank, index, "both stages live on this rank: they hand over in memory, not by a transfer"
                )
            book.setdefault(message[:2], []).append((message, rank, index))
    for link in sorted(set(sends) | set(recvs)):
        sent, received = sends.get(link, []), recvs.get(link, [])
        what = f"link {link[0]} of stage {link[1]}"
        sender_rank, receiver_rank = program.links()[link]
        for position in range(max(len(sent), len(received))):
            if position >= len(received):
                message, rank, index = sent[position]
                raise _fail(program, rank, index, f"send has no matching receive on rank {receiver_rank} ({what})")
            if position >= len(sent):
                message, rank, index = received[position]
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


def _local_prerequisites(
    program: Program, action: Action, split: set[tuple[int, int | None]]
) -> list[tuple[Kind, int, int | None]]:
    """What must already have run on this rank before `action` (as (kind, stage, mb))."""
    s, mb, last = action.stage, action.mb, program.num_stages - 1
    local = program.rank_of(s)
    if action.kind is Kind.FORWARD:
        if s == 0:
            return []
        return [(Kind.FORWARD, s - 1, mb) if program.rank_of(s - 1) == local else (Kind.RECV_F, s, mb)]
    if action.kind is Kind.BACKWARD:
        needs = [(Kind.FORWARD, s, mb)]
        if s < last:
            needs.append((Kind.BACKWARD, s + 1, mb) if program.rank_of(s + 1) == local else (Kind.RECV_B, s, mb))
        return needs
    if action.kind is Kind.SEND_F:
        return [(Kind.FORWARD, s, mb)]
    if action.kind is Kind.SEND_B:
        return [(Kind.BACKWARD, s, mb)]
    if action.kind is Kind.RECV_B:
        return [(Kind.FORWARD, s, mb)]  # the gradient's shape is that of the forward's output
    if action.kind is Kind.WEIGHT:
        return [(Kind.BACKWARD, s, mb)]
    if action.kind is Kind.STEP:
        return [(Kind.WEIGHT if (s, m) in split else Kind.BACKWARD, s, m) for m in range(program.num_microbatches)]
    return []


def _awaited_message(program: Program, action: Action) -> Message | None:
    """The message a compute waits for, if its input comes from another rank."""
    s, mb = action.stage, action.mb
    if mb is None:
        return None
    if action.kind is Kind.FORWARD and s > 0 and program.rank_of(s - 1) != program.rank_of(s):
        return ("act", s - 1, mb)
    if action.kind is Kind.BACKWARD and s < program.num_stages - 1 and program.rank_of(s + 1) != program.rank_of(s):
        return ("grad", s + 1, mb)
    return None


def _run(program: Program, cost: Callable[[Action], float], latency: float) -> Timing:
    """Run all ranks on a clock, one action at a time, until done or stuck."""
    ranks = sorted(program.actions)
    split = split_backwards(program)
    position = dict.fromkeys(ranks, 0)
    clock = dict.fromkeys(ranks, 0.0)
    done: dict[int, set[tuple[Kind, int, int | None]]] = {rank: set() for rank in ranks}
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
                for need in _local_prerequisites(program, action, split):
                    if need not in done[rank]:
                        what = Action(need[1], need[0], need[2])
                        raise _fail(program, rank, index, f"needs {what}, which has not run on this rank before it")
                message = _awaited_message(program, action)
                if message is not None and message not in sent_at:
                    break
                begin = max(clock[rank], sent_at.get(message, 0.0) if message else 0.0)
                clock[rank] = begin + cost(action)
                start[rank].append(begin)
                end[rank].append(clock[rank])
                if action.kind.is_send:
                    sent_at[_message_sent(program, action)[0]] = clock[rank] + latency
                done[rank].add((action.kind, action.stage, action.mb))
                position[rank] += 1
                progressed = True
        if all(position[rank] == len(program.actions[rank]) for rank in ranks):
            return Timing(start, end)
        if not progressed:
            raise _deadlock(program, position)


def _deadlock(program: Program, position: dict[int, int]) -> DeadlockError:
    """Name the ranks that wait on each other, and what each waits for."""
    waiting_on: dict[int, tuple[int, Action]] = {}
    for rank, index in position.items():
        if index == len(program.actions[rank]):
            continue
        action = program.actions[rank][index]
        kind, stage, mb = _awaited_message(program, action) or ("act", -1, -1)
        send = Action(stage, Kind.SEND_F if kind == "act" else Kind.SEND_B, mb)
        waiting_on[rank] = (program.rank_of(stage), send)
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

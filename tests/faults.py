"""Fault injection: one rank of a training run is killed, stopped or raises at a random action.

`trial(seed)` draws a schedule, a number of ranks, a victim rank, an action of its
program and a fault, trains two steps with every rank's pipeline waiting at most
`WAIT_S` for a peer, and reports how the run ended: how long every rank took to
exit, and whether the error names the victim. Used by tests/test_faults_distributed.py
(a few trials per run of the suite) and benchmarks/fault_trials.py (many, recorded).
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from conveyor import Pipeline, manual_split, spawn
from conveyor.schedules import SCHEDULES, Action, PipelineSpec, build_schedule

FAULTS = ("kill", "stop", "raise")
WAIT_S = 2.0  # each pipeline wait
DEADLINE_S = 30.0  # the launcher's: a run still going then has hung
M = 4


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class Plan:
    schedule: str
    ranks: int
    victim: int
    action: int
    fault: str

    def describe(self, program_actions: list[Action] | None = None) -> str:
        at = f" ({program_actions[self.action]})" if program_actions else ""
        return f"{self.fault} rank {self.victim} of {self.ranks} at action {self.action}{at} of {self.schedule}"


@dataclass(frozen=True)
class Outcome:
    plan: Plan
    seconds: float
    named: bool
    error: str


def draw(seed: int, ranks_from: tuple[int, ...] = (2, 3)) -> Plan:
    rng = random.Random(seed)
    schedule = rng.choice(sorted(SCHEDULES))
    ranks = rng.choice(ranks_from)
    program = _program(schedule, ranks)
    victim = rng.randrange(ranks)
    return Plan(schedule, ranks, victim, rng.randrange(len(program.actions[victim])), rng.choice(FAULTS))


def _program(schedule: str, ranks: int):  # type: ignore[no-untyped-def]
    info = SCHEDULES[schedule]
    m = 2 * ranks if info.default_virtual > 1 else M
    if info.asynchronous:
        return build_schedule(PipelineSpec(schedule, ranks, m), mini_batches=2)
    return build_schedule(PipelineSpec(schedule, ranks, m))


class _Injector:
    """A tracer that does the fault when the victim reaches its action."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.seen = plan, 0

    def action_started(self, action: Action) -> None:
        if self.seen == self.plan.action:
            if self.plan.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.plan.fault == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                raise InjectedFault(f"injected into rank {self.plan.victim} at {action}")
        self.seen += 1

    def action_ended(self, action: Action) -> None:
        pass

    def waited(self, action: Action, start: float, end: float) -> None:
        pass


def _rank(rank: int, world: int, plan: Plan) -> None:
    info = SCHEDULES[plan.schedule]
    m = 2 * world if info.default_virtual > 1 else M
    stages = world * info.default_virtual
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(stages)])
    pipe = Pipeline(
        manual_split(model, stages),
        PipelineSpec(plan.schedule, world, m),
        loss_fn=F.mse_loss,
        timeout_s=WAIT_S,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.01),
    )
    if rank == plan.victim:
        pipe.tracer = _Injector(plan)
    x = torch.randn(2 * m, 4, generator=torch.Generator().manual_seed(1))
    if info.asynchronous:
        for _ in pipe.stream([(x, x), (x, x)], 2):
            pass
    else:
        pipe.step(x, x)
    pipe.close()


def trial(seed: int, ranks_from: tuple[int, ...] = (2, 3)) -> Outcome:
    plan = draw(seed, ranks_from)
    start = time.monotonic()
    error = ""
    try:
        spawn(_rank, plan.ranks, (plan,), timeout_s=DEADLINE_S)
    except (mp.ProcessRaisedException, mp.ProcessExitedException, TimeoutError) as raised:
        error = f"{type(raised).__name__}: {raised}"
    return Outcome(plan, time.monotonic() - start, _names(error, plan.victim), error)


def _names(error: str, victim: int) -> bool:
    """Whether the error points at the victim: its own error, its death, a peer's wait for it, or the deadline."""
    patterns = [
        rf"Process {victim} terminated",  # its traceback (raise) or its signal (kill)
        rf"process {victim} terminated with signal",
        rf"the message from rank {victim} over",  # a peer's bounded wait (stop)
        rf"could not send to rank {victim} over",  # a peer's send to it (kill)
        rf"ranks \[{victim}\] of \d+ were still running",  # the launcher's deadline (stop, nobody waiting)
        rf"rank\(s\) \[{victim}\] stopped by a signal",  # the deadline, while peers still wait (stop)
    ]
    return any(re.search(p, error) for p in patterns)

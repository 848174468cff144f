"""Fault injection: one rank of a training run is killed, stopped or raises at a random action.

`trial(seed)` draws a schedule, a number of ranks, a victim rank, an action of its
program and a fault, trains two steps with every rank's pipeline waiting at most
`WAIT_S` for a peer, and reports how the run ended: how long every rank took to
exit, and whether the error names the victim.

`restart_trial(seed, folder)` runs `conveyor train`'s ranks under the launcher's
restarts instead: one or two faults, each in its own attempt at a random action of
the whole run, and checks that the run ends as one that nothing interrupted, bit for
bit: every tensor of its last checkpoint (weights, optimizer state, data position,
RNG) equal.

Used by tests/test_faults_distributed.py (a few trials per run of the suite) and
benchmarks/fault_trials.py (many, recorded).
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from conveyor import Pipeline, checkpoint, manual_split, spawn
from conveyor.launch import restart_count
from conveyor.runtime.executor import Executor
from conveyor.schedules import SCHEDULES, Action, PipelineSpec, build_schedule
from conveyor.train import TrainConfig, train_rank

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


# Restarts: `conveyor train`'s ranks, a checkpoint every 2 of 6 steps, waits of RESTART_WAIT_S, the watchdog
# at three times that, and one restart more than the faults (at most 2) need.
RESTART_STEPS = 6
CHECKPOINT_EVERY = 2
RESTART_WAIT_S = 5.0
WATCHDOG_S = 15.0
MAX_RESTARTS = 3
RESTART_DEADLINE_S = 600.0  # the launcher's, over every attempt: a trial still going then has hung


@dataclass(frozen=True)
class Fault:
    victim: int
    action: int  # counted from the start of its attempt, over every step
    kind: str

    def describe(self) -> str:
        return f"{self.kind} rank {self.victim} at action {self.action}"


@dataclass(frozen=True)
class RestartPlan:
    schedule: str
    ranks: int
    faults: tuple[Fault, ...]  # the first in the first attempt, the second in the second

    def describe(self) -> str:
        faults = "; then ".join(f.describe() for f in self.faults)
        return f"{self.schedule} on {self.ranks} ranks: {faults}"


@dataclass(frozen=True)
class RestartOutcome:
    plan: RestartPlan
    seconds: float
    restarts: list[str]  # the launcher's log line of each restart
    equal: bool  # every tensor of the last checkpoint equals the uninterrupted run's
    error: str  # how the run failed, or which tensor differs; "" when it ended as it should


def restart_config(schedule: str, ranks: int, folder: Path) -> TrainConfig:
    """A small `conveyor train` run whose checkpoints go to `folder`."""
    info = SCHEDULES[schedule]
    m = 2 * ranks  # what every schedule accepts (a multiple of P, at least 2P)
    return TrainConfig(
        ranks=ranks,
        schedule=schedule,
        microbatches=m,
        batch_size=2 * m,
        steps=RESTART_STEPS,
        context=16,
        dim=16,
        heads=2,
        layers=ranks * info.default_virtual,
        progress=False,
        checkpoint_dir=str(folder),
        checkpoint_every=CHECKPOINT_EVERY,
        timeout_s=RESTART_WAIT_S,
        watchdog_s=WATCHDOG_S,
    )


def draw_restarts(seed: int, ranks_from: tuple[int, ...] = (2, 3)) -> RestartPlan:
    """A schedule, a number of ranks, and one or two faults, each at any action of the victim's whole run."""
    rng = random.Random(seed)
    schedule = rng.choice(sorted(SCHEDULES))
    ranks = rng.choice(ranks_from)
    faults = []
    for _ in range(rng.choice((1, 1, 2))):
        victim = rng.randrange(ranks)
        faults.append(Fault(victim, rng.randrange(_actions_per_run(schedule, ranks, victim)), rng.choice(FAULTS)))
    return RestartPlan(schedule, ranks, tuple(faults))


def _actions_per_run(schedule: str, ranks: int, victim: int) -> int:
    """The actions `victim` runs in an uninterrupted run of RESTART_STEPS mini-batches."""
    m = 2 * ranks
    if SCHEDULES[schedule].asynchronous:  # a stream from checkpoint to checkpoint
        one = build_schedule(PipelineSpec(schedule, ranks, m), mini_batches=CHECKPOINT_EVERY)
        return len(one.actions[victim]) * (RESTART_STEPS // CHECKPOINT_EVERY)
    return len(build_schedule(PipelineSpec(schedule, ranks, m)).actions[victim]) * RESTART_STEPS


def restart_trial(seed: int, folder: Path, ranks_from: tuple[int, ...] = (2, 3)) -> RestartOutcome:
    """Run plan `seed` under restarts in `folder` and compare its last checkpoint with an uninterrupted run's
    (made once per schedule and ranks in `folder`)."""
    plan = draw_restarts(seed, ranks_from)
    reference = _uninterrupted(plan.schedule, plan.ranks, folder / f"reference-{plan.schedule}-{plan.ranks}")
    config = restart_config(plan.schedule, plan.ranks, folder / f"trial-{seed}")
    restarts: list[str] = []
    start = time.monotonic()
    error = ""
    with _launcher_log(restarts):
        try:
            spawn(
                _train_rank_with_faults,
                plan.ranks,
                (config, plan),
                wait_timeout_s=config.timeout_s,
                watchdog_s=config.watchdog_s,
                max_restarts=MAX_RESTARTS,
                timeout_s=RESTART_DEADLINE_S,
            )
        except (mp.ProcessRaisedException, mp.ProcessExitedException, TimeoutError) as raised:
            error = f"{type(raised).__name__}: {raised}"
    seconds = time.monotonic() - start
    equal = False
    if not error:
        error = _differences(reference, checkpoint.latest(config.checkpoint_dir))
        equal = not error
    return RestartOutcome(plan, seconds, restarts, equal, error)


def _uninterrupted(schedule: str, ranks: int, folder: Path) -> Path:
    """The last checkpoint of the run without faults (trained once, then reused)."""
    done = checkpoint.latest(folder)
    if done is not None and done.name == f"step-{RESTART_STEPS}":
        return done
    config = restart_config(schedule, ranks, folder)
    spawn(train_rank, ranks, (config,), wait_timeout_s=config.timeout_s, timeout_s=RESTART_DEADLINE_S)
    last = checkpoint.latest(folder)
    assert last is not None
    return last


def _train_rank_with_faults(rank: int, world: int, config: TrainConfig, plan: RestartPlan) -> None:
    attempt = restart_count()
    if attempt < len(plan.faults) and plan.faults[attempt].victim == rank:
        fault = plan.faults[attempt]
        injector = _Injector(Plan(plan.schedule, plan.ranks, rank, fault.action, fault.kind))
        built = Executor.__init__

        def with_injector(self: Executor, *args: object, **kwargs: object) -> None:
            built(self, *args, **kwargs)  # type: ignore[arg-type]
            self.tracer = injector

        Executor.__init__ = with_injector  # type: ignore[method-assign]
    train_rank(rank, world, config)


class _launcher_log:  # noqa: N801 - used as a context manager
    """Collects the launcher's log lines of restarts."""

    def __init__(self, into: list[str]) -> None:
        self._into = into
        self._handler = logging.Handler(logging.WARNING)
        self._handler.emit = lambda record: into.append(record.getMessage())  # type: ignore[method-assign]

    def __enter__(self) -> None:
        logging.getLogger("conveyor.launch").addHandler(self._handler)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("conveyor.launch").removeHandler(self._handler)


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in metadata.items() if hasattr(m, "size")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


def _differences(reference: Path, last: Path | None) -> str:
    """ "" when `last` holds the same tensors as `reference`, bit for bit; else what differs."""
    if last is None or last.name != reference.name:
        return f"the last checkpoint is {last}, not {reference.name}"
    one, other = checkpoint_tensors(reference), checkpoint_tensors(last)
    if one.keys() != other.keys():
        return f"the checkpoints hold different tensors: {sorted(one.keys() ^ other.keys())[:5]}"
    differ = [key for key in one if not torch.equal(one[key], other[key])]
    return f"{len(differ)} of {len(one)} tensors differ, e.g. {differ[:3]}" if differ else ""

"""Train a plan for real and time its steps: what the plan benchmarks compare predictions with.

Ranks are spawned by `conveyor.spawn` (gloo, one torch thread each); the pipeline is built from the plan
(`split_with_plan`, its schedule, stages per rank, micro-batches and recompute) with AdamW, and each step
is timed on rank 0 between two barriers, as the simulator's synchronous step is defined. `measure_plans`
runs several plans in the same ranks, one step of each in turn, so that a machine whose speed drifts from
one second to the next slows them alike and their ratio holds.

The machine these run on is shared. As `bench_schedules.py` does, each rank reads how long its main thread
(which does all compute, one torch thread) queued for a CPU during each step (the kernel's schedstat), and
a step in which some rank queued for more than DISTURBED of it counts as disturbed; `Measured.median` is
the median of the undisturbed steps when at least half are, else of all (and says so). Before each run the
parent waits (up to a minute) until other processes use less than QUIET_CORES.

The measured steps are traced too: how long each action kept its rank busy (computes without their wait for
inputs, sends, receive posts, optimizer steps), so that a prediction's error splits in three. `replayed_step`
simulates the plan with the runs' per-kind times (each stage's mean F, B, W, whole backward and optimizer
step, send and post: a step adds up instances, slow ones too, so the mean is the one number that predicts
it) in place of the profile's: its difference from the prediction is the profile's error (its times against
the runs', on a machine whose speed drifts), and its difference from the measured step the schedule model's.
`Measured.replayed_each` simulates each step with each of its actions' own times: what is left between it
and the measured step is what the simulator's semantics miss; between it and `replayed_step`, what timing
every instance of a kind by one number misses (slow instances on closely coupled ranks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from bench_schedules import run_delay  # benchmarks/ is on the path of a script run from it

from conveyor import Pipeline, spawn
from conveyor.models import GPT, lm_loss
from conveyor.models.gpt2 import gpt2_lm, logits_loss
from conveyor.observe.profile import LayerProfile
from conveyor.observe.simulate import simulate
from conveyor.observe.timeline import Span
from conveyor.observe.trace import Recorder, gather_spans
from conveyor.plan import Plan, profile_model, split_with_plan, stage_costs
from conveyor.schedules import Action, Kind, PipelineSpec, Program, build_schedule, validate
from conveyor.split import Split

WARMUP = 2
DISTURBED = 0.10
QUIET_CORES = 0.1


@dataclass
class Measured:
    """Step times of runs of one plan, and how long the ranks queued for a CPU in each step."""

    times: list[float] = field(default_factory=list)
    queued: list[float] = field(default_factory=list)
    """Per step: the most any rank's main thread waited for a CPU (seconds)."""
    foreign_cores: list[float] = field(default_factory=list)
    """Per run: CPU cores other processes used while the parent waited to start it."""
    actions: list[dict[str, dict[str, float]]] = field(default_factory=list)
    """Per run: each stage's mean time of each kind of compute and of its optimizer step (`action_means`)."""
    transfers: list[dict[str, float]] = field(default_factory=list)
    """Per run: the mean time a send ("send") and a receive's post ("recv") kept its rank busy."""
    each: list[float] = field(default_factory=list)
    """Per step: the step simulated with each of its actions' own times (`replay_each`)."""

    def action_times(self) -> dict[int, dict[str, float]]:
        """Per stage and kind of compute (and "step"), the mean over runs of the runs' means."""
        kinds: dict[int, dict[str, list[float]]] = {}
        for run in self.actions:
            for stage, times in run.items():
                for kind, t in times.items():
                    kinds.setdefault(int(stage), {}).setdefault(kind, []).append(t)
        return {s: {k: statistics.mean(ts) for k, ts in by.items()} for s, by in kinds.items()}

    def transfer_times(self) -> dict[str, float]:
        """The mean over runs of each run's mean send and receive post."""
        return {kind: statistics.mean(run[kind] for run in self.transfers) for kind in ("send", "recv")}

    @property
    def undisturbed(self) -> list[float]:
        return [t for t, q in zip(self.times, self.queued, strict=True) if q <= DISTURBED * t]

    @property
    def median(self) -> float:
        return self._median_of_kept(self.times)

    @property
    def replayed_each(self) -> float:
        """The median of `each` over the steps `median` takes."""
        return self._median_of_kept(self.each)

    def _median_of_kept(self, values: list[float]) -> float:
        """The median of `values` (one per step) over the undisturbed steps when at least half are, else all."""
        kept = [v for v, t, q in zip(values, self.times, self.queued, strict=True) if q <= DISTURBED * t]
        return statistics.median(kept if 2 * len(kept) >= len(self.times) else values)

    @property
    def disturbed_too_often(self) -> bool:
        return 2 * len(self.undisturbed) < len(self.times)

    def to_json(self) -> dict[str, object]:
        return {
            "median_s": self.median,
            "median_all_steps_s": statistics.median(self.times),
            "steps_s": self.times,
            "queued_s": self.queued,
            "undisturbed_steps": len(self.undisturbed),
            "disturbed_too_often": self.disturbed_too_often,
            "foreign_cores_before_runs": self.foreign_cores,
            "action_times_s": {str(s): times for s, times in self.action_times().items()},
            "transfer_times_s": self.transfer_times() if self.transfers else None,
            "replayed_each_s": self.replayed_each,
            "replayed_each_steps_s": self.each,
        }


@dataclass(frozen=True)
class Workload:
    """The model a plan benchmark trains: conveyor's GPT (`model` "gpt", cut by hand, `config` a GPTConfig) or
    Hugging Face's GPT-2 ("gpt2", traced, a GPT2Config), as `conveyor train --model` does."""

    model: str
    config: Any

    @property
    def split(self) -> str:
        return "traced" if self.model == "gpt2" else "manual"

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def context(self) -> int:
        return int(self.config.n_positions if self.model == "gpt2" else self.config.context)

    def builder(self) -> Callable[[], torch.nn.Module]:
        if self.model == "gpt2":
            return gpt2_lm(self.config)
        config = self.config
        return lambda: GPT(config)

    def loss(self, output: Any, targets: torch.Tensor) -> torch.Tensor:
        return logits_loss(output, targets) if self.model == "gpt2" else lm_loss(output, targets)

    def tokens(self, rows: int) -> torch.Tensor:
        """`rows` sequences of context + 1 tokens, the same in every process."""
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, self.vocab_size, (rows, self.context + 1), generator=generator)

    def plan_split(self, plan: Plan) -> Split:
        example = (self.tokens(2)[:, :-1],) if self.split == "traced" else None
        return split_with_plan(self.builder(), plan, example_args=example)


def profile_gpt(
    config: Any, tokens: torch.Tensor, repeats: int, min_seconds: float, slowdown: bool = False
) -> LayerProfile:
    """`profile_model` of conveyor's GPT (`config`) on `tokens`, each row's next token its target; with
    `slowdown`, also how much slower its layers compute in a pipeline's rank (off by default: too noisy here,
    docs/benchmarks-log.md)."""
    return profile_model(
        lambda: GPT(config),
        tokens[:, :-1],
        tokens[:, 1:],
        lm_loss,
        repeats=repeats,
        min_seconds=min_seconds,
        slowdown=slowdown,
    )


def measure_plans(
    plans: Sequence[Plan], workload: Workload, steps: int, into: Sequence[Measured], quiet_wait_s: float = 60
) -> None:
    """Add `steps` steps (after WARMUP more) of each plan on `workload`'s model to its `into`, taken in turn in
    the same ranks: a step of the first plan, one of the second, and so on. Before the run, wait at most
    `quiet_wait_s` for other processes to leave the CPU."""
    if len({plan.spec.ranks for plan in plans}) != 1 or len(plans) != len(into):
        raise ValueError("plans measured together need the same ranks, and one Measured each")
    foreign = wait_until_quiet(quiet_wait_s)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        spawn(_rank, plans[0].spec.ranks, (list(plans), workload, steps, out.name), timeout_s=300 + 60 * len(plans))
        results = json.loads(Path(out.name).read_text())
    for measured, result in zip(into, results, strict=True):
        measured.foreign_cores.append(foreign)
        measured.times += [float(t) for t in result["times"]]
        measured.queued += [float(q) for q in result["queued"]]
        measured.actions.append(result["actions"])
        measured.transfers.append(result["transfers"])
        measured.each += [float(t) for t in result["each"]]


def replayed_step(plan: Plan, profile: LayerProfile, measured: Measured) -> float:
    """The plan's step simulated with the action times its runs measured in place of the profile's, sends and
    receive posts and optimizer steps included (the latency stays the profile's): what the schedule model
    predicts given how fast the machine computed during the runs. Its difference from the measured step is the
    model's own error; the rest of a prediction's error is the profile's times against the runs'."""
    costs = stage_costs(profile, plan.layers_per_stage, plan.spec.recompute)
    fields = {"F": "forward", "B": "backward", "W": "weight", "whole": "whole", "step": "step"}
    measured_times = measured.action_times()
    stages = [
        dataclasses.replace(c, **{fields[k]: t for k, t in measured_times.get(s, {}).items()})
        for s, c in enumerate(costs.stages)
    ]
    program = build_schedule(plan.spec)
    # The runs' mean post counts the late ones too, so every post is charged it.
    replayed = dataclasses.replace(costs, stages=tuple(stages), late_recv=None, **measured.transfer_times())
    return simulate(program, replayed).step_time


def unscaled_step(plan: Plan, profile: LayerProfile) -> float:
    """The plan's step predicted from `profile` without its slowdown in a pipeline's rank: what the prediction
    would be had the slowdown not been measured, for comparing the two in one run."""
    costs = stage_costs(dataclasses.replace(profile, slowdown=None), plan.layers_per_stage, plan.spec.recompute)
    return simulate(build_schedule(plan.spec), costs).step_time


def add_quiet_wait_flag(parser: argparse.ArgumentParser) -> None:
    """`--quiet-wait-s`: how long a plan benchmark waits for a quiet machine before each profile and run."""
    parser.add_argument(
        "--quiet-wait-s",
        type=float,
        default=60.0,
        help="longest wait before each profile and run for other processes to leave the CPU; 0 measures at once",
    )


def wait_until_quiet(limit_s: float = 60) -> float:
    """Wait while other processes keep more than QUIET_CORES busy (at most `limit_s`); the cores they used last."""
    deadline = time.monotonic() + limit_s
    while True:
        machine0, own0 = _cpu_seconds()
        time.sleep(0.5)
        machine1, own1 = _cpu_seconds()
        foreign = max(0.0, (machine1 - machine0 - (own1 - own0)) / 0.5)
        if foreign < QUIET_CORES or time.monotonic() > deadline:
            return foreign


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine and this process (with its children) have used."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    machine = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return machine, own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _rank(rank: int, world: int, plans: list[Plan], workload: Workload, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    pipes = [
        Pipeline(
            workload.plan_split(plan),
            PipelineSpec(plan.spec.schedule, world, plan.spec.microbatches, recompute=plan.spec.recompute),
            loss_fn=workload.loss,
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),
        )
        for plan in plans
    ]
    tokens = [workload.tokens(plan.spec.microbatches * plan.microbatch_size) for plan in plans]
    times: list[list[float]] = [[] for _ in plans]
    queued: list[list[float]] = [[] for _ in plans]
    recorders = [_EveryAction(rank) for _ in plans]
    for step in range(steps + WARMUP):
        for i, pipe in enumerate(pipes):
            if step == WARMUP:
                pipe.tracer = recorders[i]  # action times, for `replayed_step` and `replay_each`
            recorders[i].step = step
            dist.barrier()
            start, delay = time.perf_counter(), run_delay()
            pipe.step(tokens[i][:, :-1], tokens[i][:, 1:])
            dist.barrier()
            if step >= WARMUP:
                times[i].append(time.perf_counter() - start)
                queued[i].append(run_delay() - delay)
    results = [
        _result(rank, world, plan, pipe, recorder, t, q, steps)
        for plan, pipe, recorder, t, q in zip(plans, pipes, recorders, times, queued, strict=True)
    ]
    for pipe in pipes:
        pipe.close()
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def _result(
    rank: int,
    world: int,
    plan: Plan,
    pipe: Pipeline,
    recorder: _EveryAction,
    times: list[float],
    queued: list[float],
    steps: int,
) -> dict[str, Any]:
    """One plan's measurements, gathered on rank 0 (empty elsewhere). Collective."""
    every: list[list[float]] = [[] for _ in range(world)]
    dist.all_gather_object(every, queued)
    busy: list[list[tuple[int, str, float]]] = [[] for _ in range(world)]
    dist.all_gather_object(busy, recorder.busy)
    spans = gather_spans(recorder)
    if rank != 0:
        return {}
    everything = [row for of_rank in busy for row in of_rank]
    latency = plan.transfers.latency if plan.transfers else 0.0  # the profile's, as in `replayed_step`
    return {
        "times": times,
        "queued": [max(per_rank[i] for per_rank in every) for i in range(len(times))],
        "actions": action_means(spans, everything, pipe.program),
        "transfers": transfer_means(everything, pipe.program),
        "each": [replay_each(pipe.program, everything, step, latency) for step in range(WARMUP, steps + WARMUP)],
    }


class _EveryAction(Recorder):
    """A Recorder that also keeps how long each action kept its rank busy: (step, action, seconds), a compute
    without its wait for inputs, and the sends and receive posts a trace's spans leave out."""

    def __init__(self, rank: int) -> None:
        super().__init__(rank)
        self.busy: list[tuple[int, str, float]] = []

    def action_ended(self, action: Action) -> None:
        began = self._waited_until if self._waited_until is not None else self._started
        self.busy.append((self.step, str(action), time.perf_counter() - began))
        super().action_ended(action)


def transfer_means(busy: list[tuple[int, str, float]], program: Program) -> dict[str, float]:
    """The mean time a send ("send") and a receive's post ("recv") kept its rank busy (0 where none: one rank)."""
    kinds = {str(a): a.kind for actions in program.actions.values() for a in actions}
    sends = [t for _, name, t in busy if kinds[name].is_send]
    posts = [t for _, name, t in busy if kinds[name].is_recv]
    return {"send": statistics.fmean(sends) if sends else 0.0, "recv": statistics.fmean(posts) if posts else 0.0}


def replay_each(program: Program, busy: list[tuple[int, str, float]], step: int, latency: float) -> float:
    """Step `step` simulated with each of its actions' own busy times (and `latency`)."""
    own = {name: t for s, name, t in busy if s == step}
    return validate(program, lambda action: own[str(action)], latency).span


def action_means(
    spans: list[tuple[int, Span]], busy: list[tuple[int, str, float]], program: Program
) -> dict[str, dict[str, float]]:
    """Per stage, the mean time of each kind of compute in `spans`: F, B (split from its W), W, and whole
    (a B with no W of its own: the whole backward); and of its optimizer steps in `busy` ("step")."""
    split = {(step, span.stage, span.mb) for step, span in spans if span.kind == "W"}
    samples: dict[int, dict[str, list[float]]] = {}
    for step, span in spans:
        if span.kind not in ("F", "B", "W"):
            continue
        kind = "whole" if span.kind == "B" and (step, span.stage, span.mb) not in split else span.kind
        samples.setdefault(span.stage, {}).setdefault(kind, []).append(span.end - span.start)
    actions = {str(a): a for acts in program.actions.values() for a in acts}
    for _, name, t in busy:
        if actions[name].kind is Kind.STEP:
            samples.setdefault(actions[name].stage, {}).setdefault("step", []).append(t)
    return {str(s): {k: statistics.mean(ts) for k, ts in by.items()} for s, by in samples.items()}


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def provenance(started: str) -> dict[str, str]:
    """What a result file records of how it was made: the command, when, where and at which commit."""
    return {
        "command": " ".join(["python", *sys.argv]),
        "started": started,
        "ended": now(),
        "machine": machine(),
        "commit": commit(),
        "torch": torch.__version__,
    }


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""

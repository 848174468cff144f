"""Step time of one transformer trained three ways: conveyor, torch.distributed.pipelining, and one process.

All three train the same model (`conveyor.models.gpt.GPT`), from the same weights, on the same batch,
cut into the same micro-batches:

  A. conveyor: `Pipeline` over the stage modules of `conveyor.split_model`;
  B. torch: `torch.distributed.pipelining.PipelineStage` wrapping those same
     stage modules (one per stage, placed as conveyor places them), driven by
     torch's schedule of the same name (`Schedule1F1B`, `ScheduleGPipe`,
     `ScheduleInterleaved1F1B`, `ScheduleLoopedBFS`, `ScheduleZBVZeroBubble`,
     `ScheduleDualPipeV`; torch has no single-stage ZB-H1, so zb-h1 meets
     `Schedule1F1B`);
  C. one process: the full model, gradients accumulated over the micro-batches;
  D. with --baseline NAME: conveyor again, with schedule NAME (zb-h1 against 1f1b, say);
  E. the work alone: every rank computes its own stages' forwards and backwards of the m micro-batches at
     the same time as the others, with no transfers and no schedule. Its step is what this machine allows
     a pipeline without a bubble (the cores slow each other down: caches, memory, the VM's neighbours),
     measured in the same run; a 1F1B-like pipeline adds its fill and drain to it.

A and B run one process per stage, started by `conveyor.spawn` (gloo); C runs
one process. Every process uses one torch thread and keeps the host memory a step frees, as conveyor's
`Pipeline` makes its processes do (`conveyor/runtime/host_memory.py`). Runs are interleaved,
in an order shuffled from round to round (`round_order`), so that drift of the machine hits all alike; each
run's warm-up steps are dropped. A step is a barrier, the pipeline step (or the
accumulation loop) and an SGD step; its time is the slowest rank's. When other
processes used the CPU during a run, its steps in which they held up a rank
(the kernel's run-queue delay of the rank's main thread) are set aside, and a
run with too few steps left is measured again, so a shared machine skews the
medians less.

    python benchmarks/bench_schedules.py                   # 2 ranks, 8 micro-batches, 1f1b
    python benchmarks/bench_schedules.py --schedule gpipe --json
    python benchmarks/bench_schedules.py --schedule zb-h1 --baseline 1f1b
    python benchmarks/bench_schedules.py --schedule zbv    # 2 ranks x 2 stages
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from conveyor import Pipeline, spawn, split_model
from conveyor.models.gpt import GPT, GPTConfig, lm_loss
from conveyor.observe.simulate import CostModel, StageCosts, simulate
from conveyor.runtime.host_memory import keep_freed_host_memory
from conveyor.schedules import SCHEDULES, PipelineSpec, build_schedule

METHODS = ("conveyor", "torch", "single", "work", "baseline")
QUIET_CORES = 0.1  # CPU (in cores) other processes may use around a run before its steps are checked one by one
DISTURBED = 0.10  # a step whose main thread queued for a CPU longer than this fraction of it is set aside
TORCH_SCHEDULES = {
    "1f1b": "Schedule1F1B",
    "gpipe": "ScheduleGPipe",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "looped-bfs": "ScheduleLoopedBFS",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
    "zb-h1": "Schedule1F1B",
}


@dataclass(frozen=True)
class Config:
    """One benchmark: the model, the batch, the schedule and how long to measure."""

    ranks: int = 2
    """Pipeline ranks, one process each (A and B); each runs the schedule's stages per rank."""
    microbatches: int = 8
    """Micro-batches per step, in all three methods."""
    schedule: str = "1f1b"
    """The schedule, for conveyor and (by the same name) torch; see TORCH_SCHEDULES."""
    baseline: str = ""
    """A second conveyor schedule to run side by side (method D), or none."""
    rounds: int = 5
    """Times each method is run, interleaved: every method once per round, in an order shuffled by round."""
    steps: int = 8
    """Measured steps per run."""
    warmup: int = 2
    """Steps per run before measuring (first-step shape exchange, allocator warm-up)."""
    layers: int = 8
    """Transformer blocks, split evenly over the stages."""
    dim: int = 256
    """Model width."""
    heads: int = 4
    """Attention heads."""
    seq: int = 128
    """Tokens per sample."""
    vocab: int = 256
    """Vocabulary size (embedding and head)."""
    microbatch_size: int = 2
    """Samples per micro-batch; the batch holds microbatch_size * microbatches samples."""
    retries: int = 3
    """Times a run is measured again when other processes disturbed more than half its steps."""
    quiet_wait_s: float = 60
    """Longest wait before each run for other processes to leave the CPU; 0 measures at once."""
    timeout_s: float = 600
    """Deadline of one run (spawn raises TimeoutError after it)."""

    def __post_init__(self) -> None:
        if self.schedule not in TORCH_SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(TORCH_SCHEDULES)}; got {self.schedule!r}")
        if self.ranks < 2:
            raise ValueError(f"a pipeline needs at least 2 ranks to compare; got --ranks {self.ranks}")
        if self.baseline and self.baseline not in SCHEDULES:
            raise ValueError(f"--baseline must be a conveyor schedule; got {self.baseline!r}")
        if self.layers < self.num_stages:
            raise ValueError(f"--layers {self.layers} cannot fill {self.num_stages} stages: use more")
        if self.microbatches < self.ranks:
            raise ValueError(f"torch's schedules need micro-batches >= ranks ({self.ranks}); got {self.microbatches}")
        build_schedule(PipelineSpec(self.schedule, self.ranks, self.microbatches))  # conveyor's own constraints
        if self.dim % self.heads:
            raise ValueError(f"--dim {self.dim} must be a multiple of --heads {self.heads}")
        if self.rounds < 1 or self.steps < 1 or self.warmup < 0 or self.retries < 0 or self.quiet_wait_s < 0:
            raise ValueError("--rounds and --steps must be >= 1, --warmup, --retries and --quiet-wait-s >= 0")

    @property
    def num_stages(self) -> int:
        return self.ranks * SCHEDULES[self.schedule].default_virtual

    def local_stages(self, rank: int, schedule: str | None = None) -> list[int]:
        """The stages `rank` runs, placed the same way by conveyor and torch."""
        return build_schedule(PipelineSpec(schedule or self.schedule, self.ranks, self.microbatches)).stages_of(rank)

    @property
    def batch_size(self) -> int:
        return self.microbatch_size * self.microbatches

    @property
    def ideal_speedup(self) -> float:
        """Pipeline speedup over one process with equal stages and free transfers: p*m/(m+p-1)."""
        p, m = self.ranks, self.microbatches
        return p * m / (m + p - 1)


def build_model(cfg: Config) -> GPT:
    """conveyor's small GPT: embeddings, a ModuleList of attention+MLP blocks, norm, head; seeded."""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=cfg.vocab, context=cfg.seq, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads))


def make_batch(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and next-token targets, the same in every process."""
    tokens = torch.randint(cfg.vocab, (cfg.batch_size, cfg.seq + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# Mean cross-entropy of one micro-batch; both pipelines weigh it by 1/m.
loss_fn = lm_loss


# What each process runs. Every rank writes its step times (and the last
# rank its first-step loss) to `<out>.<rank>.json`; the parent merges them.


def run_delay() -> float:
    """Seconds this thread has spent ready to run but waiting for a CPU (the kernel's schedstat; 0 without it)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _measure(cfg: Config, step: Callable[[], float | None], synced: bool) -> dict[str, Any]:
    """Run warm-up and measured steps.

    Returns the measured step times (s), how long the main thread (which does
    all compute, with one torch thread) queued for a CPU during each, how long
    it was idle (the step less its CPU time: waiting for peers, or queued), and
    the first step's loss.
    """
    times: list[float] = []
    queued: list[float] = []
    idle: list[float] = []
    first_loss = None
    for index in range(cfg.warmup + cfg.steps):
        if synced:
            dist.barrier()
        delay = run_delay()
        start, cpu = time.perf_counter(), time.thread_time()
        loss = step()
        elapsed = time.perf_counter() - start
        cpu = time.thread_time() - cpu
        if index == 0:
            first_loss = loss
        if index >= cfg.warmup:
            times.append(elapsed)
            queued.append(run_delay() - delay)
            idle.append(max(0.0, elapsed - cpu))  # the two clocks can differ by a microsecond
    return {"times": times, "queued": queued, "idle": idle, "loss": first_loss}


def _write(out: str, rank: int, result: dict[str, Any]) -> None:
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result, f)


def _sgd(params: list[nn.Parameter]) -> Callable[[], None]:
    optimizer = torch.optim.SGD(params, lr=1e-2)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_conveyor(rank: int, world: int, cfg: Config, out: str, schedule: str = "") -> None:
    torch.set_num_threads(1)
    name = schedule or cfg.schedule
    num_stages = world * SCHEDULES[name].default_virtual
    model = build_model(cfg)
    modules = {s: split_model(model, s, num_stages) for s in cfg.local_stages(rank, name)}
    pipe = Pipeline(modules, PipelineSpec(name, world, cfg.microbatches), loss_fn=loss_fn)
    x, y = make_batch(cfg)
    optimizer_step = _sgd(list(pipe.parameters()))

    def step() -> float | None:
        loss = pipe.step(x, y)  # each rank uses what its stages need
        optimizer_step()
        return None if loss is None else loss.item()

    _write(out, rank, _measure(cfg, step, synced=True))


def run_baseline(rank: int, world: int, cfg: Config, out: str) -> None:
    run_conveyor(rank, world, cfg, out, schedule=cfg.baseline)


def run_torch(rank: int, world: int, cfg: Config, out: str) -> None:
    from torch.distributed import pipelining

    torch.set_num_threads(1)
    keep_freed_host_memory()  # as conveyor's Pipeline does, so the two engines share an allocator
    model = build_model(cfg)
    num_stages = torch_num_stages(cfg)
    local = cfg.local_stages(rank) if cfg.schedule != "zb-h1" else [rank]
    modules = [split_model(model, s, num_stages) for s in local]
    stages = [
        pipelining.PipelineStage(m, s, num_stages, torch.device("cpu")) for m, s in zip(modules, local, strict=True)
    ]
    schedule_cls = getattr(pipelining, TORCH_SCHEDULES[cfg.schedule])
    single = issubclass(schedule_cls, pipelining.schedules.PipelineScheduleSingle)
    # scale_grads divides the summed micro-batch gradients by m: the same 1/m weight conveyor gives each loss.
    schedule = schedule_cls(
        stages[0] if single else stages, n_microbatches=cfg.microbatches, loss_fn=loss_fn, scale_grads=True
    )
    x, y = make_batch(cfg)
    optimizer_step = _sgd([p for m in modules for p in m.parameters()])
    first, last = 0 in local, num_stages - 1 in local

    def step() -> float | None:
        losses: list[torch.Tensor] = []
        args = (x,) if first else ()
        if last:
            schedule.step(*args, target=y, losses=losses, return_outputs=False)
        else:
            schedule.step(*args, return_outputs=False)
        optimizer_step()
        return torch.stack(losses).mean().item() if losses else None

    _write(out, rank, _measure(cfg, step, synced=True))


def run_single(rank: int, world: int, cfg: Config, out: str) -> None:
    torch.set_num_threads(1)
    keep_freed_host_memory()
    model = build_model(cfg)
    x, y = make_batch(cfg)
    inputs, targets = x.tensor_split(cfg.microbatches), y.tensor_split(cfg.microbatches)
    optimizer_step = _sgd(list(model.parameters()))

    def step() -> float:
        total = 0.0
        for mb_input, mb_target in zip(inputs, targets, strict=True):
            loss = loss_fn(model(mb_input), mb_target) / cfg.microbatches
            loss.backward()
            total += loss.item()
        optimizer_step()
        return total

    _write(out, rank, _measure(cfg, step, synced=False))


def run_work(rank: int, world: int, cfg: Config, out: str) -> None:
    """Method E: this rank's share of the work (its stages' forward and backward of every micro-batch, and
    their SGD step), with every rank computing at once and nothing sent."""
    torch.set_num_threads(1)
    keep_freed_host_memory()
    model = build_model(cfg)
    x, y = make_batch(cfg)
    inputs, targets = x.tensor_split(cfg.microbatches), y.tensor_split(cfg.microbatches)
    local = cfg.local_stages(rank)
    modules = {s: split_model(model, s, cfg.num_stages) for s in range(max(local) + 1)}
    # Each local stage's input of each micro-batch, as the stages before it would hand it on (untimed).
    stage_inputs: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        hidden = list(inputs)
        for s in range(max(local) + 1):
            stage_inputs[s] = hidden
            if s < max(local):
                hidden = [modules[s](h) for h in hidden]
    last = cfg.num_stages - 1
    optimizer_step = _sgd([p for s in local for p in modules[s].parameters()])

    def step() -> float | None:
        loss = None
        for s in local:
            for mb, h in enumerate(stage_inputs[s]):
                output = modules[s](h.detach().requires_grad_(h.is_floating_point()))
                if s == last:
                    mb_loss = loss_fn(output, targets[mb]) / cfg.microbatches
                    mb_loss.backward()
                    loss = mb_loss.item() + (loss or 0.0)
                else:
                    output.backward(torch.ones_like(output))
        optimizer_step()
        return loss

    _write(out, rank, _measure(cfg, step, synced=True))


def run_stage_costs(rank: int, world: int, cfg: Config, out: str) -> None:
    """One thread, no pipeline: each stage's forward + backward of one micro-batch, in milliseconds (median of 5)."""
    torch.set_num_threads(1)
    model = build_model(cfg)
    x, y = make_batch(cfg)
    mb_input, mb_target = x[: cfg.microbatch_size], y[: cfg.microbatch_size]
    costs = []
    h = mb_input
    for s in range(cfg.num_stages):
        module = split_model(model, s, cfg.num_stages)
        samples = []
        for _ in range(6):
            start = time.perf_counter()
            inp = h.detach().requires_grad_(h.is_floating_point())
            output = module(inp)
            if s == cfg.num_stages - 1:
                loss_fn(output, mb_target).backward()
            else:
                output.backward(torch.ones_like(output))
            samples.append(time.perf_counter() - start)
        costs.append(1e3 * statistics.median(samples[1:]))
        h = output.detach()
    _write(out, rank, {"stage_ms": costs})


RUNNERS: dict[str, Callable[..., None]] = {
    "conveyor": run_conveyor,
    "torch": run_torch,
    "single": run_single,
    "work": run_work,
    "baseline": run_baseline,
}


def torch_num_stages(cfg: Config) -> int:
    return cfg.ranks if cfg.schedule == "zb-h1" else cfg.num_stages


def methods_of(cfg: Config) -> tuple[str, ...]:
    return METHODS if cfg.baseline else METHODS[:4]


# The parent: interleave the runs, merge the ranks, summarize.


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds this process and its reaped children used)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    machine = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal; guest time is already in user
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return machine, own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _wait_until_quiet(log: Callable[[str], None], limit_s: float = 60) -> None:
    """Wait while other processes keep the CPU busy, so they do not skew the next run."""
    deadline = time.monotonic() + limit_s
    warned = False
    while True:
        machine0, own0 = _cpu_seconds()
        time.sleep(0.5)
        machine1, own1 = _cpu_seconds()
        foreign = (machine1 - machine0 - (own1 - own0)) / 0.5
        if foreign < QUIET_CORES or time.monotonic() > deadline:
            if foreign >= QUIET_CORES:
                log(f"machine still busy ({foreign:.2f} cores used by other processes); measuring anyway")
            return
        if not warned:
            log(f"other processes use {foreign:.2f} cores; waiting for the machine to be quiet")
            warned = True


def _launch(fn: Callable[..., None], world: int, cfg: Config) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        out = os.path.join(scratch, "result")
        spawn(fn, world, (cfg, out), timeout_s=cfg.timeout_s)
        results = []
        for rank in range(world):
            with open(f"{out}.{rank}.json") as f:
                results.append(json.load(f))
        return results


def run_benchmark(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """Run everything and return the summary (what --json prints)."""
    stage_ms = _launch(run_stage_costs, 1, cfg)[0]["stage_ms"]
    log(f"stage costs (forward+backward of one micro-batch, 1 thread): {', '.join(f'{c:.1f}' for c in stage_ms)} ms")
    runs: dict[str, list[Run]] = {name: [] for name in methods_of(cfg)}
    first_loss: dict[str, float] = {}
    for round_index in range(cfg.rounds):
        for name in round_order(methods_of(cfg), round_index):
            world = 1 if name == "single" else cfg.ranks
            for attempt in range(1 + cfg.retries):
                _wait_until_quiet(log, cfg.quiet_wait_s)
                machine0, own0 = _cpu_seconds()
                started = time.perf_counter()
                ranks = _launch(RUNNERS[name], world, cfg)
                wall = time.perf_counter() - started
                machine1, own1 = _cpu_seconds()
                run = Run(
                    # A step is over when its slowest rank is done; it was disturbed if any rank queued.
                    times=[max(per_rank) for per_rank in zip(*(r["times"] for r in ranks), strict=True)],
                    queued=[max(per_rank) for per_rank in zip(*(r["queued"] for r in ranks), strict=True)],
                    foreign_cores=max(0.0, machine1 - machine0 - (own1 - own0)) / wall,
                    rank_idle=[r["idle"] for r in ranks],
                )
                log(
                    f"round {round_index + 1}/{cfg.rounds} {name:8s}: median {1e3 * statistics.median(run.times):7.1f}"
                    f" ms/step, {1e3 * statistics.median(run.clean_times or [math.nan]):7.1f} over"
                    f" {len(run.clean_times)}/{cfg.steps} undisturbed steps  ({wall:.1f} s with start-up;"
                    f" other processes used {run.foreign_cores:.2f} cores)"
                )
                if 2 * len(run.clean_times) >= cfg.steps:
                    break
                if attempt < cfg.retries:
                    log("  fewer than half the steps were undisturbed: measuring this run again")
            runs[name].append(run)
            # The rank of the last stage reports the loss (rank 0 in a V-shaped placement).
            first_loss.setdefault(name, next(r["loss"] for r in ranks if r["loss"] is not None))
    return summarize(cfg, runs, first_loss, stage_ms)


def round_order(names: tuple[str, ...], round_index: int) -> list[str]:
    """The order of the methods in a round: shuffled from round to round (seeded by the round, so a run can be
    repeated), so that no method always runs first, or always right after the same other method: a fixed
    order, rotated or not, gives each method the same neighbour in every round, and on these VMs a run may
    be slower after one that loaded both cores (the work alone) than after a quiet wait."""
    return random.Random(round_index).sample(names, len(names))


@dataclass
class Run:
    """One run of one method: per measured step, its time and the longest any rank's main thread queued for a CPU."""

    times: list[float]
    queued: list[float]
    foreign_cores: float
    """CPU used by processes outside the benchmark during the run, in cores."""
    rank_idle: list[list[float]]
    """Per rank, per measured step: how long its main thread was idle (waiting for peers, or queued)."""

    @property
    def clean_times(self) -> list[float]:
        """Times of the steps that other processes did not disturb.

        On a quiet machine a rank's main thread queues for up to ~10% of a step
        (its own gloo threads share the cores), which is the method's own cost:
        such runs keep every step. When other processes used the CPU during the
        run, steps in which some rank queued longer than DISTURBED of the step
        are set aside.
        """
        if self.foreign_cores <= QUIET_CORES:
            return list(self.times)
        return [t for t, q in zip(self.times, self.queued, strict=True) if q <= DISTURBED * t]


def schedule_span_factor(schedule: str, ranks: int, microbatches: int) -> float:
    """The schedule's simulated step over its busiest rank's busy time, with every stage's F, B and W equal."""
    costs = CostModel((StageCosts(forward=1.0, backward=1.0, weight=1.0, whole=2.0),))
    sim = simulate(build_schedule(PipelineSpec(schedule, ranks, microbatches)), costs)
    return sim.step_time / max(sim.busy)


def summarize(
    cfg: Config, runs: dict[str, list[Run]], first_loss: dict[str, float], stage_ms: list[float]
) -> dict[str, Any]:
    methods: dict[str, dict[str, Any]] = {}
    for name, method_runs in runs.items():
        clean = [t for run in method_runs for t in run.clean_times]
        pooled = clean or [t for run in method_runs for t in run.times]
        methods[name] = {
            "median_ms": 1e3 * statistics.median(pooled),
            "min_ms": 1e3 * min(pooled),
            "max_ms": 1e3 * max(pooled),
            "steps": len(pooled),
            "disturbed_steps": sum(len(run.times) for run in method_runs) - len(clean),
            "all_disturbed": not clean,
            "run_medians_ms": [1e3 * statistics.median(run.clean_times or run.times) for run in method_runs],
            # What a runtime controls on a machine whose compute speed drifts: how long each rank waits.
            "rank_idle_ms": [
                1e3 * statistics.median(t for run in method_runs for t in run.rank_idle[rank])
                for rank in range(len(method_runs[0].rank_idle))
            ],
            "first_loss": first_loss[name],
            "foreign_cores": [run.foreign_cores for run in method_runs],
            "runs": [
                {"times_ms": [1e3 * t for t in run.times], "queued_ms": [1e3 * q for q in run.queued]}
                for run in method_runs
            ],
        }
    conveyor, torch_ms, single = (float(methods[n]["median_ms"]) for n in METHODS[:3])
    speedup = single / conveyor
    # The best a one-stage-per-rank pipeline can do here: m + p - 1 slots of the
    # slowest rank, against m micro-batches through all stages in one process.
    p, m = cfg.ranks, cfg.microbatches
    per_rank = [sum(stage_ms[s] for s in cfg.local_stages(rank)) for rank in range(p)]
    balance_bound = m * sum(per_rank) / ((m + p - 1) * max(per_rank))
    # A schedule without a fill-and-drain bubble (zbv, dualpipev) is limited only by the busiest rank's share
    # of the work: the one-process step over that share.
    work_bound = sum(per_rank) / max(per_rank)
    # What this machine allows: the ranks' work computed at once (method E), stretched by the schedule's own
    # idle time (its simulated step over its busiest rank's work, at equal stage costs; 9/8 for 1F1B on 2
    # ranks and 8 micro-batches).
    work = float(methods["work"]["median_ms"])
    span = schedule_span_factor(cfg.schedule, p, m)
    return {
        "config": dataclasses.asdict(cfg),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "stage_ms": stage_ms,
        "methods": methods,
        "ratios": {
            "conveyor_over_torch": conveyor / torch_ms,
            # Paired by round (the median of each round's ratio), which the machine's drift between rounds moves less.
            "conveyor_over_torch_by_round": statistics.median(
                c / t
                for c, t in zip(methods["conveyor"]["run_medians_ms"], methods["torch"]["run_medians_ms"], strict=True)
            ),
            "conveyor_speedup": speedup,
            "torch_speedup": single / torch_ms,
            "ideal_speedup": cfg.ideal_speedup,
            "conveyor_fraction_of_ideal": speedup / cfg.ideal_speedup,
            "torch_fraction_of_ideal": single / torch_ms / cfg.ideal_speedup,
            "stage_balance_bound_speedup": balance_bound,
            "conveyor_fraction_of_stage_balance_bound": speedup / balance_bound,
            "torch_fraction_of_stage_balance_bound": single / torch_ms / balance_bound,
            "busiest_rank_share": max(per_rank) / sum(per_rank),
            "work_share_bound_speedup": work_bound,
            "conveyor_fraction_of_work_share_bound": speedup / work_bound,
            "torch_fraction_of_work_share_bound": single / torch_ms / work_bound,
            "schedule_span_factor": span,
            "machine_limit_ms": work * span,
            "conveyor_fraction_of_machine_limit": work * span / conveyor,
            "torch_fraction_of_machine_limit": work * span / torch_ms,
            **(
                {"conveyor_over_baseline": conveyor / float(methods["baseline"]["median_ms"])}
                if "baseline" in methods
                else {}
            ),
        },
        "loss_spread": max(first_loss.values()) - min(first_loss.values()),
    }


def format_table(summary: dict[str, Any]) -> str:
    cfg, methods, ratios = summary["config"], summary["methods"], summary["ratios"]
    labels = {
        "conveyor": f"A conveyor {cfg['schedule']}",
        "torch": f"B torch {TORCH_SCHEDULES[cfg['schedule']]}",
        "single": "C one process",
        "work": "E the work alone, ranks at once",
        "baseline": f"D conveyor {cfg['baseline']}",
    }
    lines = [
        f"{cfg['ranks']} ranks x 1 thread, {cfg['microbatches']} micro-batches of {cfg['microbatch_size']}x"
        f"{cfg['seq']} tokens, schedule {cfg['schedule']}, GPT {cfg['layers']} layers, dim {cfg['dim']},"
        f" vocab {cfg['vocab']}; {cfg['rounds']} rounds x {cfg['steps']} steps (+{cfg['warmup']} warm-up)",
        f"stage cost, forward+backward of one micro-batch: {', '.join(f'{c:.1f}' for c in summary['stage_ms'])} ms",
        "",
        f"{'method':32s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s} {'steps':>6s}"
        f"  {'per-round medians ms':32s} {'1st loss':>8s}",
    ]
    for name in methods:
        m = methods[name]
        rounds = " ".join(f"{t:.1f}" for t in m["run_medians_ms"])
        lines.append(
            f"{labels[name]:32s} {m['median_ms']:10.1f} {m['min_ms']:8.1f} {m['max_ms']:8.1f} {m['steps']:6d}"
            f"  {rounds:32s} {m['first_loss']:8.5f}"
        )
    disturbed = sum(m["disturbed_steps"] for m in methods.values())
    fell_back = any(m["all_disturbed"] for m in methods.values())
    lines += [
        "",
        f"conveyor / torch step time:         {ratios['conveyor_over_torch']:.3f}   (target <= 1.0, aim 0.85)",
        f"  the same, paired by round:         {ratios['conveyor_over_torch_by_round']:.3f}",
        "idle per rank, median ms per step (waiting for peers, or queued): "
        + "; ".join(f"{n} {', '.join(f'{t:.1f}' for t in methods[n]['rank_idle_ms'])}" for n in ("conveyor", "torch")),
        f"conveyor speedup over one process:  {ratios['conveyor_speedup']:.3f}x"
        f"  = {ratios['conveyor_fraction_of_ideal']:.3f} of ideal {ratios['ideal_speedup']:.3f}x  (target >= 0.8)",
        f"torch speedup over one process:     {ratios['torch_speedup']:.3f}x"
        f"  = {ratios['torch_fraction_of_ideal']:.3f} of ideal",
        f"best speedup the stage costs c allow: {ratios['stage_balance_bound_speedup']:.3f}x"
        "  (m*sum(c) / ((m+p-1)*max(c)))",
        f"  conveyor reaches {ratios['conveyor_fraction_of_stage_balance_bound']:.3f} of it,"
        f" torch {ratios['torch_fraction_of_stage_balance_bound']:.3f}",
        f"busiest rank's share of the work: {ratios['busiest_rank_share']:.3f}; without a bubble the limit is"
        f" {ratios['work_share_bound_speedup']:.3f}x (one process / that share)",
        f"  conveyor reaches {ratios['conveyor_fraction_of_work_share_bound']:.3f} of it,"
        f" torch {ratios['torch_fraction_of_work_share_bound']:.3f}",
        f"what this machine allows: E's step x {ratios['schedule_span_factor']:.4f} (the schedule's simulated"
        f" idle time) = {ratios['machine_limit_ms']:.1f} ms",
        f"  conveyor reaches {ratios['conveyor_fraction_of_machine_limit']:.3f} of it,"
        f" torch {ratios['torch_fraction_of_machine_limit']:.3f}",
        *(
            [f"conveyor {cfg['schedule']} / {cfg['baseline']}:  {ratios['conveyor_over_baseline']:.3f}"]
            if "conveyor_over_baseline" in ratios
            else []
        ),
        f"first-step loss spread across methods: {summary['loss_spread']:.2e}",
        f"steps set aside because other processes took the CPU: {disturbed}"
        + ("  (WARNING: no undisturbed step for some method; its numbers use all steps)" if fell_back else ""),
    ]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, for --help."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(body, ast.ClassDef)
    docs = {}
    for node, after in zip(body.body, body.body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr):
            if isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = after.value.value
    return docs


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    docs = _field_docs(Config)
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        parser.add_argument(flag, type=type(default), default=default, help=f"{docs.get(field.name, '')} ({default})")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    args = parser.parse_args(argv)
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(Config)}
    try:
        return Config(**values), args.json
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> None:
    cfg, as_json = parse_args(argv)
    torch.set_num_threads(1)
    if cfg.ranks > (os.cpu_count() or 1):
        print(f"warning: {cfg.ranks} ranks on {os.cpu_count()} cores: ranks will share cores", file=sys.stderr)
    summary = run_benchmark(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(summary, indent=2) if as_json else format_table(summary))


if __name__ == "__main__":
    main()

"""The runtime's own cost, in one process: conveyor against a plain loop, the same stages by hand, and torch.

Every method trains the same model (`conveyor.models.gpt.GPT`) from the same weights on the same batch, cut
into the same micro-batches, with SGD, in one process (world size 1, gloo) on one torch thread:

  plain     the unsplit model, gradients accumulated over the micro-batches (each loss divided by their
            number), then an SGD step: no pipeline at all;
  by hand   the schedule's own actions for its stages, run by a minimal loop: a forward per stage, each
            stage's input detached from the one before, a backward per stage with its output gradients, the
            steps. What cutting the model into stages costs by itself, without a runtime;
  conveyor  `Pipeline` over the same stage modules, schedule and micro-batches (its defaults: the
            non-finite guard checks the gradients before each update);
  torch     `torch.distributed.pipelining`: `PipelineStage`s over the same modules, torch's schedule of the
            same name (`Schedule1F1B`, `ScheduleInterleaved1F1B`, `ScheduleLoopedBFS`, `ScheduleGPipe`).

A case is `schedule:stages` (all of them in this one process). The methods alternate: each round runs every
method for `--steps` steps, in an order that rotates from round to round, after warm-up steps. Each step is
timed by the main thread's CPU clock (`time.thread_time`), which a thread waiting for a CPU does not accrue,
so a loaded machine moves these figures far less than wall-clock time (other processes still share the
caches); wall-clock medians are printed beside. A method's figure in a round is its median step, and a ratio
is the median over rounds of the rounds' ratios.

`--profile` times where conveyor's own step goes: each part of its hot path wrapped by a timer that keeps
its exclusive CPU time (the wrappers' own cost, measured first, taken off), and that per action of the
rank's program; and the extra cost of a tracer and of memory tracking, alternating with plain steps.

    python benchmarks/bench_overhead.py                                     # the small model, three cases
    python benchmarks/bench_overhead.py --dim 256 --seq 128 --cases interleaved-1f1b:4
    python benchmarks/bench_overhead.py --profile --cases 1f1b:1,interleaved-1f1b:4
    python benchmarks/bench_overhead.py --device cuda    # on a GPU, with conveyor's steps captured too

On a GPU (`--device cuda`) a step is timed by the wall clock between synchronizations, and conveyor runs a
second time with `PipelineSpec(cuda_graph=True)` (method "conveyor+graph": its steps captured after two eager ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from bench_schedules import cpu_model  # benchmarks/ is on the path of a script run from it
from torch import nn

from conveyor import Pipeline, PipelineSpec, spawn, split_model
from conveyor.models.gpt import GPT, GPTConfig, lm_loss
from conveyor.schedules import Kind, build_schedule

TORCH_SCHEDULES = {
    "1f1b": "Schedule1F1B",
    "gpipe": "ScheduleGPipe",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "looped-bfs": "ScheduleLoopedBFS",
}
METHODS = ("plain", "by hand", "conveyor", "torch", "conveyor+graph")
CLOCKS = {
    "cpu": "main thread CPU time (time.thread_time)",
    "cuda": "wall clock between torch.cuda.synchronize() calls (the GPU's time)",
}
VARIANTS = ("conveyor", "conveyor+tracer", "conveyor+memory")  # --profile's timed runs


@dataclass(frozen=True)
class Config:
    """The model, the batch, the cases and how long to measure."""

    dim: int = 64
    """Model width."""
    layers: int = 4
    """Transformer blocks, split evenly over a case's stages."""
    heads: int = 4
    """Attention heads."""
    seq: int = 32
    """Tokens per sample."""
    vocab: int = 256
    """Vocabulary size."""
    microbatches: int = 8
    """Micro-batches per step."""
    microbatch_size: int = 2
    """Samples per micro-batch."""
    cases: str = "1f1b:1,interleaved-1f1b:4,looped-bfs:4"
    """Comma-separated schedule:stages, every stage in this one process."""
    rounds: int = 7
    """Rounds; each runs every method for --steps steps."""
    steps: int = 10
    """Timed steps per method and round."""
    warmup: int = 3
    """Steps per method before the first round."""
    profile: bool = False
    """Also time the parts of conveyor's step, and the cost of a tracer and of memory tracking."""
    device: str = "cpu"
    """cpu, or cuda: then steps are timed by the wall clock between synchronizations, and conveyor also
    runs with its steps captured in a CUDA graph (method "conveyor+graph")."""

    def __post_init__(self) -> None:
        for schedule, stages in self.parsed_cases:
            if stages > self.layers:
                raise ValueError(f"--layers {self.layers} cannot fill {stages} stages of {schedule}: use more")
            build_schedule(self.spec(schedule, stages))  # conveyor's own constraints, named
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda; got {self.device!r}")
        if self.rounds < 1 or self.steps < 1 or self.warmup < 0:
            raise ValueError("--rounds and --steps must be at least 1, --warmup at least 0")

    @property
    def parsed_cases(self) -> list[tuple[str, int]]:
        cases = []
        for case in self.cases.split(","):
            schedule, _, stages = case.strip().partition(":")
            if not stages.isdigit():
                raise ValueError(f"a case is schedule:stages (e.g. interleaved-1f1b:4); got {case!r}")
            cases.append((schedule, int(stages)))
        return cases

    def spec(self, schedule: str, stages: int) -> PipelineSpec:
        return PipelineSpec(schedule, 1, self.microbatches, virtual=stages)


def build_model(cfg: Config) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=cfg.vocab, context=cfg.seq, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads)
    return GPT(config).to(cfg.device)


def make_batch(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    size = cfg.microbatch_size * cfg.microbatches
    tokens = torch.randint(cfg.vocab, (size, cfg.seq + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1].contiguous().to(cfg.device), tokens[:, 1:].contiguous().to(cfg.device)


def _sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3)


# Each method is a function of no arguments that runs one step and returns its loss (a float).

Step = Callable[[], float]


def plain_step(cfg: Config) -> Step:
    model = build_model(cfg)
    optimizer = _sgd(list(model.parameters()))
    x, y = make_batch(cfg)
    inputs, targets = x.tensor_split(cfg.microbatches), y.tensor_split(cfg.microbatches)
    m = cfg.microbatches

    def step() -> float:
        total = torch.zeros((), device=cfg.device)
        for mb_input, mb_target in zip(inputs, targets, strict=True):
            loss = lm_loss(model(mb_input), mb_target) / m
            loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    return step


def stage_modules(cfg: Config, stages: int) -> dict[int, nn.Module]:
    model = build_model(cfg).cpu()  # split_model builds each stage on the device it is given
    return {s: split_model(model, s, stages, device=cfg.device) for s in range(stages)}


def by_hand_step(cfg: Config, schedule: str, stages: int) -> Step:
    """The program's F, B and STEP actions with nothing around them (one process: no transfers)."""
    modules = stage_modules(cfg, stages)
    optimizers = {s: _sgd(list(module.parameters())) for s, module in modules.items()}
    actions = build_schedule(cfg.spec(schedule, stages)).actions[0]
    x, y = make_batch(cfg)
    inputs, targets = x.tensor_split(cfg.microbatches), y.tensor_split(cfg.microbatches)
    last, m = stages - 1, cfg.microbatches

    def step() -> float:
        kept: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        grads: dict[tuple[int, int], torch.Tensor] = {}
        total = torch.zeros((), device=cfg.device)
        for action in actions:
            s, mb = action.stage, action.mb
            if action.kind is Kind.FORWARD:
                assert mb is not None
                inp = inputs[mb] if s == 0 else kept[(s - 1, mb)][1].detach().requires_grad_()
                out = modules[s](inp)
                if s == last:
                    out = lm_loss(out, targets[mb]) / m
                    total += out.detach()
                kept[(s, mb)] = (inp if s else None, out)
            elif action.kind is Kind.BACKWARD:
                assert mb is not None
                inp, out = kept.pop((s, mb))
                torch.autograd.backward([out], [grads.pop((s, mb)) if s != last else torch.ones_like(out)])
                if inp is not None:
                    grads[(s - 1, mb)] = inp.grad  # type: ignore[assignment]
            elif action.kind is Kind.STEP:
                optimizers[s].step()
                optimizers[s].zero_grad(set_to_none=True)
        return float(total)

    return step


def conveyor_pipeline(
    cfg: Config, schedule: str, stages: int, loss_fn: Any = lm_loss, cuda_graph: bool = False
) -> Pipeline:
    spec = cfg.spec(schedule, stages)
    if cuda_graph:  # replaced only when asked: older conveyors' specs lack the setting
        spec = dataclasses.replace(spec, cuda_graph=True)
    modules = stage_modules(cfg, stages)
    return Pipeline(modules, spec, loss_fn=loss_fn, optimizer=_sgd, device=cfg.device)


def conveyor_step(cfg: Config, schedule: str, stages: int, variant: str = "conveyor") -> Step:
    pipe = conveyor_pipeline(cfg, schedule, stages, cuda_graph=variant == "conveyor+graph")
    if variant == "conveyor+tracer":
        from conveyor.observe.trace import Recorder

        pipe.tracer = Recorder(0)
    elif variant == "conveyor+memory":
        pipe.track_memory = True
    x, y = make_batch(cfg)

    def step() -> float:
        loss = pipe.step(x, y)
        assert loss is not None
        return float(loss)

    return step


def torch_step(cfg: Config, schedule: str, stages: int) -> Step | None:
    """torch's pipelining at world size 1, or None where torch has no schedule of that name."""
    from torch.distributed import pipelining

    if schedule not in TORCH_SCHEDULES:
        return None
    modules = stage_modules(cfg, stages)
    device = torch.device(cfg.device)
    pipeline_stages = [pipelining.PipelineStage(modules[s], s, stages, device) for s in range(stages)]
    schedule_cls = getattr(pipelining, TORCH_SCHEDULES[schedule])
    single = issubclass(schedule_cls, pipelining.schedules.PipelineScheduleSingle)
    if single != (stages == 1):
        return None
    # scale_grads divides the summed micro-batch gradients by m: the weight the other methods give each loss.
    runner = schedule_cls(
        pipeline_stages[0] if single else pipeline_stages,
        n_microbatches=cfg.microbatches,
        loss_fn=lm_loss,
        scale_grads=True,
    )
    optimizer = _sgd([p for module in modules.values() for p in module.parameters()])
    x, y = make_batch(cfg)

    def step() -> float:
        losses: list[torch.Tensor] = []
        runner.step(x, target=y, losses=losses, return_outputs=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(torch.stack(losses).mean())

    return step


def make_methods(cfg: Config, schedule: str, stages: int) -> dict[str, Step]:
    methods: dict[str, Step | None] = {
        "plain": plain_step(cfg),
        "by hand": by_hand_step(cfg, schedule, stages),
        "conveyor": conveyor_step(cfg, schedule, stages),
        "torch": torch_step(cfg, schedule, stages),
        "conveyor+graph": conveyor_step(cfg, schedule, stages, "conveyor+graph") if cfg.device == "cuda" else None,
    }
    return {name: step for name, step in methods.items() if step is not None}


def measure(cfg: Config, methods: dict[str, Step]) -> dict[str, Any]:
    """Alternate the methods round by round; per method and round, the median step by thread CPU and wall clock."""
    first_loss = {name: step() for name, step in methods.items()}
    for step in methods.values():
        for _ in range(max(0, cfg.warmup - 1)):
            step()
    names = list(methods)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(cfg.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            step = methods[name]
            cpu_times, wall_times = [], []
            for _ in range(cfg.steps):
                if cfg.device == "cuda":
                    torch.cuda.synchronize()
                cpu0, wall0 = time.thread_time(), time.perf_counter()
                step()
                if cfg.device == "cuda":  # the GPU's time: the host's CPU clock would miss the kernels
                    torch.cuda.synchronize()
                    cpu_times.append(time.perf_counter() - wall0)
                else:
                    cpu_times.append(time.thread_time() - cpu0)
                wall_times.append(time.perf_counter() - wall0)
            cpu[name].append(statistics.median(cpu_times))
            wall[name].append(statistics.median(wall_times))
    return {"first_loss": first_loss, "cpu_s": cpu, "wall_s": wall}


def _ratios(per_round: dict[str, list[float]], base: str) -> dict[str, float]:
    return {
        name: statistics.median(t / b for t, b in zip(times, per_round[base], strict=True))
        for name, times in per_round.items()
    }


# --profile: where conveyor's own time goes.


class Timers:
    """Exclusive CPU time per label of the functions `wrap` wraps: a call's time less its wrapped callees'."""

    def __init__(self) -> None:
        self.exclusive_ns: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.callees: Counter[str] = Counter()  # wrapped calls made from inside each label's calls
        self._stack: list[list[int]] = []  # per open call: [time of wrapped callees, their count]
        self.cost_ns = 0.0  # what one wrapped call adds to its caller (measured by `calibrate`)

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock, stack = time.thread_time_ns, self._stack

        def timed(*args: Any, **kwargs: Any) -> Any:
            stack.append([0, 0])
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = clock() - start
                inner, count = stack.pop()
                self.exclusive_ns[label] += elapsed - inner
                self.calls[label] += 1
                self.callees[label] += count
                if stack:
                    stack[-1][0] += elapsed
                    stack[-1][1] += 1

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def calibrate(self) -> None:
        """The cost a wrapped call adds to its caller's exclusive time, from an empty function called 20000 times."""
        probe = Timers()
        inner = probe.wrap("inner", lambda: None)
        outer = probe.wrap("outer", lambda: [inner() for _ in range(20000)])
        bare = Timers().wrap("bare", lambda: [(lambda: None)() for _ in range(20000)])
        outer()
        bare()
        costs = []
        for _ in range(5):
            probe.exclusive_ns.clear()
            outer()
            start = time.thread_time_ns()
            bare()
            baseline = time.thread_time_ns() - start
            costs.append((probe.exclusive_ns["outer"] - baseline) / 20000)
        self.cost_ns = max(0.0, statistics.median(costs))

    def corrected_ns(self, label: str) -> float:
        return max(0.0, self.exclusive_ns[label] - self.cost_ns * self.callees[label])


# (label, what it is: model work or the runtime's own, where: "module:attribute.path"). Paths that this
# version of conveyor lacks are skipped, so the profile also runs on earlier commits.
PROFILED = [
    ("Pipeline.step (the rest of it)", "runtime", "conveyor.pipeline:Pipeline.step"),
    ("Pipeline._run (the rest of it)", "runtime", "conveyor.pipeline:Pipeline._run"),
    ("row check", "runtime", "conveyor.pipeline:check_rows"),
    ("split into micro-batches", "runtime", "conveyor.pipeline:split_microbatches"),
    ("split into micro-batches", "runtime", "conveyor.pipeline:map_tensors"),
    ("split into micro-batches", "runtime", "conveyor.pipeline:MicrobatchSplitter.__call__"),
    ("input signature", "runtime", "conveyor.pipeline:input_signature"),
    ("loss weights", "runtime", "conveyor.runtime.loss_weights:LossWeights.__call__"),
    ("step header (begin, end)", "runtime", "conveyor.runtime.stage_io:StageIO.begin_step"),
    ("step header (begin, end)", "runtime", "conveyor.runtime.stage_io:StageIO.end_step"),
    ("executor: dispatch and routing", "runtime", "conveyor.runtime.executor:Executor.run"),
    ("stage forward (around the module)", "runtime", "conveyor.runtime.stage:Stage.forward"),
    ("stage backward (around autograd)", "runtime", "conveyor.runtime.stage:Stage.backward"),
    ("module forward", "model", "conveyor.runtime.stage:Stage._call"),
    ("autograd backward", "model", "torch.autograd:backward"),
    ("autograd backward", "model", "conveyor.runtime.stage:run_backward"),
    ("update policy (non-finite guard)", "runtime", "conveyor.runtime.update:_finite_grads"),
    ("update policy (non-finite guard)", "runtime", "conveyor.runtime.update:all_finite"),
    ("update policy (the rest)", "runtime", "conveyor.runtime.update:UpdatePolicy.step"),
    ("update policy (the rest)", "runtime", "conveyor.runtime.update:UpdatePolicy.begin"),
    ("optimizer step", "model", "torch.optim:SGD.step"),
    ("zero_grad", "runtime", "torch.optim:Optimizer.zero_grad"),
    ("zero_grad", "runtime", "conveyor.runtime.update:_zero_grad"),
    ("loss report", "runtime", "conveyor.runtime.loss_report:LossReport.report"),
    ("loss report", "runtime", "conveyor.runtime.stage:Stage.pop_results"),
]


@contextmanager
def patched(timers: Timers) -> Iterator[None]:
    """Wrap every PROFILED function that exists, for the duration."""
    undo: list[tuple[Any, str, Any]] = []
    try:
        for label, _, where in PROFILED:
            module_name, _, path = where.partition(":")
            owner: Any = importlib.import_module(module_name)
            *parents, name = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent, None)
            if owner is None or name not in vars(owner):
                continue
            original = vars(owner)[name]
            undo.append((owner, name, original))
            setattr(owner, name, timers.wrap(label, original))
        yield
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


def _wrap_embedding_checks(timers: Timers, pipe: Pipeline) -> None:
    """The embedding id check is a forward pre-hook of each embedding (where this conveyor has one)."""
    for stage in pipe.stages.values():
        for module in stage.module.modules():
            for key, hook in list(module._forward_pre_hooks.items()):
                if "embedding" in getattr(hook, "__qualname__", ""):
                    module._forward_pre_hooks[key] = timers.wrap("embedding id check", hook)


def profile_case(cfg: Config, schedule: str, stages: int) -> dict[str, Any]:
    """Exclusive CPU time of each part of conveyor's step, per step and per action; and what a tracer and
    memory tracking add, from timed runs alternating with plain conveyor steps."""
    timers = Timers()
    timers.calibrate()
    loss_fn = timers.wrap("loss function", lm_loss)
    x, y = make_batch(cfg)
    steps = cfg.rounds * cfg.steps
    with patched(timers):  # before the pipeline binds its methods to its actions
        pipe = conveyor_pipeline(cfg, schedule, stages, loss_fn=loss_fn)
        _wrap_embedding_checks(timers, pipe)
        actions = len(pipe.program.actions[0])
        for _ in range(cfg.warmup):
            pipe.step(x, y)
        timers.exclusive_ns.clear()
        timers.calls.clear()
        timers.callees.clear()
        for _ in range(steps):
            pipe.step(x, y)
    kinds = {label: kind for label, kind, _ in PROFILED} | {"loss function": "model", "embedding id check": "runtime"}
    parts = []
    for label in dict.fromkeys([*kinds]):
        if timers.calls[label] == 0:
            continue
        us = timers.corrected_ns(label) / 1e3 / steps
        parts.append({"part": label, "kind": kinds[label], "calls": timers.calls[label] / steps, "us_per_step": us})
    runtime_us = sum(p["us_per_step"] for p in parts if p["kind"] == "runtime")
    model_us = sum(p["us_per_step"] for p in parts if p["kind"] == "model")
    variants = {name: conveyor_step(cfg, schedule, stages, name) for name in VARIANTS}
    timed = measure(cfg, variants)
    extra = _ratios(timed["cpu_s"], "conveyor")
    base_us = 1e6 * statistics.median(timed["cpu_s"]["conveyor"])
    return {
        "actions": actions,
        "wrapper_cost_us": timers.cost_ns / 1e3,
        "parts": parts,
        "runtime_us_per_step": runtime_us,
        "model_us_per_step": model_us,
        "runtime_us_per_action": runtime_us / actions,
        "tracer_us_per_action": (extra["conveyor+tracer"] - 1) * base_us / actions,
        "memory_tracking_us_per_action": (extra["conveyor+memory"] - 1) * base_us / actions,
    }


def schedule_needs(program: Any, rank: int = 0) -> dict[int, int]:
    """Per stage of `rank`: the most micro-batches its program holds at once (forward to backward, or to W)."""
    split = {(a.stage, a.mb) for a in program.actions[rank] if a.kind is Kind.WEIGHT}
    held = dict.fromkeys(program.stages_of(rank), 0)
    most = dict(held)
    for action in program.actions[rank]:
        if action.kind is Kind.FORWARD:
            held[action.stage] += 1
            most[action.stage] = max(most[action.stage], held[action.stage])
        elif action.kind is (Kind.WEIGHT if (action.stage, action.mb) in split else Kind.BACKWARD):
            held[action.stage] -= 1
    return most


def activations_held(cfg: Config, schedule: str, stages: int) -> dict[str, Any]:
    """Per stage: what the schedule needs and what conveyor held (track_memory), in micro-batches of that stage."""
    pipe = conveyor_pipeline(cfg, schedule, stages)
    pipe.track_memory = True
    x, y = make_batch(cfg)
    pipe.step(x, y)
    held = {}
    for s, stage in pipe.stages.items():
        probe = type(stage)(stage.module, s, stage.num_stages, stage.loss_fn, track_memory=True)
        mb_x, mb_y = x[: cfg.microbatch_size], y[: cfg.microbatch_size]
        inputs = mb_x if s == 0 else [torch.randn(cfg.microbatch_size, cfg.seq, cfg.dim, requires_grad=True)]
        probe.forward(0, inputs, mb_y)
        held[s] = stage.peak_held_bytes / probe.held_bytes
    return {
        "needed": schedule_needs(pipe.program),
        "held": held,
        "peak_bytes": sum(stage.peak_held_bytes for stage in pipe.stages.values()),
    }


def run_case(cfg: Config, schedule: str, stages: int) -> dict[str, Any]:
    methods = make_methods(cfg, schedule, stages)
    timed = measure(cfg, methods)
    actions = len(build_schedule(cfg.spec(schedule, stages)).actions[0])
    cpu = timed["cpu_s"]
    result: dict[str, Any] = {
        "schedule": schedule,
        "stages": stages,
        "actions": actions,
        "cpu_ms": {name: 1e3 * statistics.median(times) for name, times in cpu.items()},
        "wall_ms": {name: 1e3 * statistics.median(times) for name, times in timed["wall_s"].items()},
        "cpu_round_ms": {name: [1e3 * t for t in times] for name, times in cpu.items()},
        "over_plain": _ratios(cpu, "plain"),
        "wall_over_plain": _ratios(timed["wall_s"], "plain"),
        "first_loss": timed["first_loss"],
        # Per action of the rank's program: what conveyor adds to the same actions run by hand.
        "conveyor_minus_by_hand_us_per_action": 1e6
        * statistics.median(c - h for c, h in zip(cpu["conveyor"], cpu["by hand"], strict=True))
        / actions,
    }
    result["memory"] = activations_held(cfg, schedule, stages)
    if cfg.profile:
        result["profile"] = profile_case(cfg, schedule, stages)
    return result


def run_all(rank: int, world: int, cfg: Config, out: str) -> None:
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    cases = [run_case(cfg, schedule, stages) for schedule, stages in cfg.parsed_cases]
    with open(out, "w") as f:
        json.dump({"cases": cases, "load_before": load_before, "load_after": os.getloadavg()}, f)


def format_report(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    lines = [
        f"one process, 1 thread; GPT {cfg['layers']} layers, dim {cfg['dim']}, {cfg['microbatches']} micro-batches of"
        f" {cfg['microbatch_size']}x{cfg['seq']} tokens, SGD; {cfg['rounds']} rounds x {cfg['steps']} steps per method",
        f"clock ('cpu ms'): {CLOCKS[cfg['device']]}; load average {summary['load_before'][0]:.2f} before,"
        f" {summary['load_after'][0]:.2f} after",
    ]
    for case in summary["cases"]:
        lines += [
            "",
            f"{case['schedule']}, {case['stages']} stage(s), {case['actions']} actions:",
            f"  {'method':10s} {'cpu ms':>8s} {'/ plain':>8s} {'wall ms':>8s} {'/ plain':>8s}  per-round cpu ms",
        ]
        for name in case["cpu_ms"]:
            rounds = " ".join(f"{t:.2f}" for t in case["cpu_round_ms"][name])
            lines.append(
                f"  {name:10s} {case['cpu_ms'][name]:8.2f} {case['over_plain'][name]:8.4f}"
                f" {case['wall_ms'][name]:8.2f} {case['wall_over_plain'][name]:8.4f}  {rounds}"
            )
        extra = case["conveyor_minus_by_hand_us_per_action"]
        lines.append(f"  conveyor over the same actions by hand: {extra:+.1f} us per action")
        memory = case["memory"]
        needed = ", ".join(str(n) for n in memory["needed"].values())
        held = ", ".join(f"{h:.2f}" for h in memory["held"].values())
        lines.append(
            f"  micro-batches held per stage: the schedule needs {needed}; conveyor held {held}"
            f" ({memory['peak_bytes'] / 2**20:.1f} MiB at the stages' peaks)"
        )
        if "profile" in case:
            lines += _format_profile(case["profile"])
    spread = summary["loss_spread"]
    lines += ["", f"first-step loss spread across methods: {spread:.2e}"]
    return "\n".join(lines)


def _format_profile(profile: dict[str, Any]) -> list[str]:
    lines = [
        f"  profile (exclusive CPU time per step; each timer's own {profile['wrapper_cost_us']:.2f} us taken off):",
        f"    {'part':36s} {'kind':8s} {'calls':>6s} {'us/step':>9s} {'us/call':>8s}",
    ]
    for part in sorted(profile["parts"], key=lambda p: -p["us_per_step"]):
        per_call = part["us_per_step"] / part["calls"]
        lines.append(
            f"    {part['part']:36s} {part['kind']:8s} {part['calls']:6.1f} {part['us_per_step']:9.1f} {per_call:8.2f}"
        )
    lines += [
        f"    runtime: {profile['runtime_us_per_step']:.1f} us per step = {profile['runtime_us_per_action']:.2f} us per"
        f" action; model: {profile['model_us_per_step']:.1f} us per step",
        f"    a tracer adds {profile['tracer_us_per_action']:+.2f} us per action, memory tracking"
        f" {profile['memory_tracking_us_per_action']:+.2f} us per action",
    ]
    return lines


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"({default})")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}), args.json
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> None:
    cfg, as_json = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as scratch:
        out = os.path.join(scratch, "result.json")
        spawn(run_all, 1, (cfg, out), backend="nccl" if cfg.device == "cuda" else "gloo", timeout_s=3600)
        with open(out) as f:
            result = json.load(f)
    losses = [loss for case in result["cases"] for loss in case["first_loss"].values()]
    summary = {
        "config": dataclasses.asdict(cfg),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        **result,
        "loss_spread": max(losses) - min(losses),
    }
    print(json.dumps(summary, indent=2) if as_json else format_report(summary))


if __name__ == "__main__":
    main()

"""`Trainer`: train any split model on any data, with everything a real run needs around the pipeline.

A trainer is a composition of small parts, each with a home of its own: the pipeline's settings
(`PipelineSpec`), the split (`conveyor.split`), the data (`data/batches.py`: a stateful loader, so the
data position is a checkpoint's), the update policy (`runtime/update.py`: clipping, precision's loss
scale, the non-finite guard), checkpoints (`checkpoint.py`), metrics (`metrics.py`) and traces
(`observe/trace.py`). What it adds is the loop: learning-rate schedule, evaluation, checkpoints with
exact resume, metrics, a progress bar and a trace of the last steps. `conveyor train` is one client of
it; a Python user is another (README, "Train your own model"). Every rank builds a Trainer with the
same arguments (inside `conveyor.run_ranks`, or under torchrun) and calls `fit()`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from . import checkpoint
from .data.batches import Batches, decode_state, encode_state, fixed_batches
from .launch import restart_count
from .metrics import MetricsWriter, peak_memory_mib
from .observe.timeline import draw_timeline
from .observe.trace import Recorder, gather_spans, write_chrome_trace
from .pipeline import Pipeline
from .runtime.loss_weights import WeightFn
from .runtime.microbatch import split_microbatches, tensors_in
from .runtime.stage import LossFn, call_arguments
from .runtime.update import OptimizerFactory
from .schedules import PipelineSpec
from .split import Split, trace_split

__all__ = ["StepLog", "TrainSettings", "TrainSummary", "Trainer"]

DATA_STATE = "data-state.json"
"""The file beside a checkpoint's tensors that holds the data position (JSON: nothing is unpickled)."""


@dataclass(frozen=True)
class TrainSettings:
    """How a run trains around the pipeline: its length, learning rate, evaluation, checkpoints and records."""

    steps: int = 100
    """Optimizer steps (mini-batches)."""
    batch_size: int = 16
    """Samples per mini-batch, when the data is a map-style Dataset of samples."""
    lr: float | None = None
    """The peak learning rate of the schedule below; None leaves the optimizer's own rate alone."""
    warmup_steps: int = 0
    """Linear warm-up to `lr` over this many steps."""
    lr_decay: str = "none"
    """none, or cosine: decays to `min_lr` by the last step."""
    min_lr: float = 0.0
    clip_grad_norm: float = 0.0
    """Clip the gradients by their global norm over all stages (synchronous schedules); 0: off."""
    eval_every: int = 0
    """Evaluate every this many steps, and after the last (with evaluation data); 0: never."""
    eval_batches: int = 2
    """Held-out mini-batches per evaluation (the same ones each time)."""
    checkpoint_dir: str = ""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0: only after the last step (with `checkpoint_dir`)."""
    keep_checkpoints: int = 3
    async_checkpoints: bool = False
    """Write each checkpoint on a thread while training goes on; it becomes the latest at the next save."""
    resume: bool = False
    """Continue exactly from the latest checkpoint in `checkpoint_dir`."""
    metrics: str = ""
    """CSV file of per-step metrics: loss, learning rate, gradient norm, tokens/s, memory."""
    tensorboard: str = ""
    """Folder for TensorBoard scalars of the same metrics (needs tensorboard)."""
    trace: str = ""
    """Folder for a Chrome trace (trace.json) and a timeline (timeline.png) of the last steps."""
    trace_steps: int = 2
    progress: bool = True
    """A progress bar on the rank that reports."""
    seed: int = 0
    """Seed of the data order and of each rank's random stream (dropout)."""
    device: str = "cpu"
    timeout_s: float | None = 600.0
    """How long any rank waits for a message of another before it names it and stops."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batches", "trace_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "clip_grad_norm", "min_lr", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more; got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive; got {self.lr}")
        if self.lr_decay not in ("none", "cosine"):
            raise ValueError(f"lr_decay must be none or cosine; got {self.lr_decay!r}")
        if (self.resume or self.checkpoint_every or self.async_checkpoints) and not self.checkpoint_dir:
            raise ValueError("resume, checkpoint_every and async_checkpoints need checkpoint_dir")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number of seconds; got {self.timeout_s}")

    def check_for(self, spec: PipelineSpec) -> None:
        """Refuse what `spec`'s pipeline cannot do with these settings."""
        if spec.asynchronous and self.clip_grad_norm:
            raise ValueError(
                f"{spec.schedule} updates inside a stream, between mini-batches no rank can meet at, so no"
                " global gradient norm exists: clip_grad_norm is for the synchronous schedules"
            )

    def learning_rate(self, step: int) -> float | None:
        """The learning rate of step `step` (from 0): linear warm-up, then constant or cosine decay to min_lr."""
        if self.lr is None:
            return None
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_decay == "none":
            return self.lr
        span = max(1, self.steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StepLog:
    """What one training step reports (its loss and evaluation on the last stage's rank, else None)."""

    step: int
    loss: float | None
    lr: float | None
    grad_norm: float | None = None
    eval_loss: float | None = None


@dataclass(frozen=True)
class TrainSummary:
    """What `fit` returns on the rank that reports (the last stage's first): each step's loss, and more."""

    losses: list[float]
    evaluations: list[tuple[int, float]]
    """(steps done, mean held-out loss) of each evaluation."""
    tokens_per_s: float
    seconds: float
    peak_mib: list[float] = field(default_factory=list)
    """Each rank's peak memory."""


class Trainer:
    """Trains this rank's part of `model` under `spec` on `data` (see the module's docstring).

    `model` is a split (`manual_split`, `trace_split`, `split_with_plan`), or a module that is then traced
    on one micro-batch of the data and cut at its block boundaries (`trace_split(num_stages=...)`), or at
    `split_points` if given. `loss_fn`, `loss_weight` and `optimizer` are the pipeline's (`conveyor.losses`
    states the loss contract). `data` is a map-style Dataset of (inputs, targets) samples, batched by
    `settings.batch_size` and shuffled with `settings.seed`, or an iterable of (inputs, targets)
    mini-batches; `eval_data` likewise, for evaluation. `files` are written beside each checkpoint
    (name -> text), and `model_settings` (name -> value: sizes, vocabulary) are what shapes the model: each
    checkpoint records them with the precision, and a resume refuses a checkpoint of other values.
    """

    def __init__(
        self,
        model: Split | nn.Module,
        spec: PipelineSpec,
        *,
        loss_fn: LossFn,
        optimizer: OptimizerFactory,
        data: Dataset[Any] | Iterable[Any],
        eval_data: Dataset[Any] | Iterable[Any] | None = None,
        settings: TrainSettings = TrainSettings(),  # noqa: B008 - frozen, shared safely
        loss_weight: WeightFn | None = None,
        split_points: Mapping[str, str] | None = None,
        files: Mapping[str, str] | None = None,
        model_settings: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        if settings.eval_every and eval_data is None:
            raise ValueError("settings.eval_every asks for evaluations: give eval_data")
        settings.check_for(spec)
        self.spec, self.settings = spec, settings
        self.rank = dist.get_rank()
        self.device = _device_for(self.rank, settings.device)
        self.batches = Batches(data, settings.batch_size, settings.seed)
        self.eval_batches = (
            fixed_batches(eval_data, settings.batch_size, settings.eval_batches) if eval_data is not None else []
        )
        self._files = dict(files or {})
        self.checked = {**(model_settings or {}), "precision": spec.precision}
        """What a checkpoint records and a resume compares (checkpoint.py verifies it with the files)."""
        first_inputs, _ = self._peek()
        found = tensors_in(first_inputs)
        self.tokens_per_batch = found[0].numel() if found else 0
        """Tokens (or samples) of a mini-batch: its first input tensor's elements, for the throughput."""
        if not isinstance(model, Split):
            model = self._trace(model, first_inputs, split_points)
        self.pipe = Pipeline(
            model,
            spec,
            loss_fn=loss_fn,
            optimizer=optimizer,
            loss_weight=loss_weight,
            device=self.device,
            timeout_s=settings.timeout_s,
        )
        # Each rank's own random stream (dropout), the same in every run with this seed; a checkpoint keeps it.
        torch.manual_seed(settings.seed * 1_000_003 + self.rank)
        self.first_step = self._resume() if self._resuming() else 0

    def _resuming(self) -> bool:
        """`settings.resume`, or a restart (by conveyor's launcher or torchrun's) once a checkpoint exists to
        continue from: a restarted run loses nothing (`launch.restart_count`)."""
        if self.settings.resume:
            return True
        directory = self.settings.checkpoint_dir
        return restart_count() > 0 and bool(directory) and checkpoint.latest(directory) is not None

    def _trace(self, model: nn.Module, inputs: Any, split_points: Mapping[str, str] | None) -> Split:
        """Trace `model` on one micro-batch of the first mini-batch (the shapes it will run at)."""
        example = split_microbatches(inputs, self.spec.microbatches)[0]
        args, kwargs = call_arguments(example)
        if split_points:
            return trace_split(model, args, kwargs, split_points=split_points, seed=self.settings.seed)
        return trace_split(model, args, kwargs, num_stages=self.spec.num_stages, seed=self.settings.seed)

    def _peek(self) -> tuple[Any, Any]:
        """The first mini-batch, without moving the stream (its state is put back)."""
        state = self.batches.state_dict()
        first = next(self.batches)
        self.batches.load_state_dict(state)
        return first

    @property
    def reporting(self) -> bool:
        """Whether this rank reports the losses (the last stage's first rank)."""
        return self.rank == self.pipe.last_rank

    def fit(self) -> TrainSummary | None:
        """Train from `first_step` to `settings.steps`; the summary on the reporting rank, None elsewhere."""
        settings, pipe = self.settings, self.pipe
        if self.reporting and restart_count():
            print(f"conveyor train: restart {restart_count()}, from step {self.first_step}", flush=True)
        bar = _progress(settings, self.first_step) if self.reporting else None
        metrics = _metrics_writer(settings, self.first_step) if self.reporting else None
        recorder = Recorder(self.rank) if settings.trace else None
        losses: list[float] = []
        evaluations: list[tuple[int, float]] = []
        start = time.perf_counter()
        timed_from, timed_steps = start, 0
        for log in self._steps(recorder):
            if log.step == self.first_step:  # the first step learns shapes and warms up: keep it out of the rate
                timed_from = time.perf_counter()
            else:
                timed_steps += 1
            if log.loss is None:
                continue
            losses.append(log.loss)
            rate = self.tokens_per_batch * timed_steps / (time.perf_counter() - timed_from) if timed_steps else 0.0
            if log.eval_loss is not None:
                evaluations.append((log.step + 1, log.eval_loss))
            if metrics is not None:
                values = {"loss": log.loss, "eval_loss": log.eval_loss, "lr": log.lr, "grad_norm": log.grad_norm}
                metrics.write(log.step + 1, {**values, "tokens_per_s": rate, "peak_mib": peak_memory_mib(self.device)})
            if bar is not None:
                shown = {"loss": f"{log.loss:.3f}", "tok_s": f"{rate:,.0f}"}
                if log.lr is not None:
                    shown["lr"] = f"{log.lr:.2e}"
                if log.grad_norm is not None:
                    shown["norm"] = f"{log.grad_norm:.2f}"
                bar.set_postfix(shown)
                bar.update()
        seconds = time.perf_counter() - start
        pipe.close()
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        peaks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, round(peak_memory_mib(self.device), 1), group=pipe.group)
        if recorder is not None:
            self._write_trace(recorder)
        if pipe.program.asynchronous:
            _report_versions(pipe, self.reporting)
        if not self.reporting:
            return None
        rate = self.tokens_per_batch * timed_steps / (time.perf_counter() - timed_from) if timed_steps else 0.0
        summary = TrainSummary(losses, evaluations, rate, seconds, peaks)
        _print_summary(summary, self.first_step)
        return summary

    def _steps(self, recorder: Recorder | None) -> Iterator[StepLog]:
        """Train mini-batches `first_step` to `settings.steps`, yielding each one's StepLog as it ends, and write
        the checkpoints and evaluations the settings ask for.

        A synchronous schedule steps once per mini-batch; an asynchronous one streams them, its loss of a
        mini-batch the mean over its micro-batches (each updated the weights on its own, in pipedream), and
        drains before each checkpoint and evaluation: a stream runs from one to the next.
        """
        settings, pipe = self.settings, self.pipe
        saves = _Checkpoints(self)
        first_traced = max(1, settings.steps - settings.trace_steps)
        if not pipe.program.asynchronous:
            # The norm is measured when clipping, or for the metrics (clipping at infinity changes nothing).
            wants_norm = settings.metrics or settings.tensorboard
            clip = settings.clip_grad_norm or (math.inf if wants_norm else None)
            for step in range(self.first_step, settings.steps):
                if recorder is not None and step == first_traced:
                    recorder.start()  # a barrier: every rank is between steps here
                    pipe.tracer = recorder
                if recorder is not None:
                    recorder.step = step
                lr = settings.learning_rate(step)
                if lr is not None:
                    pipe.update.set_lr(lr)
                loss = pipe.step(*next(self.batches), max_grad_norm=clip)
                measured = pipe.update.last_grad_norm
                norm = None if measured is None or clip is None else float(measured)
                evaluated = self._evaluate_after(step + 1)
                yield StepLog(step, None if loss is None else loss.item(), lr, norm, evaluated)
                saves.after(step + 1)
            saves.finish()
            return
        m = self.spec.microbatches
        if recorder is not None:  # a stream has no step boundary to meet at: record it all, by mini-batch
            recorder.start()
            recorder.step_of = lambda action: self.first_step + (action.mb if action.mb is not None else 0) // m
            pipe.tracer = recorder
        step = self.first_step
        while step < settings.steps:
            # Up to the next checkpoint or evaluation, where the stream drains.
            length = settings.steps - step
            for every in (settings.checkpoint_every, settings.eval_every):
                if every:
                    length = min(length, every - step % every)
            batches = (next(self.batches) for _ in range(length))
            parts: list[float] = []
            logs = []
            rate = _stream_rate(settings, step)
            for index, loss in pipe.stream(batches, length, lr=rate):
                parts.append(loss.item())
                if len(parts) == m:
                    done = step + index // m
                    logs.append(StepLog(done, sum(parts) / m, settings.learning_rate(done)))
                    parts = []
            step += length
            evaluated = self._evaluate_after(step)
            if logs and evaluated is not None:  # the evaluation after the stream's last mini-batch
                logs[-1] = replace(logs[-1], eval_loss=evaluated)
            yield from logs
            saves.after(step)
        saves.finish()

    def evaluate(self) -> float | None:
        """The mean held-out loss over the evaluation batches (on the reporting rank; None elsewhere)."""
        losses = [self.pipe.evaluate(x, y) for x, y in self.eval_batches]
        kept = [float(loss) for loss in losses if loss is not None]
        return sum(kept) / len(kept) if kept else None

    def _evaluate_after(self, steps_done: int) -> float | None:
        every = self.settings.eval_every
        if not every or (steps_done % every and steps_done != self.settings.steps):
            return None
        return self.evaluate()

    def _extra(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint keeps beside the model's: the step, and float16's loss scale."""
        scale = self.pipe.update.loss_scale
        return {"step": torch.tensor(0), **({} if scale is None else {"loss_scale": scale.state()})}

    def _resume(self) -> int:
        """Load the latest checkpoint into the pipeline and the data stream; the step to continue from."""
        directory = self.settings.checkpoint_dir
        # The newest that verifies: a damaged one is skipped with a warning naming it and what failed.
        path = checkpoint.newest_verified(directory, self.checked, together=True, group=self.pipe.group)
        if path is None:
            found = "checkpoints, none of which verifies" if checkpoint.latest(directory) else "no complete checkpoint"
            raise ValueError(f"resume: {directory} holds {found}")
        extra = self._extra()
        checkpoint.load(self.pipe, path, extra, self.checked)
        if self.pipe.update.loss_scale is not None:
            self.pipe.update.loss_scale.load_state(extra["loss_scale"])
        position = path / DATA_STATE
        if not position.is_file():
            raise ValueError(f"resume: {path} has no {DATA_STATE}: it was not written by conveyor's Trainer")
        self.batches.load_state_dict(decode_state(position.read_text()))
        step = int(extra["step"])
        if step > self.settings.steps:
            raise ValueError(f"resume: {path} is after step {step}, past the run's {self.settings.steps} steps")
        return step

    def _write_trace(self, recorder: Recorder) -> None:
        first_traced = max(1, self.settings.steps - self.settings.trace_steps)
        spans = [(s, span) for s, span in gather_spans(recorder, dst=self.pipe.last_rank) if s >= first_traced]
        if not self.reporting:
            return
        folder = Path(self.settings.trace)
        trace = write_chrome_trace(spans, folder / "trace.json")
        last_step = max(step for step, _ in spans)
        shown = [span for step, span in spans if step == last_step]
        spec = self.spec
        title = (
            f"{spec.schedule}, {spec.ranks} ranks, {spec.num_stages} stages, {spec.microbatches} micro-batches:"
            f" step {last_step} (measured)"
        )
        origin = min(span.start for span in shown)
        in_ms = [replace(s, start=(s.start - origin) * 1e3, end=(s.end - origin) * 1e3) for s in shown]
        picture = draw_timeline(in_ms, folder / "timeline.png", title, unit="ms")
        print(f"trace written to {trace} (open in https://ui.perfetto.dev), timeline to {picture}", flush=True)


class _Checkpoints:
    """The checkpoints the settings ask for: every `checkpoint_every` steps and after the last.

    With `async_checkpoints` a save only copies the state to host memory and DCP writes it on a thread; it
    is published (becomes the latest) when the next save begins, or at the end (`finish`).
    """

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer
        self._pending: checkpoint.PendingSave | None = None

    def after(self, steps_done: int) -> None:
        trainer = self._trainer
        settings = trainer.settings
        if not settings.checkpoint_dir:
            return
        every = settings.checkpoint_every
        if steps_done != settings.steps and not (every and steps_done % every == 0):
            return
        self.finish()
        extra = {**trainer._extra(), "step": torch.tensor(steps_done)}
        files = {**trainer._files, DATA_STATE: encode_state(trainer.batches.state_dict())}
        arguments = (trainer.pipe, settings.checkpoint_dir, steps_done, extra, settings.keep_checkpoints, files)
        if settings.async_checkpoints:
            self._pending = checkpoint.save_async(*arguments, settings=trainer.checked)
        else:
            checkpoint.save(*arguments, settings=trainer.checked)

    def finish(self) -> None:
        """Publish the checkpoint being written, if any (every rank, at the same point)."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None


def _stream_rate(settings: TrainSettings, first: int) -> Callable[[int], float] | None:
    """A stream's learning rate of its mini-batch i (step first + i), or None to leave the optimizer's."""
    if settings.lr is None:
        return None

    def rate(i: int) -> float:
        value = settings.learning_rate(first + i)
        assert value is not None
        return value

    return rate


def _report_versions(pipe: Pipeline, reporting: bool) -> None:
    """Every rank's weight versions held at most (and their bytes), printed by the last stage's rank."""
    mine = {s: (st.versions.peak_versions, st.versions.peak_bytes) for s, st in pipe.stages.items() if st.versions}
    gathered: list[dict[int, tuple[int, int]]] | None = (
        [{} for _ in range(dist.get_world_size())] if reporting else None
    )
    dist.gather_object(mine, gathered, dst=pipe.last_rank)
    if gathered is not None:
        held = {s: v for part in gathered for s, v in part.items()}
        shown = ", ".join(f"stage {s} {n} ({b / 2**20:.1f} MiB of copies)" for s, (n, b) in sorted(held.items()))
        print(f"weight versions held at most: {shown}", flush=True)


def _print_summary(summary: TrainSummary, first_step: int) -> None:
    losses = summary.losses
    if not losses:  # a restart after the last checkpoint
        print(f"conveyor train: the checkpoint of step {first_step} is the last; nothing left to train", flush=True)
    else:
        window = min(5, len(losses))
        last_mean = sum(losses[-window:]) / window
        print(
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (mean of the last {window} steps {last_mean:.4f})"
            f" | {summary.tokens_per_s:,.0f} tokens/s | {len(losses)} steps in {summary.seconds:.1f} s",
            flush=True,
        )
    if summary.evaluations:
        shown = ", ".join(f"{loss:.4f} (step {step})" for step, loss in summary.evaluations)
        print(f"held-out loss {shown}", flush=True)
    print("peak memory per rank " + ", ".join(f"{mib:,.0f} MiB" for mib in summary.peak_mib), flush=True)


def _metrics_writer(settings: TrainSettings, first_step: int) -> MetricsWriter | None:
    if not (settings.metrics or settings.tensorboard):
        return None
    columns = ["step", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "peak_mib"]
    # A resumed run keeps the rows up to its checkpoint (a restart's failed attempt may have written more).
    keep = first_step if first_step else None
    return MetricsWriter(settings.metrics or os.devnull, columns, settings.tensorboard, keep_until=keep)


def _device_for(rank: int, device: str) -> torch.device:
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        return torch.device("cuda", local % max(1, torch.cuda.device_count()))
    return torch.device(device)


def _progress(settings: TrainSettings, first_step: int) -> Any:
    if not settings.progress:
        return None
    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing one: in a spawned rank it outlives the rank and the resource
    # tracker reports a leaked semaphore. One process draws the bar, so a thread lock is all it needs.
    tqdm.set_lock(threading.RLock())
    return tqdm(total=settings.steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True)

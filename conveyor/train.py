"""`conveyor train`: a small GPT (or GPT-2) learns the standard library's source, one byte at a time, in a pipeline."""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from . import checkpoint
from .data import TextBatches, stdlib_source_bytes
from .launch import default_backend, init_from_env, restart_count, spawn, under_torchrun
from .metrics import MetricsWriter, peak_memory_mib
from .models import GPT, GPTConfig, lm_loss
from .observe.timeline import Span, draw_timeline
from .observe.trace import Recorder, gather_spans, write_chrome_trace
from .pipeline import RECOMPUTE, Pipeline
from .runtime.stage import LossFn
from .schedules import SCHEDULES
from .split import Split, manual_split, trace_split
from .watchdog import default_limit, watch_this_rank

__all__ = ["TrainConfig", "TrainResult", "train"]


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


MODELS = ("gpt", "gpt2")


@dataclass(frozen=True)
class TrainConfig:
    model: str = _option(
        "gpt",
        "gpt: conveyor's small GPT, split by hand; gpt2: Hugging Face's GPT2LMHeadModel from a config with random"
        " weights, split by tracing it (needs the [hf] extra)",
    )
    model_config: str = _option(
        "", "GPT-2 config fields over --dim/--layers/--heads/--context, e.g. n_layer=12,n_embd=768,n_head=12"
    )
    ranks: int = _option(2, "processes; the model is cut into ranks x virtual stages (or --replicas' stages)")
    schedule: str = _option("1f1b", "pipeline schedule (`conveyor schedules` lists them)")
    virtual: int = _option(0, "stages per rank; 0 takes the schedule's default (1, or 2 for looped and V schedules)")
    replicas: str = _option(
        "", "1F1B-RR: ranks per stage, e.g. 2,1 (stage 0 on two ranks, stage 1 on one; --ranks counts them all)"
    )
    dp: int = _option(
        1,
        "data parallelism: --dp D runs D pipelines of --ranks / D ranks (a pp x dp DeviceMesh), each taking every"
        " D-th micro-batch of the mini-batch; they all-reduce their gradients before each step (gpipe, 1f1b)",
    )
    recompute: str = _option("none", "re-materialization: none, full or all-but-last-stage")
    precision: str = _option(
        "fp32",
        "fp32; bf16: forwards and the loss under bfloat16 autocast (fp32 weights); fp16: float16 autocast with a"
        " dynamic loss scale that every stage skips overflowed updates with (synchronous schedules)",
    )
    vertical_sync: bool = _option(False, "pipedream: every stage uses the weight version the first stage used")
    weight_stashing: bool = _option(
        True, "pipedream: each backward uses its forward's weights (turn off for the ablation: the latest weights)"
    )
    microbatches: int = _option(4, "micro-batches per mini-batch; the batch size need not be a multiple")
    steps: int = _option(100, "optimizer steps")
    batch_size: int = _option(16, "sequences per mini-batch")
    context: int = _option(128, "bytes per sequence")
    dim: int = _option(256, "model width")
    layers: int = _option(4, "transformer blocks, split evenly over the stages")
    heads: int = _option(4, "attention heads")
    lr: float = _option(1e-3, "AdamW learning rate (the peak, with --warmup-steps and --lr-decay)")
    warmup_steps: int = _option(0, "learning-rate warm-up: rises linearly to --lr over this many steps")
    lr_decay: str = _option("none", "none, or cosine: decays to --min-lr by the last step")
    min_lr: float = _option(0.0, "the learning rate cosine decay ends at")
    clip_grad_norm: float = _option(0.0, "clip the gradients by their global norm over all stages; 0: off")
    eval_every: int = _option(0, "evaluate on held-out text every this many steps (and at the end); 0: never")
    eval_batches: int = _option(2, "held-out mini-batches per evaluation")
    metrics: str = _option("", "CSV file of per-step metrics: loss, learning rate, gradient norm, tokens/s, memory")
    tensorboard: str = _option("", "folder for TensorBoard scalars of the same metrics (needs tensorboard)")
    device: str = _option("cpu", "cpu or cuda (ranks on one GPU talk through host memory)")
    seed: int = _option(0, "seed of the weights and of the batches")
    threads: int = _option(1, "torch threads per rank; 1 keeps two ranks from fighting over two cores")
    timeout_s: float = _option(
        600.0, "how long a rank waits for another (each message, each collective) before the run fails"
    )
    watchdog_s: float = _option(
        0.0,
        "stop the run when a rank makes no progress for this long (no action begun, no wait for a peer begun or"
        " ended: a stopped process, a stuck kernel); 0: twice --timeout-s, at least 120 s",
    )
    max_restarts: int = _option(
        0,
        "when a rank fails (an error, a crash, no progress) stop every rank and start them all again from the"
        " latest checkpoint in --checkpoint-dir (step 0 without one), at most this many times; under torchrun"
        " give torchrun --max-restarts instead",
    )
    trace: str = _option("", "folder for a Chrome trace (trace.json) and a timeline (timeline.png) of the last steps")
    trace_steps: int = _option(2, "how many of the last steps --trace records")
    progress: bool = _option(True, "a progress bar")
    checkpoint_dir: str = _option(
        "", "folder for checkpoints (step-<n>), every --checkpoint-every steps and at the end"
    )
    checkpoint_every: int = _option(0, "steps between checkpoints; 0: only at the end (with --checkpoint-dir)")
    keep_checkpoints: int = _option(3, "how many of the latest checkpoints to keep")
    async_checkpoints: bool = _option(
        False, "write each checkpoint on a thread while training goes on; it becomes the latest at the next save"
    )
    resume: bool = _option(False, "continue exactly from the latest checkpoint in --checkpoint-dir")
    plan: str = _option(
        "", "a plan file of `conveyor plan`: its split (and the settings it was made for, which must match)"
    )

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.model == "gpt2" and importlib.util.find_spec("transformers") is None:
            raise ValueError("--model gpt2 needs Hugging Face transformers: pip install 'conveyor[hf]'")
        if self.model_config and self.model != "gpt2":
            raise ValueError("--model-config sets GPT-2 fields: use it with --model gpt2")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in (
            "ranks",
            "dp",
            "microbatches",
            "steps",
            "batch_size",
            "context",
            "dim",
            "layers",
            "heads",
            "threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(
                f"--dim {self.dim} must be a multiple of --heads {self.heads} (each head gets dim / heads)"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout-s must be a positive number of seconds; got {self.timeout_s}")
        self._check_restarts()
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive; got {self.lr}")
        if self.trace_steps < 1:
            raise ValueError(f"--trace-steps must be at least 1; got {self.trace_steps}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: this machine has no CUDA GPU (torch {torch.__version__})")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be cpu or cuda; got {self.device!r}")
        self._check_checkpoints()
        self._check_training_options()
        if self.trace and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--trace draws its timeline with matplotlib: pip install 'conveyor[plot]'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.precision == "fp16" and SCHEDULES[self.schedule].asynchronous:
            raise ValueError(f"--precision fp16 steps or skips once per mini-batch; {self.schedule} cannot: use bf16")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}; got {self.recompute!r}")
        SCHEDULES[self.schedule].check_virtual(self.stages_per_rank)
        self._check_replicas()
        self._check_plan()
        self._check_data_parallel()
        layers = self.gpt2.n_layer if self.model == "gpt2" else self.layers  # also checks --model-config's fields
        if layers < self.num_stages:
            raise ValueError(
                f"{layers} layers cannot fill {self.num_stages} stages: use --layers {self.num_stages} or more"
            )
        if self.microbatches > self.batch_size:
            raise ValueError(
                f"{self.microbatches} micro-batches need a batch size of at least that; got {self.batch_size}"
            )
        asynchronous = SCHEDULES[self.schedule].asynchronous
        if asynchronous and self.batch_size % self.microbatches:
            raise ValueError(
                f"{self.schedule} streams micro-batches of one shape: the batch size ({self.batch_size}) must be a"
                f" multiple of the micro-batches ({self.microbatches})"
            )
        if not asynchronous and (self.vertical_sync or not self.weight_stashing):
            raise ValueError("--vertical-sync and --no-weight-stashing are for pipedream and pipedream-2bw")

    def _check_training_options(self) -> None:
        if self.lr_decay not in ("none", "cosine"):
            raise ValueError(f"--lr-decay must be none or cosine; got {self.lr_decay!r}")
        for name in ("warmup_steps", "eval_every", "clip_grad_norm", "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more; got {getattr(self, name)}")
        if self.eval_batches < 1:
            raise ValueError(f"--eval-batches must be at least 1; got {self.eval_batches}")
        asynchronous = SCHEDULES[self.schedule].asynchronous
        if asynchronous and self.clip_grad_norm:
            raise ValueError(
                f"{self.schedule} updates inside a stream, between mini-batches no rank can meet at, so no"
                " global gradient norm exists: --clip-grad-norm is for the synchronous schedules"
            )
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--tensorboard needs the tensorboard package: pip install 'conveyor[tensorboard]'")

    def learning_rate(self, step: int) -> float:
        """The learning rate of step `step` (from 0): linear warm-up, then constant or cosine decay to --min-lr."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_decay == "none":
            return self.lr
        span = max(1, self.steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def _check_checkpoints(self) -> None:
        if (self.resume or self.checkpoint_every or self.async_checkpoints) and not self.checkpoint_dir:
            raise ValueError("--resume, --checkpoint-every and --async-checkpoints need --checkpoint-dir")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("--checkpoint-every must be 0 or more and --keep-checkpoints at least 1")
        if self.resume and checkpoint.latest(self.checkpoint_dir) is None:
            raise ValueError(f"--resume: no complete checkpoint in {self.checkpoint_dir}")

    def _check_restarts(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be 0 or more; got {self.max_restarts}")
        if self.watchdog_s < 0 or (self.watchdog_s and self.watchdog_s <= self.timeout_s):
            raise ValueError(
                f"--watchdog-s must be above --timeout-s ({self.timeout_s:g}): a rank waiting for a peer is silent"
                f" until its wait ends; got {self.watchdog_s:g}"
            )
        if self.max_restarts and under_torchrun():
            raise ValueError(
                "under torchrun, restarts are torchrun's: give torchrun --max-restarts N instead of conveyor's"
                " (conveyor train resumes from the latest checkpoint in --checkpoint-dir on each restart)"
            )
        restarts = self.max_restarts or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
        earlier = checkpoint.latest(self.checkpoint_dir) if self.checkpoint_dir else None
        if restarts and earlier is not None and not self.resume and restart_count() == 0:
            raise ValueError(
                f"--checkpoint-dir {self.checkpoint_dir} holds checkpoints of an earlier run ({earlier.name}), which"
                " a restart would resume from: give --resume to continue that run, or an empty folder"
            )

    @property
    def watchdog_limit_s(self) -> float:
        """How long a rank may make no progress: --watchdog-s, or its default from --timeout-s."""
        return self.watchdog_s or default_limit(self.timeout_s)

    def _check_replicas(self) -> None:
        if not self.replicas:
            return
        counts = self.replica_counts
        assert counts is not None
        if SCHEDULES[self.schedule].round_robin is None:
            takers = ", ".join(n for n, i in SCHEDULES.items() if i.round_robin is not None)
            raise ValueError(f"--replicas needs a schedule that replicates stages ({takers}); got {self.schedule}")
        if self.virtual not in (0, 1):
            raise ValueError("--replicas runs one stage per rank: drop --virtual")
        if sum(counts) != self.ranks:
            raise ValueError(f"--replicas {self.replicas} holds {sum(counts)} ranks: use --ranks {sum(counts)}")

    def _check_data_parallel(self) -> None:
        if self.dp == 1:
            return
        if self.ranks % self.dp:
            raise ValueError(f"--dp {self.dp} does not divide --ranks {self.ranks}: each pipeline needs --ranks / --dp")
        if self.schedule not in DATA_PARALLEL_SCHEDULES:
            raise ValueError(
                f"--dp runs under {' and '.join(DATA_PARALLEL_SCHEDULES)} (one stage per rank, flushed each step);"
                f" got {self.schedule}"
            )
        if self.replicas:
            raise ValueError("--dp replicates every stage alike; --replicas chooses per stage: give one of them")
        if self.virtual not in (0, 1):
            raise ValueError("--dp runs one stage per rank: drop --virtual")
        if self.microbatches < self.dp:
            raise ValueError(
                f"--microbatches {self.microbatches} leaves some of the --dp {self.dp} pipelines without work:"
                f" use at least {self.dp}"
            )

    @property
    def pipeline_ranks(self) -> int:
        """The ranks of one pipeline (pp): --ranks / --dp."""
        return self.ranks // self.dp

    def _check_plan(self) -> None:
        if not self.plan:
            return
        from .plan import Plan, fingerprint, traced_fingerprint
        from .split import manual_split

        if self.dp != 1 or self.replicas:
            raise ValueError("--plan splits the model into one pipeline: drop --dp and --replicas")
        plan = Plan.load(self.plan)
        cut = "traced" if self.model == "gpt2" else "manual"
        if plan.split != cut:
            raise ValueError(
                f"{self.plan} is a plan for a model cut {plan.split}, but --model {self.model} is cut {cut}:"
                f" make one with `conveyor plan --model {self.model}`"
            )
        micro = -(-self.batch_size // self.microbatches)
        plan.check_settings(
            self.schedule, self.pipeline_ranks, self.stages_per_rank, self.microbatches, self.recompute, micro
        )
        # A plan made for another model is refused here, before any rank starts.
        if self.model == "gpt2":
            from .models.gpt2 import gpt2_lm

            plan.check_model(traced_fingerprint(gpt2_lm(self.gpt2)))
        else:
            gpt = self.gpt
            plan.check_model(fingerprint(manual_split(lambda: GPT(gpt), 1, seed=self.seed)))

    @property
    def replica_counts(self) -> tuple[int, ...] | None:
        """--replicas as numbers, or None without it."""
        if not self.replicas:
            return None
        try:
            counts = tuple(int(word) for word in self.replicas.split(","))
        except ValueError:
            raise ValueError(f"--replicas takes ranks per stage, e.g. 2,1; got {self.replicas!r}") from None
        if any(c < 1 for c in counts):
            raise ValueError(f"--replicas: every stage needs at least 1 rank; got {self.replicas}")
        return counts

    @property
    def stages_per_rank(self) -> int:
        return self.virtual or SCHEDULES[self.schedule].default_virtual

    @property
    def gpt(self) -> GPTConfig:
        return GPTConfig(context=self.context, dim=self.dim, layers=self.layers, heads=self.heads)

    @property
    def gpt2(self) -> Any:
        """The GPT2Config of `--model gpt2`: conveyor's sizes, then --model-config's fields."""
        from .models.gpt2 import sized_gpt2_config

        return sized_gpt2_config(self.dim, self.layers, self.heads, self.context, self.model_config)

    @property
    def num_stages(self) -> int:
        counts = self.replica_counts
        return len(counts) if counts is not None else self.pipeline_ranks * self.stages_per_rank


PRECISIONS = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}  # --precision: the autocast dtype of the forwards
DATA_PARALLEL_SCHEDULES = ("gpipe", "1f1b")  # flushed, one stage per rank, and able to replicate every stage
PRESETS = Path(__file__).parent / "configs"
RENAMED = {"stages": "ranks"}  # settings whose old name said the wrong thing: `stages` counted processes


def read_config(name: str | Path) -> dict[str, Any]:
    """The TrainConfig fields a TOML file sets (`--config FILE`, or a preset's name: `conveyor/configs/*.toml`).

    Keys are field names (`batch_size` or `batch-size`); an unknown key is an error naming the nearest one, a
    value of the wrong type one naming the expected type.
    """
    path = Path(name)
    if not path.is_file():
        preset = PRESETS / f"{name}.toml"
        if not preset.is_file():
            known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
            raise ValueError(f"--config {name}: no such file, and no preset of that name (presets: {known})")
        path = preset
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    with path.open("rb") as file:
        raw = tomllib.load(file)
    kinds = {f.name: type(f.default) for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        setting = key.replace("-", "_")
        if setting not in kinds:
            near = [RENAMED[setting]] if setting in RENAMED else difflib.get_close_matches(setting, list(kinds), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"{path}: there is no setting {key!r}{hint}")
        kind = kinds[setting]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ValueError(f"{path}: {key} must be a {kind.__name__}; got {value!r}")
        values[setting] = value
    return values


@dataclass(frozen=True)
class TrainResult:
    losses: list[float]
    tokens_per_s: float
    seconds: float


def train(config: TrainConfig) -> None:
    """Train under torchrun if it launched us, else spawn one process per stage here."""
    if under_torchrun():
        backend = default_backend(config.device, int(os.environ["WORLD_SIZE"]))
        rank, world = init_from_env(backend, config.timeout_s)
        watch_this_rank(rank, config.watchdog_limit_s)
        try:
            train_rank(rank, world, config)
        finally:
            dist.destroy_process_group()
        return
    backend = default_backend(config.device, config.ranks)
    spawn(
        train_rank,
        config.ranks,
        (config,),
        backend=backend,
        threads_per_rank=config.threads,
        wait_timeout_s=config.timeout_s,  # each wait, not the run: a run making progress goes on
        watchdog_s=config.watchdog_limit_s,
        max_restarts=config.max_restarts,
    )


def train_rank(rank: int, world: int, config: TrainConfig) -> TrainResult | None:
    """One rank's training loop; returns the result on the last stage's rank."""
    if world != config.ranks:
        raise ValueError(f"--ranks {config.ranks} needs {config.ranks} processes; {world} were started")
    torch.set_num_threads(config.threads)
    device = _device_for(rank, config.device)
    split, loss_fn = _split(config)
    mesh = None
    if config.dp > 1:
        mesh = init_device_mesh(device.type, (config.pipeline_ranks, config.dp), mesh_dim_names=("pp", "dp"))
    pipe = Pipeline(
        split,
        num_microbatches=config.microbatches,
        loss_fn=loss_fn,
        schedule=config.schedule,
        recompute=config.recompute,
        autocast=PRECISIONS[config.precision],
        vertical_sync=config.vertical_sync,
        weight_stashing=config.weight_stashing,
        replicas=config.replica_counts,
        mesh=mesh,
        timeout_s=config.timeout_s,
        optimizer=lambda params: torch.optim.AdamW(params, lr=config.lr),
        device=device,
    )
    # Each rank's own random stream (dropout), the same in every run with this seed; a checkpoint keeps it.
    torch.manual_seed(config.seed * 1_000_003 + rank)
    data = TextBatches(stdlib_source_bytes(), config.context, config.batch_size, seed=config.seed)
    first_step = _resume(pipe, data, config) if _resuming(config) else 0
    reporting = rank == pipe.last_rank
    if reporting:
        print(f"conveyor train: {_describe(config)}", flush=True)
        if restart_count():
            print(f"conveyor train: restart {restart_count()}, from step {first_step}", flush=True)
    bar = _progress(config, reporting)
    losses: list[float] = []
    evaluations: list[tuple[int, float]] = []
    tokens = config.batch_size * config.context
    start = time.perf_counter()
    timed_from, timed_steps = start, 0
    recorder = Recorder(rank) if config.trace else None
    metrics = _metrics_writer(config, first_step) if reporting else None
    for log in _losses(pipe, data, config, recorder, first_step):
        if log.step == first_step:  # the first step learns shapes and warms up: keep it out of the throughput
            timed_from = time.perf_counter()
        else:
            timed_steps += 1
        if log.loss is None:
            continue
        losses.append(log.loss)
        elapsed = time.perf_counter() - timed_from
        rate = tokens * timed_steps / elapsed if timed_steps else 0.0
        if log.eval_loss is not None:
            evaluations.append((log.step + 1, log.eval_loss))
        if metrics is not None:
            values = {"loss": log.loss, "eval_loss": log.eval_loss, "lr": log.lr, "grad_norm": log.grad_norm}
            metrics.write(log.step + 1, {**values, "tokens_per_s": rate, "peak_mib": peak_memory_mib(device)})
        if bar is not None:
            shown = {"loss": f"{log.loss:.3f}", "tok_s": f"{rate:,.0f}", "lr": f"{log.lr:.2e}"}
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
    peaks: list[Any] = [None] * world
    dist.all_gather_object(peaks, round(peak_memory_mib(device), 1), group=pipe.group)
    if recorder is not None:
        first_traced = max(1, config.steps - config.trace_steps)
        spans = [(step, span) for step, span in gather_spans(recorder, dst=pipe.last_rank) if step >= first_traced]
        if reporting:
            _write_trace(spans, Path(config.trace), config)
    if pipe.program.asynchronous:
        _report_versions(pipe, reporting)
    if not reporting:
        return None
    if not losses:  # a restart after the last checkpoint
        print(f"conveyor train: the checkpoint of step {first_step} is the last; nothing left to train", flush=True)
        return TrainResult(losses, 0.0, seconds)
    rate = tokens * timed_steps / (time.perf_counter() - timed_from) if timed_steps else 0.0
    result = TrainResult(losses, rate, seconds)
    window = min(5, len(losses))
    last_mean = sum(losses[-window:]) / window
    print(
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (mean of the last {window} steps {last_mean:.4f})"
        f" | {rate:,.0f} tokens/s | {len(losses)} steps in {seconds:.1f} s",
        flush=True,
    )
    if evaluations:
        print("held-out loss " + ", ".join(f"{loss:.4f} (step {step})" for step, loss in evaluations), flush=True)
    print("peak memory per rank " + ", ".join(f"{mib:,.0f} MiB" for mib in peaks), flush=True)
    return result


def _metrics_writer(config: TrainConfig, first_step: int) -> MetricsWriter | None:
    if not (config.metrics or config.tensorboard):
        return None
    columns = ["step", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "peak_mib"]
    path = config.metrics or os.devnull
    # A resumed run keeps the rows up to its checkpoint (a restart's failed attempt may have written more).
    return MetricsWriter(path, columns, config.tensorboard, keep_until=first_step if first_step else None)


@dataclass(frozen=True)
class StepLog:
    """What one training step reports (its loss and evaluation on the last stage's rank, else None)."""

    step: int
    loss: float | None
    lr: float
    grad_norm: float | None = None
    eval_loss: float | None = None


def _losses(
    pipe: Pipeline, data: TextBatches, config: TrainConfig, recorder: Recorder | None, first_step: int = 0
) -> Iterator[StepLog]:
    """Train mini-batches `first_step` to `config.steps`, yielding each one's StepLog as it ends, and write the
    checkpoints and evaluations `config` asks for.

    A synchronous schedule steps once per mini-batch; an asynchronous one streams them, its loss of a
    mini-batch the mean over its micro-batches (each updated the weights on its own, in pipedream), and
    drains before each checkpoint and evaluation: a stream runs from one to the next.
    """
    saves = _Checkpoints(pipe, data, config)
    if not pipe.program.asynchronous:
        first_traced = max(1, config.steps - config.trace_steps)
        # The norm is measured when clipping, or for the metrics (clipping at infinity changes nothing).
        wants_norm = config.metrics or config.tensorboard
        clip = config.clip_grad_norm or (math.inf if wants_norm else None)
        for step in range(first_step, config.steps):
            if recorder is not None and step == first_traced:
                recorder.start()  # a barrier: every rank is between steps here
                pipe.executor.tracer = recorder
            if recorder is not None:
                recorder.step = step
            lr = config.learning_rate(step)
            for optimizer in pipe.optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = lr
            loss = pipe.step(*data.next(), max_grad_norm=clip)
            norm = None if pipe.last_grad_norm is None or clip is None else float(pipe.last_grad_norm)
            evaluated = _evaluate_after(step + 1, pipe, data, config)
            yield StepLog(step, None if loss is None else loss.item(), lr, norm, evaluated)
            saves.after(step + 1)
        saves.finish()
        return
    m = config.microbatches
    if recorder is not None:  # a stream has no step boundary to meet at: record it all, by mini-batch
        recorder.start()
        recorder.step_of = lambda action: first_step + (action.mb if action.mb is not None else 0) // m
        pipe.executor.tracer = recorder
    step = first_step
    while step < config.steps:
        # Up to the next checkpoint or evaluation, where the stream drains.
        length = config.steps - step
        for every in (config.checkpoint_every, config.eval_every):
            if every:
                length = min(length, every - step % every)
        batches = (data.next() for _ in range(length))
        parts: list[float] = []
        logs = []

        def rate(i: int, first: int = step) -> float:  # mini-batch i of this stream is step first + i
            return config.learning_rate(first + i)

        for index, loss in pipe.stream(batches, length, lr=rate):
            parts.append(loss.item())
            if len(parts) == m:
                logs.append(StepLog(step + index // m, sum(parts) / m, config.learning_rate(step + index // m)))
                parts = []
        step += length
        evaluated = _evaluate_after(step, pipe, data, config)
        if logs and evaluated is not None:  # the evaluation after the stream's last mini-batch
            logs[-1] = replace(logs[-1], eval_loss=evaluated)
        yield from logs
        saves.after(step)
    saves.finish()


def _evaluate_after(steps_done: int, pipe: Pipeline, data: TextBatches, config: TrainConfig) -> float | None:
    """The mean held-out loss when `steps_done` is a multiple of --eval-every or the last step (on the last
    stage's rank; None elsewhere and between evaluations). Every rank runs the forwards."""
    every = config.eval_every
    if not every or (steps_done % every and steps_done != config.steps):
        return None
    losses = [pipe.evaluate(x, y) for x, y in data.validation_set(config.eval_batches)]
    return None if losses[0] is None else sum(float(loss) for loss in losses if loss is not None) / len(losses)


class _Checkpoints:
    """The checkpoints --checkpoint-dir asks for: every --checkpoint-every steps and after the last.

    With --async-checkpoints a save only copies the state to host memory and DCP writes it on a thread; it
    is published (becomes the latest) when the next save begins, or at the end (`finish`).
    """

    def __init__(self, pipe: Pipeline, data: TextBatches, config: TrainConfig) -> None:
        self._pipe, self._data, self._config = pipe, data, config
        self._pending: checkpoint.PendingSave | None = None

    def after(self, steps_done: int) -> None:
        config = self._config
        if not config.checkpoint_dir:
            return
        every = config.checkpoint_every
        if steps_done != config.steps and not (every and steps_done % every == 0):
            return
        self.finish()
        extra = {"step": torch.tensor(steps_done), "data": self._data.position(), **_loss_scale_state(self._pipe)}
        files = {"conveyor-train.json": json.dumps(asdict(config), indent=1) + "\n"}
        arguments = (self._pipe, config.checkpoint_dir, steps_done, extra, config.keep_checkpoints, files)
        if config.async_checkpoints:
            self._pending = checkpoint.save_async(*arguments)
        else:
            checkpoint.save(*arguments)

    def finish(self) -> None:
        """Publish the checkpoint being written, if any (every rank, at the same point)."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Load a checkpoint of `conveyor train` (or the latest in a checkpoint folder) into the unsplit model and
    write its state_dict to `out`: safetensors for a `.safetensors` name, else `torch.save`."""
    folder = Path(path)
    if not (folder / ".metadata").exists():
        found = checkpoint.latest(folder)
        if found is None:
            raise ValueError(f"{folder} is neither a checkpoint nor a folder of checkpoints")
        folder = found
    saved = json.loads((folder / "conveyor-train.json").read_text())
    config = TrainConfig(**{**saved, "resume": False, "checkpoint_dir": "", "checkpoint_every": 0, "trace": ""})
    model = GPT(config.gpt) if config.model == "gpt" else _gpt2_model(config)
    checkpoint.load_model(model, folder)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    target = Path(out)
    if target.suffix == ".safetensors":
        if importlib.util.find_spec("safetensors") is None:
            raise ValueError("writing .safetensors needs the safetensors package: pip install safetensors")
        from safetensors.torch import save_model

        save_model(model, str(target))  # shared tensors (tied weights) are written once
    else:
        torch.save(state, target)
    return target


def _loss_scale_state(pipe: Pipeline) -> dict[str, torch.Tensor]:
    """float16's loss scale, for a checkpoint (nothing without it)."""
    return {} if pipe.loss_scale is None else {"loss_scale": pipe.loss_scale.state()}


def _resuming(config: TrainConfig) -> bool:
    """--resume, or a restart (by conveyor's launcher or torchrun's) once a checkpoint exists to continue from."""
    if config.resume:
        return True
    return restart_count() > 0 and bool(config.checkpoint_dir) and checkpoint.latest(config.checkpoint_dir) is not None


def _resume(pipe: Pipeline, data: TextBatches, config: TrainConfig) -> int:
    """Load the latest checkpoint into `pipe` and `data`; the step to continue from."""
    path = checkpoint.latest(config.checkpoint_dir)
    assert path is not None  # checked with the config
    extra = {"step": torch.tensor(0), "data": data.position(), **_loss_scale_state(pipe)}
    checkpoint.load(pipe, path, extra)
    if pipe.loss_scale is not None:
        pipe.loss_scale.load_state(extra["loss_scale"])
    data.seek(extra["data"])
    step = int(extra["step"])
    if step > config.steps:
        raise ValueError(f"--resume: {path} is after step {step}, past --steps {config.steps}")
    return step


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


def _split(config: TrainConfig) -> tuple[Split, LossFn]:
    """The model cut into stages (by hand for the GPT, traced for GPT-2, on the meta device), and its loss."""
    if config.model == "gpt2":
        from .models.gpt2 import gpt2_lm, logits_loss

        example = torch.zeros(2, config.context, dtype=torch.long)  # a micro-batch's shape; the batch size may vary
        if config.plan:
            from .plan import split_with_plan

            split = split_with_plan(gpt2_lm(config.gpt2), config.plan, example_args=(example,), seed=config.seed)
            return split, logits_loss
        split = trace_split(gpt2_lm(config.gpt2), (example,), num_stages=config.num_stages, seed=config.seed)
        return split, logits_loss
    gpt = config.gpt
    if config.plan:
        from .plan import split_with_plan

        return split_with_plan(lambda: GPT(gpt), config.plan, seed=config.seed), lm_loss
    return manual_split(lambda: GPT(gpt), config.num_stages, seed=config.seed), lm_loss


def _write_trace(spans: list[tuple[int, Span]], folder: Path, config: TrainConfig) -> None:
    trace = write_chrome_trace(spans, folder / "trace.json")
    last_step = max(step for step, _ in spans)
    shown = [span for step, span in spans if step == last_step]
    title = (
        f"{config.schedule}, {config.ranks} ranks, {config.num_stages} stages, {config.microbatches} micro-batches:"
        f" step {last_step} (measured)"
    )
    origin = min(span.start for span in shown)
    in_ms = [replace(s, start=(s.start - origin) * 1e3, end=(s.end - origin) * 1e3) for s in shown]
    picture = draw_timeline(in_ms, folder / "timeline.png", title, unit="ms")
    print(f"trace written to {trace} (open in https://ui.perfetto.dev), timeline to {picture}", flush=True)


def _device_for(rank: int, device: str) -> torch.device:
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        return torch.device("cuda", local % max(1, torch.cuda.device_count()))
    return torch.device(device)


def _describe(config: TrainConfig) -> str:
    fields = asdict(config)
    keys = (
        "model",
        "ranks",
        "dp",
        "replicas",
        "precision",
        "schedule",
        "virtual",
        "microbatches",
        "batch_size",
        "context",
        "dim",
        "layers",
        "steps",
        "device",
    )
    with torch.device("meta"):  # only counting: no memory, no init
        model = GPT(config.gpt) if config.model == "gpt" else _gpt2_model(config)
        params = sum(p.numel() for p in model.parameters())
    optional = {
        "model": config.model != "gpt",
        "replicas": bool(config.replicas),
        "dp": config.dp > 1,
        "precision": config.precision != "fp32",
    }
    shown = ", ".join(f"{k}={fields[k]}" for k in keys if optional.get(k, True))
    return shown + f", {params / 1e6:.1f}M parameters"


def _gpt2_model(config: TrainConfig) -> Any:
    from .models.gpt2 import gpt2_lm

    return gpt2_lm(config.gpt2)()


def _progress(config: TrainConfig, show: bool):  # type: ignore[no-untyped-def]
    if not (show and config.progress):
        return None
    import threading

    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing one: in a spawned rank it outlives the rank and the resource
    # tracker reports a leaked semaphore. One process draws the bar, so a thread lock is all it needs.
    tqdm.set_lock(threading.RLock())

    return tqdm(total=config.steps, desc="train", unit="step", dynamic_ncols=True)

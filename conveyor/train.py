"""`conveyor train`: the flags of a run, and the run, as one client of `conveyor.Trainer`.

`TrainConfig` holds every flag, each documented once; it builds the pipeline's `PipelineSpec`, the
`TrainSettings` of the loop and the `ModelSource` of the model, and checks them all before any rank
starts. Each rank then reads the data, splits the model and trains it with a `Trainer`.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from . import checkpoint, losses
from .data.stdlib_text import stdlib_documents
from .data.text_files import TokenSequences, check_data, read_documents, tokenize
from .launch import default_backend, restart_count, run_ranks, under_torchrun
from .models.source import BUILT_IN, ModelSource
from .plan import Plan, fingerprint, split_with_plan, traced_fingerprint
from .runtime.stage import call_arguments
from .schedules import PipelineSpec
from .split import Split, manual_split, trace_split
from .trainer import Trainer, TrainSettings
from .watchdog import default_limit

__all__ = ["TrainConfig", "read_config", "train"]

HELD_OUT = 0.1
"""The share of the data's sequences held out for evaluation (with --eval-every)."""


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    model: str = _option(
        "gpt",
        "gpt: conveyor's small GPT, split by hand; gpt2: Hugging Face's GPT2LMHeadModel from a config with random"
        " weights; a local Hugging Face folder (save_pretrained: its config, pretrained weights and tokenizer);"
        " or package.module:function returning an nn.Module; all but gpt split by tracing (needs the [hf] extra"
        " for Hugging Face models)",
    )
    data: str = _option(
        "",
        "a text file, a folder of text files, or a .jsonl file with a text field per line, cut into --context"
        " tokens per sequence (the model's tokenizer, or bytes); default: the Python standard library's source",
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
    offload: str = _option(
        "none", "activation offload to host memory between forward and backward: none, all, or stages like 0,1"
    )
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
    context: int = _option(128, "tokens per sequence (bytes for the built-in models)")
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
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive; got {self.lr}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: this machine has no CUDA GPU (torch {torch.__version__})")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be cpu or cuda; got {self.device!r}")
        spec = self.spec  # the pipeline's own settings are checked there, once
        self._check_settings(spec)
        self._check_restarts()
        self._check_model(spec)
        if self.data:
            try:
                check_data(self.data)
            except ValueError as error:
                raise ValueError(f"--data {self.data}: {error}") from None
        if self.trace and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--trace draws its timeline with matplotlib: pip install 'conveyor[plot]'")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--tensorboard needs the tensorboard package: pip install 'conveyor[tensorboard]'")
        self._check_plan()
        if self.microbatches > self.batch_size:
            raise ValueError(
                f"{self.microbatches} micro-batches need a batch size of at least that; got {self.batch_size}"
            )
        if spec.asynchronous and self.batch_size % self.microbatches:
            raise ValueError(
                f"{self.schedule} streams micro-batches of one shape: the batch size ({self.batch_size}) must be a"
                f" multiple of the micro-batches ({self.microbatches})"
            )

    def _check_settings(self, spec: PipelineSpec) -> None:
        settings = self.settings  # the loop's settings are checked there
        try:
            settings.check_for(spec)
        except ValueError as error:
            raise ValueError(_settings_as_flags(str(error))) from None
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

    def _check_model(self, spec: PipelineSpec) -> None:
        source = self.source  # names what it tried when --model is none of the kinds
        if source.kind != "gpt" and importlib.util.find_spec("transformers") is None:
            raise ValueError(f"--model {self.model} is split by tracing it, which needs: pip install 'conveyor[hf]'")
        if self.model_config and self.model != "gpt2":
            raise ValueError("--model-config sets GPT-2 fields: use it with --model gpt2")
        if source.kind in BUILT_IN:
            layers = source.hf_config().n_layer if source.kind == "gpt2" else self.layers  # checks --model-config
            if layers < spec.num_stages:
                raise ValueError(
                    f"{layers} layers cannot fill {spec.num_stages} stages: use --layers {spec.num_stages} or more"
                )
        source.check_sequence_length(self.context)
        if source.kind == "hf":
            source.tokenizer()  # a folder without one, whose vocabulary is not bytes, is refused here

    @property
    def source(self) -> ModelSource:
        """The model --model names, with the built-in models' sizes."""
        return ModelSource.parse(
            self.model,
            context=self.context,
            dim=self.dim,
            layers=self.layers,
            heads=self.heads,
            model_config=self.model_config,
        )

    @property
    def spec(self) -> PipelineSpec:
        """The pipeline these flags describe (its errors name the flags)."""
        try:
            return PipelineSpec(
                schedule=self.schedule,
                ranks=self.ranks,
                microbatches=self.microbatches,
                virtual=self.virtual,
                replicas=self.replica_counts,
                dp=self.dp,
                recompute=self.recompute,
                offload=self.offload,
                precision=self.precision,
                vertical_sync=self.vertical_sync,
                weight_stashing=self.weight_stashing,
            )
        except ValueError as error:
            raise ValueError(as_flags(str(error))) from None

    @property
    def settings(self) -> TrainSettings:
        """The training loop these flags describe (its errors name the flags)."""
        names = {f.name for f in fields(TrainSettings)} & {f.name for f in fields(TrainConfig)}
        try:
            return TrainSettings(**{name: getattr(self, name) for name in names})
        except ValueError as error:
            raise ValueError(_settings_as_flags(str(error))) from None

    def learning_rate(self, step: int) -> float:
        """The learning rate of step `step` (from 0): linear warm-up, then constant or cosine decay to --min-lr."""
        rate = self.settings.learning_rate(step)
        assert rate is not None
        return rate

    def _check_plan(self) -> None:
        if not self.plan:
            return
        if self.dp != 1 or self.replicas:
            raise ValueError("--plan splits the model into one pipeline: drop --dp and --replicas")
        source = self.source
        if source.kind not in BUILT_IN:
            raise ValueError("--plan: `conveyor plan` plans the built-in models (gpt, gpt2); split yours evenly")
        plan = Plan.load(self.plan)
        cut = "manual" if source.manual else "traced"
        if plan.split != cut:
            raise ValueError(
                f"{self.plan} is a plan for a model cut {plan.split}, but --model {self.model} is cut {cut}:"
                f" make one with `conveyor plan --model {self.model}`"
            )
        micro = -(-self.batch_size // self.microbatches)
        plan.check_spec(self.spec, micro)
        # A plan made for another model is refused here, before any rank starts.
        if source.manual:
            plan.check_model(fingerprint(manual_split(source.builder(), 1, seed=self.seed)))
        else:
            plan.check_model(traced_fingerprint(source.builder()))

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


PRESETS = Path(__file__).parent / "configs"
_SPEC_FIELDS = "|".join(f.name for f in fields(PipelineSpec))
_SETTING = re.compile(r"\b(" + _SPEC_FIELDS + r")=([^\s;:,]+(?:,\d+)*)")


def as_flags(message: str) -> str:
    """A PipelineSpec message in `conveyor train`'s words: `dp=2` -> `--dp 2`, `vertical_sync=True` ->
    `--vertical-sync`, `weight_stashing=False` -> `--no-weight-stashing`, `precision must` -> `--precision must`."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1).replace("_", "-"), match.group(2)
        if value == "True":
            return f"--{name}"
        if value == "False":
            return f"--no-{name}"
        return f"--{name} {value}"

    named = _SETTING.sub(flag, message)
    return re.sub(r"^(" + _SPEC_FIELDS + r") must\b", lambda m: f"--{m.group(1).replace('_', '-')} must", named)


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


def _settings_as_flags(message: str) -> str:
    """A TrainSettings message in `conveyor train`'s words: `eval_every must` -> `--eval-every must`."""
    names = "|".join(f.name for f in fields(TrainSettings))
    return re.sub(r"\b(" + names + r")\b", lambda m: "--" + m.group(1).replace("_", "-"), message)


def train(config: TrainConfig) -> None:
    """Train on the ranks torchrun started, if it launched us, else on ranks spawned here."""
    world = int(os.environ.get("WORLD_SIZE", config.ranks))
    run_ranks(
        train_rank,
        config.ranks,
        (config,),
        backend=default_backend(config.device, world),
        threads_per_rank=config.threads,
        timeout_s=config.timeout_s,  # each wait, not the run: a run making progress goes on
        watchdog_s=config.watchdog_limit_s,
        max_restarts=config.max_restarts,
    )


def train_rank(rank: int, world: int, config: TrainConfig) -> None:
    """One rank's run: read the data, split the model, train it."""
    if world != config.ranks:
        raise ValueError(f"--ranks {config.ranks} needs {config.ranks} processes; {world} were started")
    torch.set_num_threads(config.threads)
    source = config.source
    data, eval_data = sequences(config, source)
    files = {"conveyor-train.json": json.dumps(asdict(config), indent=1) + "\n"}
    trainer = Trainer(
        split_of(config, source, data),
        config.spec,
        loss_fn=losses.causal_lm,
        optimizer=lambda params: torch.optim.AdamW(params, lr=config.lr),
        data=data,
        eval_data=eval_data,
        settings=config.settings,
        files=files,
        model_settings=source.settings(),
    )
    if trainer.reporting:
        print(f"conveyor train: {_describe(config, source, len(data))}", flush=True)
    trainer.fit()


def sequences(config: TrainConfig, source: ModelSource) -> tuple[TokenSequences, TokenSequences | None]:
    """The training sequences --data (or the standard library's source) gives, and the held-out ones when
    --eval-every asks for evaluations (the last tenth)."""
    tokenizer = source.tokenizer()
    documents = read_documents(config.data) if config.data else stdlib_documents()
    pad = tokenizer.pad_token_id
    data = TokenSequences(
        tokenize(documents, tokenizer), config.context, 0 if pad is None else pad, source.takes_attention_mask
    )
    if data.max_id >= source.vocab_size:
        raise ValueError(
            f"--data {config.data}: token id {data.max_id} is beyond --model {config.model}'s vocabulary of"
            f" {source.vocab_size}"
        )
    if not config.eval_every:
        return data, None
    return data.split(HELD_OUT)


def split_of(config: TrainConfig, source: ModelSource, data: TokenSequences) -> Split:
    """The model cut into stages: by hand for conveyor's GPT, by tracing for the others (on a micro-batch of the
    data's shape), as --plan says if given."""
    spec = config.spec
    if source.manual:
        if config.plan:
            return split_with_plan(source.builder(), config.plan, seed=config.seed)
        return manual_split(source.builder(), spec.num_stages, seed=config.seed)
    size = max(2, -(-config.batch_size // config.microbatches))  # a micro-batch (export would fix a size of 1)
    inputs, _ = default_collate([data[i % len(data)] for i in range(size)])
    args, kwargs = call_arguments(inputs)
    if config.plan:
        return split_with_plan(
            source.builder(), config.plan, example_args=args, example_kwargs=kwargs, seed=config.seed
        )
    return trace_split(source.builder(), args, kwargs, num_stages=spec.num_stages, seed=config.seed)


def _describe(config: TrainConfig, source: ModelSource, sequences: int) -> str:
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
    values = asdict(config)
    optional = {
        "model": config.model != "gpt",
        "replicas": bool(config.replicas),
        "dp": config.dp > 1,
        "precision": config.precision != "fp32",
        "dim": source.kind in BUILT_IN,
        "layers": source.kind in BUILT_IN,
    }
    shown = ", ".join(f"{k}={values[k]}" for k in keys if optional.get(k, True))
    data = config.data or "the standard library's source"
    count = _parameters(source)
    params = f"{count / 1e6:.1f}M" if count >= 100_000 else f"{count:,}"
    return shown + f", {params} parameters, {sequences:,} sequences of {data}"


def _parameters(source: ModelSource) -> int:
    """The model's parameters, counted on the meta device where it is built from a config (no memory)."""
    if source.kind == "hf":
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(source.hf_config())
    elif source.kind == "function":
        model = source.build()
    else:
        with torch.device("meta"):
            model = source.builder()()
    return sum(p.numel() for p in model.parameters())

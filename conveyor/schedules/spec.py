"""`PipelineSpec`: the settings that describe a pipeline, validated once, the same on every rank.

Messages name a setting with its value as `name=value`, which `conveyor train` shows as its flag
(`--name value`).

Every part of conveyor that needs them takes a spec: `build_schedule(spec, graph)` builds its
program, `Pipeline(model, spec, ...)` runs it (and its ranks compare their specs whole before
anything else), a `Plan` stores the spec it was made for, and `conveyor train` builds one from its
flags. So each rule about how the settings fit together (replicas add up to the ranks, float16
cannot run an asynchronous schedule, ...) is written here and nowhere else. No torch here: the
schedules layer, the simulator and the planner use it without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .catalog import SCHEDULES, schedule_info
from .offload import offload_stages

__all__ = ["NONFINITE", "PRECISIONS", "RECOMPUTE", "PipelineSpec", "recomputed_stages"]

RECOMPUTE = ("none", "full", "all-but-last-stage")
"""Re-materialization: none; every stage keeps only its inputs and runs its forward again in backward; or every
stage but the last, whose backward follows its forward at once."""
PRECISIONS = ("fp32", "bf16", "fp16")
NONFINITE = ("raise", "skip", "allow")


@dataclass(frozen=True)
class PipelineSpec:
    """What a pipeline is: its schedule, ranks, stages per rank, micro-batches, replicas, recompute and precision.

    Validated when made: a spec that exists is one conveyor can run (the model's own size and stage graph
    are checked when they meet it). Every rank of a pipeline must build it with an equal spec.
    """

    schedule: str
    """The schedule's name (`conveyor schedules` lists them with their constraints)."""
    ranks: int
    """Processes in the pipeline, every replica counted: with `dp`, all ranks of all D pipelines."""
    microbatches: int
    """Micro-batches per mini-batch (with `dp`, of the global mini-batch, dealt round-robin to the pipelines)."""
    virtual: int = 0
    """Stages per rank; 0 takes the schedule's default (1, or 2 for looped and V schedules)."""
    replicas: tuple[int, ...] | None = None
    """PipeDream's 1F1B-RR: ranks per stage, in stage order ((2, 1): stage 0 on ranks 0 and 1, stage 1 on rank
    2); they add up to `ranks`. None: one rank per stage (or `dp` of them)."""
    dp: int = 1
    """Data parallelism: D pipelines of ranks / D ranks each (a pp x dp mesh), each taking every D-th
    micro-batch; they sum their gradients before each step."""
    recompute: str = "none"
    """Re-materialization: none, full (every stage keeps only its inputs and runs its forward again during
    backward) or all-but-last-stage."""
    offload: str = "none"
    """Stages whose activations move to host memory between a micro-batch's forward and its backward, where the
    schedule leaves room for the copies (OFFLOAD and RELOAD actions): "none", "all", or stages like "0,1" (a
    collection of stage indices is taken too, and written so)."""
    precision: str = "fp32"
    """fp32; bf16: forwards and the loss under bfloat16 autocast (fp32 weights, gradients and optimizer
    state); fp16: the same in float16 with a dynamic loss scale (synchronous schedules)."""
    vertical_sync: bool = False
    """pipedream: every stage uses the weight version the first stage used for a micro-batch."""
    weight_stashing: bool = True
    """pipedream, pipedream-2bw: each backward uses its forward's weights (False: the ablation that
    backpropagates with the latest weights)."""
    cuda_graph: bool = False
    """Capture a training step's compute in a CUDA graph and replay it (one rank holding every stage, a
    synchronous fp32 schedule without recompute: `runtime/cuda_graph.py` refuses the rest, naming what to
    change); on CPU it is refused."""
    nonfinite: str = "raise"
    """What an update whose gradients hold NaN or inf does: raise (naming the stage and the update), skip
    it with a warning, or allow it."""

    def __post_init__(self) -> None:
        if self.replicas is not None and not isinstance(self.replicas, tuple):
            object.__setattr__(self, "replicas", tuple(self.replicas))  # a list from JSON or a caller
        info = schedule_info(self.schedule)
        for name in ("ranks", "microbatches", "dp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: it must be at least 1")
        if self.virtual < 0:
            raise ValueError(f"virtual={self.virtual}: it must be 0 (the schedule's default) or more")
        _check_choice("recompute", self.recompute, RECOMPUTE)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("nonfinite", self.nonfinite, NONFINITE)
        info.check_virtual(self.stages_per_rank)
        if self.precision == "fp16" and info.asynchronous:
            raise ValueError(
                f"precision=fp16 steps or skips once per mini-batch, with a loss scale every stage agrees on;"
                f" {self.schedule} updates inside a stream: use precision=bf16"
            )
        if not info.asynchronous and (self.vertical_sync or not self.weight_stashing):
            raise ValueError(
                f"vertical_sync=True and weight_stashing=False are for pipedream and pipedream-2bw; {self.schedule}"
                " keeps one version of the weights"
            )
        if self.replicas is not None:
            self._check_replicas()
        if self.dp > 1:
            self._check_data_parallel()
        self._check_offload()

    def _check_offload(self) -> None:
        """Offload names existing stages, none that recomputes; written canonically ("all", "0,2" or "none")."""
        stages = offload_stages(self.offload, self.num_stages)
        recomputed = recomputed_stages(self.recompute, self.num_stages)
        both = sorted(s for s in stages if recomputed[s])
        if both:
            raise ValueError(
                f"stages {both} would both recompute and offload their activations (recompute={self.recompute},"
                f" offload={self.offload}); a recomputed stage keeps only its inputs, which stay on the device, so"
                " offloading it moves nothing: choose one per stage (e.g. recompute=all-but-last-stage with"
                f" offload={self.num_stages - 1})"
            )
        canonical = (
            "none" if not stages else "all" if len(stages) == self.num_stages else ",".join(map(str, sorted(stages)))
        )
        object.__setattr__(self, "offload", canonical)

    def _check_replicas(self) -> None:
        info, counts = SCHEDULES[self.schedule], self.replicas
        assert counts is not None
        shown = ",".join(map(str, counts))
        if not info.replicates:
            takers = ", ".join(n for n, i in SCHEDULES.items() if i.replicates)
            raise ValueError(
                f"replicas={shown} needs a schedule that replicates stages; {self.schedule} does not replicate"
                f" stages; the schedules that do: {takers}"
            )
        if not counts or any(c < 1 for c in counts):
            raise ValueError(f"replicas={shown}: every stage needs at least 1 rank")
        if self.virtual not in (0, 1):
            raise ValueError(f"replicas={shown} runs one stage per rank: drop virtual={self.virtual}")
        if sum(counts) != self.ranks:
            raise ValueError(f"replicas={shown} holds {sum(counts)} ranks: use ranks={sum(counts)}")
        if self.dp > 1:
            raise ValueError(
                f"dp={self.dp} replicates every stage alike; replicas={shown} chooses per stage: give one of them"
            )
        if counts[-1] != 1 and info.asynchronous:
            raise ValueError(
                f"the last stage has {counts[-1]} replicas: under {self.schedule} conveyor does not replicate the"
                " last stage, whose rank streams every micro-batch's loss in order"
            )

    def _check_data_parallel(self) -> None:
        if self.ranks % self.dp:
            raise ValueError(f"dp={self.dp} does not divide ranks={self.ranks}: each pipeline needs ranks / dp")
        if not SCHEDULES[self.schedule].data_parallel:
            takers = " and ".join(n for n, i in SCHEDULES.items() if i.data_parallel)
            raise ValueError(
                f"dp={self.dp} runs under {takers} (one stage per rank, flushed each step); got {self.schedule}"
            )
        if self.virtual not in (0, 1):
            raise ValueError(f"dp={self.dp} runs one stage per rank: drop virtual={self.virtual}")
        if self.microbatches < self.dp:
            raise ValueError(
                f"microbatches={self.microbatches} leaves some of the dp={self.dp} pipelines without work:"
                f" use at least {self.dp}"
            )

    @property
    def stages_per_rank(self) -> int:
        """`virtual`, or the schedule's default when it is 0."""
        return self.virtual or SCHEDULES[self.schedule].default_virtual

    @property
    def pipeline_ranks(self) -> int:
        """The ranks of one pipeline: ranks / dp (with replicas, the stages)."""
        if self.replicas is not None:
            return len(self.replicas)
        return self.ranks // self.dp

    @property
    def num_stages(self) -> int:
        """How many stages the model is cut into."""
        if self.replicas is not None:
            return len(self.replicas)
        return self.pipeline_ranks * self.stages_per_rank

    @property
    def replica_counts(self) -> tuple[int, ...] | None:
        """Ranks per stage, `dp` included ((D,) * stages); None when every stage has one rank."""
        if self.replicas is not None:
            return self.replicas
        if self.dp > 1:
            return (self.dp,) * self.num_stages
        return None

    @property
    def asynchronous(self) -> bool:
        """Whether the schedule updates inside a stream, never flushing between mini-batches (PipeDream)."""
        return SCHEDULES[self.schedule].asynchronous

    def recomputes(self, stage: int) -> bool:
        """Whether `stage` keeps only its inputs and runs its forward again during backward."""
        return recomputed_stages(self.recompute, self.num_stages)[stage]

    @property
    def offloaded(self) -> frozenset[int]:
        """The stages `offload` names."""
        return offload_stages(self.offload, self.num_stages)

    def with_virtual(self) -> PipelineSpec:
        """This spec with `virtual` spelled out (0 means the schedule's default): equal specs then compare equal."""
        return replace(self, virtual=self.stages_per_rank)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "replicas": None if self.replicas is None else list(self.replicas)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PipelineSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"a pipeline spec has no setting {', '.join(map(repr, unknown))}")
        return cls(**data)

    def describe(self) -> dict[str, int | bool | str]:
        """Each setting as an int, bool or text, for comparing specs between ranks and for messages."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v if isinstance(v, int | bool | str) else str(v) for k, v in values.items()}


def recomputed_stages(recompute: str, num_stages: int) -> list[bool]:
    """Which of `num_stages` stages run their forward again during backward under `recompute` (RECOMPUTE)."""
    _check_choice("recompute", recompute, RECOMPUTE)
    return [
        recompute == "full" or (recompute == "all-but-last-stage" and s < num_stages - 1) for s in range(num_stages)
    ]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")

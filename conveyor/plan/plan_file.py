"""A plan: the split, schedule, micro-batches and recompute chosen for one model, and what they should cost.

It records the model's fingerprint (its layer names and parameter shapes), so a plan given to another model
is an error, not a wrong split.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..observe.transfers import TransferCosts
from ..schedules import offload_stages
from ..split import Split, manual_split
from ..split.traced import trace_split
from .layers import fingerprint, traced_fingerprint

__all__ = ["Plan", "StageSummary", "split_with_plan"]


@dataclass(frozen=True)
class StageSummary:
    """One stage of a plan: what it owns and what the profile says it costs."""

    layers: tuple[str, ...]
    parameters: int
    forward: float
    """Seconds per micro-batch."""
    backward: float
    """Seconds per micro-batch, the whole backward (B + W where split)."""
    busy: float
    """Seconds the stage computes per step: its forwards, backwards and optimizer step."""
    sends: float = 0.0
    """Bytes of activations it sends on per micro-batch (its last layer's output; 0 on the last stage)."""


@dataclass(frozen=True)
class Plan:
    """What `conveyor plan` chose; `conveyor train --plan FILE` and `split_with_plan` train with it."""

    fingerprint: str
    schedule: str
    ranks: int
    virtual: int
    microbatches: int
    microbatch_size: int
    recompute: str
    method: str
    layers_per_stage: tuple[int, ...]
    step_time: float
    """Predicted synchronous step (seconds): first start to last end over all ranks."""
    period: float
    """Predicted steady-state time per step, steps back to back (seconds)."""
    bubble: float
    """Idle share of the synchronous step, mean over ranks."""
    peak_bytes: tuple[float, ...]
    """Predicted peak memory per rank: weights, gradients, optimizer state, activations in flight."""
    memory_cap: float | None
    exact: bool
    """Whether the split was the best of every split (else of a local search)."""
    stages: tuple[StageSummary, ...]
    split: str = "manual"
    """How the model is cut: "manual" (`manual_split`) or "traced" (`trace_split`), as its profile was."""
    transfers: TransferCosts | None = None
    """What the prediction charged each message between ranks (None: nothing, they were not measured)."""
    offload: str = "none"
    """The stages that offload activations to host memory, as `conveyor train --offload` takes them."""

    @property
    def num_stages(self) -> int:
        return len(self.layers_per_stage)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
            stages = tuple(StageSummary(**{**s, "layers": tuple(s["layers"])}) for s in data.pop("stages"))
            data["layers_per_stage"] = tuple(data["layers_per_stage"])
            data["peak_bytes"] = tuple(data["peak_bytes"])
            transfers = data.pop("transfers", None)
            return cls(**data, stages=stages, transfers=None if transfers is None else TransferCosts(**transfers))
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a plan written by conveyor plan ({error})") from None
        except OSError as error:
            raise ValueError(f"cannot read the plan {path}: {error.strerror}") from None

    def check_model(self, found: str, what: str = "the model") -> None:
        """Refuse a model of fingerprint `found` (`fingerprint`, `traced_fingerprint`) unless it is this plan's."""
        if found != self.fingerprint:
            raise ValueError(
                f"this plan is for the model with fingerprint {self.fingerprint} (its layers' names and parameter"
                f" shapes), but {what} has {found}: make a plan for it with `conveyor plan`"
            )

    def check_settings(
        self,
        schedule: str,
        ranks: int,
        virtual: int,
        microbatches: int,
        recompute: str,
        microbatch_size: int,
        offload: str = "none",
    ) -> None:
        """Refuse settings other than the plan's (the largest micro-batch's size included), naming the flags."""
        names = ("schedule", "ranks", "virtual", "microbatches", "recompute", "microbatch_size", "offload")
        ours = (
            self.schedule,
            self.ranks,
            self.virtual,
            self.microbatches,
            self.recompute,
            self.microbatch_size,
            self.offload,
        )
        # The same stages offload however they are written ("all", "0,1,2,3", "1,0").
        same_offload = _offloaded(offload, self.num_stages) == _offloaded(self.offload, self.num_stages)
        theirs = (
            schedule,
            ranks,
            virtual,
            microbatches,
            recompute,
            microbatch_size,
            self.offload if same_offload else offload,
        )
        differ = [k for k, a, b in zip(names, ours, theirs, strict=True) if a != b]
        if differ:
            flags = {k: a for k, a in zip(names, ours, strict=True)}
            wanted = " ".join(
                f"--batch-size {self.microbatch_size * self.microbatches}"
                if k == "microbatch_size"
                else f"--{k} {flags[k]}"
                for k in differ
            )
            got = ", ".join(f"{k.replace('_', ' ')} {b}" for k, b in zip(names, theirs, strict=True) if k in differ)
            raise ValueError(f"the plan {self.schedule} was made for other settings ({got} given): use {wanted}")


def _offloaded(spec: str, num_stages: int) -> frozenset[int] | str:
    try:
        return offload_stages(spec, num_stages)
    except ValueError:
        return spec  # differs from any valid setting; train itself says what is wrong with it


def split_with_plan(
    model: nn.Module | Callable[[], nn.Module],
    plan: Plan | str | Path,
    *,
    example_args: tuple[Any, ...] | None = None,
    blocks: str | None = None,
    seed: int = 0,
) -> Split:
    """The plan's stages of `model`, after checking that the plan is for this model: a `manual_split`, or for a
    plan of a traced model a `trace_split` on `example_args` (one micro-batch, as `trace_split` takes it)."""
    chosen = plan if isinstance(plan, Plan) else Plan.load(plan)
    if chosen.split == "traced":
        if example_args is None:
            raise ValueError("this plan cuts a traced model: give split_with_plan the example_args to trace it with")
        # Before the trace, which would refuse another model's counts less clearly.
        chosen.check_model(traced_fingerprint(model, blocks=blocks))
        return trace_split(model, example_args, layers_per_stage=chosen.layers_per_stage, blocks=blocks, seed=seed)
    whole = manual_split(model, 1, blocks=blocks, seed=seed)
    chosen.check_model(fingerprint(whole))
    return manual_split(model, chosen.num_stages, chosen.layers_per_stage, blocks=blocks, seed=seed)

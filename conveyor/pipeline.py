"""The user-facing pipeline: a rank's stages, a schedule, and `step(batch)`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .runtime.executor import Executor
from .runtime.microbatch import batch_size, map_tensors, microbatch_weights, split_microbatches, tensors_in
from .runtime.stage import LossFn, Stage
from .runtime.stage_io import StageIO
from .runtime.transport import Transport
from .schedules import Program, build_schedule
from .split.manual import split_model

__all__ = ["Pipeline", "OptimizerFactory", "RECOMPUTE"]

RECOMPUTE = ("none", "full", "all-but-last-stage")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Pipeline:
    """This rank's part of a pipeline-parallel model.

    Every rank of the process group builds a Pipeline with the same schedule
    and sizes, and calls `step` once per mini-batch: the rank of the first
    stage passes the inputs, the rank of the last stage the targets (the
    others may pass them too; they are ignored).

    `modules` maps each stage this rank runs to its module (a single module
    when the rank runs one stage). The model is cut into `num_stages` stages,
    `num_stages / ranks` per rank, placed as the schedule says
    (`program.stages_of(rank)`). `loss_fn(output, target)` must return the
    mean loss of a micro-batch; each micro-batch's loss is weighted by its
    share of the samples, so the accumulated gradients and the returned loss
    equal those of the whole mini-batch. With `optimizer` (a function of a
    stage's parameters), each stage steps and zeroes its gradients at the
    end of `step`; without it, gradients accumulate until you step yourself.

    `recompute` is GPipe's re-materialization: "full" keeps only each
    stage's inputs and runs its forward again during backward;
    "all-but-last-stage" spares the last stage, whose backward follows its
    forward at once. `track_memory` counts the bytes each stage holds for
    backward (`Stage.peak_held_bytes`), at a small cost per forward.
    """

    def __init__(
        self,
        modules: nn.Module | Mapping[int, nn.Module],
        *,
        num_stages: int,
        num_microbatches: int,
        loss_fn: LossFn,
        schedule: str = "1f1b",
        optimizer: OptimizerFactory | None = None,
        recompute: str = "none",
        track_memory: bool = False,
        device: torch.device | str = "cpu",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Pipeline needs torch.distributed to be initialized (see conveyor.launch)")
        self.rank = dist.get_rank(group)
        self.device = torch.device(device)
        ranks = dist.get_world_size(group)
        if num_stages % ranks:
            raise ValueError(f"{num_stages} stages cannot be spread evenly over {ranks} ranks")
        self.program: Program = build_schedule(schedule, ranks, num_microbatches, num_stages // ranks)
        local = self.program.stages_of(self.rank)
        if isinstance(modules, nn.Module):
            if len(local) != 1:
                raise ValueError(f"rank {self.rank} runs stages {local}: pass modules as {{stage: module}}")
            modules = {local[0]: modules}
        if sorted(modules) != local:
            raise ValueError(f"rank {self.rank} runs stages {local} of {schedule!r}; got modules for {sorted(modules)}")
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}; got {recompute!r}")
        last = num_stages - 1
        self.stages = {
            s: Stage(
                module.to(self.device),
                s,
                num_stages,
                loss_fn if s == last else None,
                recompute=recompute == "full" or (recompute == "all-but-last-stage" and s != last),
                track_memory=track_memory,
            )
            for s, module in modules.items()
        }
        # A stage without parameters (say, only an activation) gets no optimizer: torch refuses an empty list.
        self.optimizers = {
            s: optimizer(params)
            for s, stage in self.stages.items()
            if optimizer and (params := list(stage.module.parameters()))
        }
        self.num_microbatches = num_microbatches
        self._group = group
        # Besides the schedule's links, one from the last stage's rank to each other rank, for its loss.
        loss_links = {("loss", r): (self.last_rank, r) for r in range(ranks) if r != self.last_rank}
        self.transport = Transport.open({**self.program.links(), **loss_links}, self.device, group)
        io = StageIO(self.transport, self.program, self.rank)
        self.executor = Executor(self.program, self.rank, self.stages, io, self._optimizer_step if optimizer else None)

    @classmethod
    def from_model(
        cls,
        model: nn.Module | Callable[[], nn.Module],
        *,
        num_stages: int,
        layers_per_stage: list[int] | None = None,
        blocks: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> Pipeline:
        """Split `model` by hand (see `split_model`) and keep the stages this rank runs."""
        group = kwargs.get("group")
        ranks = dist.get_world_size(group)
        placement = build_schedule(
            kwargs.get("schedule", "1f1b"), ranks, kwargs["num_microbatches"], max(1, num_stages // ranks)
        )
        modules = {
            stage: split_model(
                model, stage, num_stages, layers_per_stage, blocks=blocks, device=kwargs.get("device", "cpu"), seed=seed
            )
            for stage in placement.stages_of(dist.get_rank(group))
        }
        return cls(modules, num_stages=num_stages, **kwargs)

    @property
    def first_rank(self) -> int:
        return self.program.rank_of(0)

    @property
    def last_rank(self) -> int:
        return self.program.rank_of(self.program.num_stages - 1)

    def step(self, inputs: Any = None, targets: Any = None, *, loss_on_all_ranks: bool = False) -> torch.Tensor | None:
        """Run one mini-batch through the pipeline: forward, backward and (with an optimizer) a step.

        Returns the mini-batch loss on the last stage's rank (on every rank
        with `loss_on_all_ranks`, at the cost of one message per rank), else None.
        """
        m = self.num_microbatches
        input_mbs = target_mbs = weights = None
        signature = None
        if 0 in self.stages:
            if inputs is None:
                raise ValueError(f"rank {self.rank} runs the first stage: step() needs the inputs")
            input_mbs = split_microbatches(map_tensors(inputs, lambda t: t.to(self.device)), m)
            signature = _signature(input_mbs)
        last = self.program.num_stages - 1
        if last in self.stages:
            if targets is None:
                raise ValueError(f"rank {self.rank} runs the last stage: step() needs the targets")
            target_mbs = split_microbatches(map_tensors(targets, lambda t: t.to(self.device)), m)
            weights = microbatch_weights(batch_size(targets), m)
        self.executor.run(input_mbs, target_mbs, weights, signature)
        loss = torch.stack(self.stages[last].pop_losses()).sum() if last in self.stages else None
        if loss_on_all_ranks:
            loss = self._share_loss(loss)
        return loss

    def close(self) -> None:
        """End the messages left waiting for a next step (see `StageIO.close`); every rank calls it after the same step.

        Without it, a rank keeps one receive posted after the last step for each
        of its stages that another rank feeds. `with Pipeline(...) as pipe:`
        closes when the block ends without an error. A later step still works.
        """
        self.executor.io.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:  # after an error the other ranks may never answer: do not wait on them
            self.close()

    def _share_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The last stage's loss on every rank, in float32 elsewhere.

        Point-to-point messages rather than a broadcast: gloo runs a collective
        on a worker thread that drops its tensors after the caller has gone on,
        and a rank that exits right after its last step can then abort in that
        thread ("terminate called without an active exception").
        """
        if loss is not None:
            for link in self.transport.links:
                if link[0] == "loss":
                    self.transport.send(loss.detach().float(), link)
            self.transport.flush()
            return loss
        return self.transport.recv_now((), torch.float32, ("loss", self.rank))

    def parameters(self) -> Iterator[nn.Parameter]:
        for stage in self.stages.values():
            yield from stage.module.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters, under their names in the full model."""
        for stage in self.stages.values():
            yield from stage.module.named_parameters()

    def zero_grad(self) -> None:
        for stage in self.stages.values():
            stage.module.zero_grad(set_to_none=True)

    def _optimizer_step(self, stage: int) -> None:
        if stage in self.optimizers:
            self.optimizers[stage].step()
            self.optimizers[stage].zero_grad(set_to_none=True)


def _signature(microbatches: list[Any]) -> int:
    """A 63-bit name for the shapes and dtypes of a step's micro-batches (only its equality matters)."""
    described = tuple(tuple((tuple(t.shape), t.dtype) for t in tensors_in(mb)) for mb in microbatches)
    return hash(described) & (2**63 - 1)

"""The user-facing pipeline: a rank's stages, a schedule, and `step(batch)`."""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .runtime.agreement import agree
from .runtime.executor import Executor
from .runtime.host_memory import keep_freed_host_memory
from .runtime.loss_scale import LossScale
from .runtime.microbatch import (
    batch_size,
    concat_microbatches,
    map_tensors,
    microbatch_weights,
    split_microbatches,
    tensors_in,
)
from .runtime.offload import offloaded_stages
from .runtime.shared import SharedGradients, shared_channels
from .runtime.stage import LossFn, MicrobatchResult, Stage
from .runtime.stage_io import StageIO
from .runtime.transport import Channel, Transport
from .runtime.weights import WeightVersions
from .schedules import Kind, Program, StageGraph, build_schedule, schedule_info, validate
from .split import Split, manual_split

__all__ = ["Pipeline", "OptimizerFactory", "RECOMPUTE"]

RECOMPUTE = ("none", "full", "all-but-last-stage")
NONFINITE = ("raise", "skip", "allow")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Pipeline:
    """This rank's part of a pipeline-parallel model.

    Every rank of the process group builds a Pipeline with the same split,
    schedule and sizes, and calls `step` once per mini-batch: the rank of the
    first stage passes the inputs, the rank of the last stage the targets (the
    others may pass them too; they are ignored).

    `model` is a split of the model (`manual_split`, `trace_split`): each rank
    builds the stages the schedule places on it, and the split's stage graph
    (skip connections, tied parameters) becomes the program's transfers and
    reductions. Or it is this rank's own stage modules: one module when the
    rank runs one stage, else `{stage: module}`; then `num_stages` says how
    many stages there are, in a chain. The model is cut into
    `num_stages / ranks` stages per rank, placed as the schedule says
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
    `offload` ("none", "all" or stage indices) moves what those stages save
    for backward to host memory between a micro-batch's forward and its
    backward, where the schedule leaves at least three computes between them
    (OFFLOAD and RELOAD actions in the program: `runtime/offload.py`).

    `autocast=torch.bfloat16` runs every forward, its replay and the loss
    under `torch.autocast` (mixed precision: fp32 weights, gradients and
    optimizer state; bf16 matmuls, whose outputs cross ranks in bf16).
    `autocast=torch.float16` does the same in float16 and scales the loss
    (`loss_scale`, as torch's GradScaler): an update in which any stage's
    gradients overflowed is skipped on every rank (synchronous schedules).

    An asynchronous schedule (`pipedream`, `pipedream-2bw`) never flushes
    between mini-batches: feed it with `stream`. Each backward then uses the
    weights its forward used (weight stashing; `weight_stashing=False` is the
    ablation that backpropagates with the latest weights), and with
    `vertical_sync` every stage uses the version the first stage used for
    that micro-batch.

    `replicas` (PipeDream's 1F1B-RR; gpipe, 1f1b, pipedream, pipedream-2bw)
    holds stage s on replicas[s] ranks, in order: (2, 1) puts stage 0 on ranks
    0 and 1 and stage 1 on rank 2. A replicated stage's ranks take its
    micro-batches round-robin and sum their gradients before each step, so
    they keep identical weights; they must start identical (every rank builds
    its stages from the same split and seed). Replicating every stage
    alike, `replicas=(D,) * stages`, is pipeline x data parallelism: D
    pipelines that each run every D-th micro-batch and sum their gradients
    (`mesh=` builds it from a DeviceMesh). Under a synchronous schedule the
    last stage may be replicated too: its ranks add up their micro-batches'
    losses, so each returns the mini-batch's. Stages with tied parameters,
    and the last stage of an asynchronous schedule (whose rank streams each
    micro-batch's loss), are not replicated.

    `timeout_s` bounds each wait for another rank's message (over gloo; NCCL
    keeps its process group's timeout): a peer that is stuck, stopped or
    making other calls is reported as a TimeoutError naming this rank, the
    peer, the link and the micro-batch, and a peer that ended as a
    ConnectionError. None waits as long as the process group does.

    `nonfinite` guards the weights against a NaN or inf: before each update a
    stage checks its gradients, and "raise" (the default) stops with an error
    naming the stage and the update, "skip" skips that update with a warning
    (a non-finite loss makes every stage's gradients non-finite, so every
    stage skips it), "allow" applies it.
    """

    def __init__(
        self,
        model: Split | nn.Module | Mapping[int, nn.Module],
        *,
        num_microbatches: int,
        loss_fn: LossFn,
        num_stages: int | None = None,
        schedule: str = "1f1b",
        optimizer: OptimizerFactory | None = None,
        recompute: str = "none",
        offload: str | Sequence[int] = "none",
        track_memory: bool = False,
        autocast: torch.dtype | None = None,
        weight_stashing: bool = True,
        vertical_sync: bool = False,
        replicas: Sequence[int] | None = None,
        mesh: DeviceMesh | None = None,
        timeout_s: float | None = 120.0,
        nonfinite: str = "raise",
        device: torch.device | str = "cpu",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be torch.bfloat16, torch.float16 or None; got {autocast}")
        if autocast is torch.float16 and schedule_info(schedule).asynchronous:
            raise ValueError(
                f"autocast=torch.float16 needs a loss scale that every stage steps or skips with, once per step;"
                f" {schedule} updates inside a stream: use bfloat16"
            )
        if not dist.is_initialized():
            raise RuntimeError("Pipeline needs torch.distributed to be initialized (see conveyor.launch)")
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}; got {recompute!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}; got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.loss_scale = LossScale() if autocast is torch.float16 else None
        """float16's dynamic loss scale (`runtime/loss_scale.py`), the same on every rank; None otherwise."""
        self.last_grad_norm: torch.Tensor | None = None
        self.steps_taken: dict[int, int] = {}
        self.skipped_steps = 0
        self.rank = dist.get_rank(group)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_host_memory()  # each step frees and allocates the same again (runtime/host_memory.py)
        ranks = dist.get_world_size(group)
        split = model if isinstance(model, Split) else None
        graph = split.graph if split is not None else None
        if graph is not None and num_stages not in (None, graph.num_stages):
            raise ValueError(f"the split has {graph.num_stages} stages; got num_stages={num_stages}")
        if graph is None and num_stages is None:
            raise ValueError("give num_stages with stage modules (or pass a split, which knows it)")
        total = graph.num_stages if graph is not None else num_stages
        assert total is not None
        if mesh is not None:
            replicas = _replicas_of_mesh(mesh, total, replicas, group)
        self.graph: StageGraph = graph or StageGraph.chain(total)
        # Before anything that could fail on some ranks only: ranks that disagree would send each other
        # messages of other sizes or in another order (a crash or a hang); here they all raise at once.
        settings: dict[str, int | bool | str] = {
            "schedule": schedule,
            "num_stages": total,
            "num_microbatches": num_microbatches,
            "replicas": str(None if replicas is None else tuple(replicas)),
            "vertical_sync": vertical_sync,
            "weight_stashing": weight_stashing,
            "autocast": str(autocast),
            "stage graph": self.graph.describe(),
        }
        agree(settings, group, torch.device("cpu") if dist.get_backend(group) == "gloo" else self.device)
        if replicas is not None:
            self._check_replicas(tuple(replicas), total, ranks, schedule)
        elif total % ranks:
            raise ValueError(f"{total} stages cannot be spread evenly over {ranks} ranks")
        self._schedule, self._vertical_sync = schedule, vertical_sync
        self._replicas = None if replicas is None else tuple(replicas)
        self._num_ranks = ranks
        self.num_microbatches = num_microbatches
        self._offload = offloaded_stages(offload, total, recompute)
        self.program: Program = self._build()
        local = self.program.stages_of(self.rank)
        modules = self._local_modules(model, split, local, schedule)
        self._share_local_ties(modules)
        last = total - 1
        self.stages = {
            s: Stage(
                module.to(self.device),
                s,
                total,
                loss_fn if s == last else None,
                recompute=recompute == "full" or (recompute == "all-but-last-stage" and s != last),
                track_memory=track_memory,
                autocast=autocast,
            )
            for s, module in modules.items()
        }
        if self.program.asynchronous:
            for s, stage in self.stages.items():
                stage.versions = WeightVersions(stage.module, s, stashing=weight_stashing)
        self.optimizers = self._optimizers(optimizer)
        self._group = group
        # Besides the schedule's channels: between the ranks of a replicated last stage, for their parts of
        # the loss; from the last stage's (first) rank to each other rank, for the loss; and between the
        # ranks of each tied parameter and of each replicated stage, for their gradients.
        last_ranks = self.program.replicas_of(total - 1)
        loss: dict[Channel, tuple[int, int]] = {
            ("loss", a, b): (a, b)
            for a in last_ranks
            for b in range(ranks)
            if a != b and (a == self.last_rank or b in last_ranks)
        }
        channels: dict[Channel, tuple[int, int]] = {
            **self.program.channels(),
            **loss,
            **shared_channels(self.program),
        }
        self.transport = Transport.open(channels, self.device, group, timeout_s)
        shared = self._shared_gradients(mesh)
        io = StageIO(self.transport, self.program, self.rank)
        self.executor = Executor(
            self.program, self.rank, self.stages, io, self._optimizer_step if optimizer else None, shared
        )
        self._forward_program: Program | None = None
        self._streams: dict[int, Program] = {}
        self._stream_lr: Callable[[int], float] | None = None

    @classmethod
    def from_model(
        cls,
        model: nn.Module | Callable[[], nn.Module],
        *,
        num_stages: int,
        layers_per_stage: Sequence[int] | None = None,
        blocks: str | None = None,
        init: Callable[[nn.Module], None] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> Pipeline:
        """Split `model` by hand (see `manual_split`) and keep the stages this rank runs."""
        split = manual_split(model, num_stages, layers_per_stage, blocks=blocks, init=init, seed=seed)
        return cls(split, **kwargs)

    def _local_modules(
        self, model: Split | nn.Module | Mapping[int, nn.Module], split: Split | None, local: list[int], schedule: str
    ) -> dict[int, nn.Module]:
        if split is not None:
            return {s: split.build_stage(s, "cpu") for s in local}
        if isinstance(model, nn.Module):
            if len(local) != 1:
                raise ValueError(f"rank {self.rank} runs stages {local}: pass modules as {{stage: module}}")
            return {local[0]: model}
        assert isinstance(model, Mapping)
        if sorted(model) != local:
            raise ValueError(f"rank {self.rank} runs stages {local} of {schedule!r}; got modules for {sorted(model)}")
        return dict(model)

    def _share_local_ties(self, modules: dict[int, nn.Module]) -> None:
        """Stages of a tie that share this rank use one tensor (the first's), so autograd sums their parts."""
        for tie in self.graph.ties:
            here = [s for s in tie.stages if s in modules]
            if len(here) < 2:
                continue
            first = modules[here[0]].get_parameter(tie.name_on(here[0]))
            for s in here[1:]:
                name = tie.name_on(s)
                other = modules[s].get_parameter(name)
                if other.shape != first.shape or not torch.equal(other.detach().cpu(), first.detach().cpu()):
                    raise ValueError(
                        f"tied parameter {tie.name_on(here[0])} of stage {here[0]} and {name} of stage {s}"
                        " start with different values; a tie must start equal (build both stages from one split)"
                    )
                owner, _, attribute = name.rpartition(".")
                setattr(modules[s].get_submodule(owner), attribute, first)

    def _optimizers(self, optimizer: OptimizerFactory | None) -> dict[int, torch.optim.Optimizer]:
        """One per stage, over its parameters; a tensor shared with an earlier stage on this rank is stepped there."""
        if optimizer is None:
            return {}
        seen: set[int] = set()
        optimizers = {}
        for s, stage in sorted(self.stages.items()):
            params = [p for p in stage.module.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            # A stage without parameters (say, only an activation) gets no optimizer: torch refuses an empty list.
            if params:
                optimizers[s] = optimizer(params)
        return optimizers

    def _build(self, **kwargs: Any) -> Program:
        """This pipeline's schedule, ranks, stages, graph and replicas, with `kwargs` (a stream, forwards only)."""
        ranks = self._num_ranks
        return build_schedule(
            self._schedule,
            ranks,
            self.num_microbatches,
            None if self._replicas is not None else self.graph.num_stages // ranks,
            graph=self.graph,
            vertical_sync=self._vertical_sync,
            replicas=self._replicas,
            offload=self._offload,
            **kwargs,
        )

    def _check_replicas(self, replicas: tuple[int, ...], num_stages: int, ranks: int, schedule: str) -> None:
        if len(replicas) != num_stages:
            raise ValueError(f"replicas {replicas} name {len(replicas)} stages; the model has {num_stages}")
        if sum(replicas) != ranks:
            raise ValueError(f"replicas {replicas} hold {sum(replicas)} ranks; the process group has {ranks}")
        if replicas[-1] != 1 and schedule_info(schedule).asynchronous:
            raise ValueError(
                f"the last stage has {replicas[-1]} replicas: under {schedule} conveyor does not replicate the"
                " last stage, whose rank streams every micro-batch's loss in order"
            )
        for tie in self.graph.ties:
            if any(replicas[s] > 1 for s in tie.stages):
                raise ValueError(
                    f"stages {list(tie.stages)} share a tied parameter and one of them is replicated: conveyor does"
                    " not replicate stages with tied parameters"
                )

    def _replica_groups(self, mesh: DeviceMesh | None) -> dict[int, dist.ProcessGroup]:
        """The process group of each replicated stage on this rank: the mesh's "dp" group, or one made here
        by the stage's ranks (in stage order on each)."""
        groups = {}
        for s in range(self.program.num_stages):
            ranks = self.program.replicas_of(s)
            if len(ranks) < 2 or self.rank not in ranks:
                continue
            if mesh is not None:
                groups[s] = mesh.get_group("dp")
            else:
                members = [r if self._group is None else dist.get_global_rank(self._group, r) for r in ranks]
                created = dist.new_group(members, use_local_synchronization=True)
                assert created is not None
                groups[s] = created
        return groups

    def _shared_gradients(self, mesh: DeviceMesh | None) -> SharedGradients | None:
        """This rank's tied and replicated parameters, after checking that every rank holding them starts
        with the same bits."""
        tied = {}
        for index, tie in enumerate(self.graph.ties):
            here = [s for s in tie.stages if s in self.stages]
            if here:
                tied[index] = self.stages[here[0]].module.get_parameter(tie.name_on(here[0]))
                names = ", ".join(f"stage {s} {name}" for s, name in tie.names)
                ranks = sorted({self.program.rank_of(s) for s in tie.stages})
                self._check_equal_start(f"tie{index}", ranks, [tied[index]], f"tied parameter ({names})")
        replicated = {}
        for s, stage in self.stages.items():
            ranks = list(self.program.replicas_of(s))
            if len(ranks) > 1:
                replicated[s] = list(stage.module.parameters())
                self._check_equal_start(f"replicas{s}", ranks, replicated[s], f"stage {s}'s weights")
        if not tied and not replicated:
            return None
        return SharedGradients(self.program, self.rank, tied, replicated, self._replica_groups(mesh), self.transport)

    def _check_equal_start(self, group: str, ranks: list[int], params: Sequence[nn.Parameter], what: str) -> None:
        """Raise unless `params` have the same bits on every rank of `ranks` (they sum gradients and step alike)."""
        if len(ranks) < 2:
            return
        digest = _digest(params)
        others = {}
        for r in ranks:
            if r != self.rank:
                self.transport.send(digest, (group, self.rank, r))
                others[r] = self.transport.recv(tuple(digest.shape), digest.dtype, (group, r, self.rank))
        differing = [r for r, incoming in others.items() if not torch.equal(incoming.wait(), digest)]
        self.transport.flush()
        if differing:
            raise ValueError(
                f"{what} differ between rank {self.rank} and rank(s) {differing} at the start; they must start"
                " equal on every rank that holds them (build every rank's stages from one split and seed)"
            )

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group the pipeline's ranks belong to (None: the default group)."""
        return self._group

    @property
    def first_rank(self) -> int:
        return self.program.rank_of(0)

    @property
    def last_rank(self) -> int:
        """The rank that reports the loss: the last stage's (its first replica's, when it is replicated)."""
        return self.last_ranks[0]

    @property
    def last_ranks(self) -> tuple[int, ...]:
        """The ranks that hold the last stage (several when it is replicated); each returns the loss."""
        return self.program.replicas_of(self.program.num_stages - 1)

    def step(
        self,
        inputs: Any = None,
        targets: Any = None,
        *,
        loss_on_all_ranks: bool = False,
        losses: list[torch.Tensor] | None = None,
        outputs: list[Any] | None = None,
        max_grad_norm: float | None = None,
    ) -> torch.Tensor | None:
        """Run one mini-batch through the pipeline: forward, backward and (with an optimizer) a step.

        Returns the mini-batch loss on the last stage's rank (on each of its
        ranks when it is replicated; on every rank with `loss_on_all_ranks`,
        at the cost of one message per rank), else None. On the last stage's
        rank, `losses` (if given) is filled with each micro-batch's mean loss
        (a replica's own micro-batches', when it is replicated), and `outputs` with each micro-batch's output
        of the last stage (kept, detached, only when asked).

        With `max_grad_norm`, the gradients are clipped by their global norm
        over every stage (a tied or replicated parameter counted once), as
        `torch.nn.utils.clip_grad_norm_` clips the unsplit model's, and the
        steps wait until the program has run; `last_grad_norm` is the norm
        before clipping, on every rank.
        """
        if outputs is not None:
            self._check_whole_outputs("step(outputs=...)")
        if self.program.asynchronous:
            raise RuntimeError(
                f"{self._schedule} never flushes between mini-batches, so it runs no single step: feed it with"
                " Pipeline.stream(batches, num_batches), which drains at the end"
            )
        if max_grad_norm is None and self.loss_scale is None:
            results = self._run(self.program, inputs, targets, outputs is not None, loss_on_all_ranks)
            return self._report(results, loss_on_all_ranks, losses, outputs)
        # The global norm and float16's overflow check need every stage's gradients: step once the program is done.
        deferred: list[int] = []
        self.executor.optimizer_step = lambda stage, mb: deferred.append(stage)
        last = self.stages.get(self.program.num_stages - 1)
        if last is not None and self.loss_scale is not None:
            last.loss_scale = self.loss_scale.scale
        try:
            results = self._run(self.program, inputs, targets, outputs is not None, loss_on_all_ranks)
        finally:
            self.executor.optimizer_step = self._optimizer_step if self.optimizers else None
        finite = True
        if self.loss_scale is not None:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            finite = self.loss_scale.unscale(grads, self._group, self.device)
        if finite:
            if max_grad_norm is not None:
                self.last_grad_norm = self.clip_grad_norm_(max_grad_norm)
            for stage in deferred:
                self._optimizer_step(stage)
        else:  # a gradient overflowed on some rank: every rank skips this update, and the scale backs off
            self.zero_grad()
            self.last_grad_norm = torch.tensor(math.inf)
        if self.loss_scale is not None:
            self.loss_scale.update(finite)
        return self._report(results, loss_on_all_ranks, losses, outputs)

    def grad_norm(self) -> torch.Tensor:
        """The global 2-norm of the gradients over every stage on every rank (each rank must call it).

        A parameter held by several stages or ranks (tied, or a replicated stage's) counts once: on the
        rank of its first holder. One all-reduce over the pipeline's group.
        """
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for param in self._counted_parameters():
            if param.grad is not None:
                squares += param.grad.detach().double().pow(2).sum()
        if dist.get_backend(self._group) == "gloo":
            squares = squares.cpu()
        dist.all_reduce(squares, group=self._group)
        return squares.sqrt().to(torch.float32)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale every gradient so that their global norm is at most `max_norm`; returns the norm before."""
        norm = self.grad_norm()
        scale = max_norm / (float(norm) + 1e-6)
        if scale < 1.0:
            for param in self.parameters():
                if param.grad is not None:
                    param.grad.mul_(scale)
        return norm

    def _counted_parameters(self) -> list[nn.Parameter]:
        """This rank's parameters whose gradient it counts in the global norm (see `grad_norm`)."""
        skipped: set[int] = set()
        counted: set[int] = set()  # a tie's tensor on the rank of its first stage (shared there by local stages)
        for tie in self.graph.ties:
            first = min(tie.stages)
            for s in tie.stages:
                if s in self.stages:
                    tensor = id(self.stages[s].module.get_parameter(tie.name_on(s)))
                    (counted if s == first else skipped).add(tensor)
        skipped -= counted
        for s, stage in self.stages.items():
            if self.program.replicas_of(s)[0] != self.rank:  # another replica counts this stage
                skipped.update(id(p) for p in stage.module.parameters())
        return [p for p in self.parameters() if id(p) not in skipped]

    def evaluate(
        self, inputs: Any = None, targets: Any = None, *, loss_on_all_ranks: bool = False
    ) -> torch.Tensor | None:
        """The mini-batch loss without backward or step, nothing kept for a backward (evaluation).

        Runs the schedule's forwards in its order and placement. Returns the
        loss where `step` would.
        """
        if self.rank in self.last_ranks and targets is None:
            raise ValueError(f"rank {self.rank} runs the last stage: evaluate() needs the targets")
        results = self._run(self.forward_program, inputs, targets, False, loss_on_all_ranks)
        return self._report(results, loss_on_all_ranks, None, None)

    def predict(self, inputs: Any = None) -> Any:
        """The last stage's output for the mini-batch (micro-batches joined along dimension 0), without backward.

        On the last stage's rank; None on the others.
        """
        self._check_whole_outputs("predict()")
        results = self._run(self.forward_program, inputs, None, True)
        if results is None:
            return None
        return concat_microbatches([r.output for r in results])

    def _check_whole_outputs(self, what: str) -> None:
        if len(self.last_ranks) > 1:
            raise ValueError(
                f"{what}: the last stage is replicated on ranks {list(self.last_ranks)}, and each holds only the"
                " outputs of its own micro-batches; replicate only the earlier stages to get every output on one rank"
            )

    @property
    def forward_program(self) -> Program:
        """The schedule's forwards alone, for `evaluate` and `predict`."""
        if self._forward_program is None:
            self._forward_program = self._build(forward_only=True)
        return self._forward_program

    def _run(
        self, program: Program, inputs: Any, targets: Any, keep_outputs: bool, loss_on_all_ranks: bool = False
    ) -> list[MicrobatchResult] | None:
        """Split the mini-batch, run `program` once, and return the last stage's results (on its rank)."""
        m = self.num_microbatches
        input_mbs = target_mbs = weights = None
        signature = None
        _check_rows(inputs, targets, "")
        if 0 in self.stages:
            if inputs is None:
                raise ValueError(f"rank {self.rank} runs the first stage: {_method(program)}() needs the inputs")
            input_mbs = split_microbatches(map_tensors(inputs, lambda t: t.to(self.device)), m)
            signature = _signature(input_mbs)
        last = self.program.num_stages - 1
        if last in self.stages:
            if targets is None and not program.forward_only:
                raise ValueError(f"rank {self.rank} runs the last stage: step() needs the targets")
            if targets is not None:
                target_mbs = split_microbatches(map_tensors(targets, lambda t: t.to(self.device)), m)
                weights = microbatch_weights(batch_size(targets), m)
        options = ("loss_on_all_ranks", int(loss_on_all_ranks))  # it decides who waits for the loss message
        self.executor.run(input_mbs, target_mbs, weights, signature, program, keep_outputs, options)
        return self.stages[last].pop_results() if last in self.stages else None

    def stream(
        self, batches: Iterable[tuple[Any, Any]], num_batches: int, lr: Callable[[int], float] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Train on `num_batches` mini-batches of `batches` ((inputs, targets) pairs), yielding each
        micro-batch's mean loss as its forward ends: (micro-batch index in the stream, loss), on the last
        stage's rank (nothing elsewhere; iterate it on every rank all the same).

        `lr(i)`, if given, is the learning rate of the updates that follow mini-batch i of the stream (from
        0): a warm-up or a decay. An asynchronous schedule's stages update at their own times, so each sets
        the rate of its own updates from the mini-batch that each follows (all of pipedream's updates within
        a mini-batch share its rate); no rank waits for another.

        An asynchronous schedule runs them as one program that stays full across mini-batch boundaries and
        drains only at the end, after which every micro-batch's work is done (stop a stream there before a
        checkpoint or an evaluation). Its micro-batches must all have the same shapes (a batch size divisible
        by the micro-batches). A synchronous schedule steps once per mini-batch, as `step` does. Every rank
        iterates its own `batches` (the same data; the first stage's rank reads the inputs, the last
        stage's the targets).
        """
        if num_batches < 1:
            raise ValueError(f"a stream needs at least 1 mini-batch; got {num_batches}")
        self._stream_lr = lr
        try:
            if self.program.asynchronous:
                yield from self._stream_async(batches, num_batches)
            else:
                yield from self._stream_steps(batches, num_batches)
        finally:
            self._stream_lr = None

    def _stream_async(self, batches: Iterable[tuple[Any, Any]], num_batches: int) -> Iterator[tuple[int, torch.Tensor]]:
        """An asynchronous schedule's stream: one program over all `num_batches` mini-batches."""
        program = self._stream_program(num_batches)
        feed = _Feed(iter(batches), self.num_microbatches, num_batches, self.device, program.microbatches_per_step)
        last = self.stages.get(self.program.num_stages - 1)
        inputs = feed.inputs if 0 in self.stages else None
        targets = feed.targets if last is not None else None
        weights = feed.weights if last is not None else None
        signature = feed.signature() if 0 in self.stages else None
        reported = 0
        for action in self.executor.walk(inputs, targets, weights, signature, program, uniform=True):
            if last is not None and action.kind is Kind.FORWARD and action.stage == last.index:
                for result in last.pop_results():
                    assert result.loss is not None
                    yield reported, result.loss
                    reported += 1

    def _stream_steps(self, batches: Iterable[tuple[Any, Any]], num_batches: int) -> Iterator[tuple[int, torch.Tensor]]:
        """A synchronous schedule's stream: one step per mini-batch, its micro-batch losses in order."""
        reported = 0
        for index, (inputs, targets) in enumerate(batches):
            if index == num_batches:
                break
            if self._stream_lr is not None:
                _set_lr(self.optimizers.values(), self._stream_lr(index))
            losses: list[torch.Tensor] = []
            self.step(inputs, targets, losses=losses)
            for loss in losses:
                yield reported, loss
                reported += 1

    def _stream_program(self, num_batches: int) -> Program:
        if num_batches not in self._streams:
            # One length at a time: a stream of another length builds its own.
            self._streams = {num_batches: self._build(mini_batches=num_batches)}
        return self._streams[num_batches]

    def _report(
        self,
        results: list[MicrobatchResult] | None,
        loss_on_all_ranks: bool,
        losses: list[torch.Tensor] | None,
        outputs: list[Any] | None,
    ) -> torch.Tensor | None:
        loss = None
        if results is not None:
            weighted = [r.loss * r.weight for r in results if r.loss is not None]
            loss = torch.stack(weighted).sum() if weighted else torch.zeros((), device=self.device)
            if losses is not None:
                losses[:] = [r.loss for r in results if r.loss is not None]
            if outputs is not None:
                outputs[:] = [r.output for r in results]
            if len(self.last_ranks) > 1:
                loss = self._sum_over_last_replicas(loss.detach())
        if loss_on_all_ranks:
            loss = self._share_loss(loss)
        return loss

    def run_program(self, program: Program, inputs: Any = None, targets: Any = None) -> None:
        """Run `program` once over a mini-batch: a lowered program of this pipeline's own stages, placement and
        micro-batch count, in an order of the caller's (the graph profiler's, `observe/profile_graph.py`). It is
        validated first; its STEP actions, if any, step the optimizers."""
        if program.placement != self.program.placement or program.num_microbatches != self.num_microbatches:
            raise ValueError(
                f"run_program needs this pipeline's placement {self.program.placement} and"
                f" {self.num_microbatches} micro-batches; got {program.placement} and {program.num_microbatches}"
            )
        validate(program)
        self._run(program, inputs, targets, False)

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
        if self.rank == self.last_rank:
            assert loss is not None
            for r in range(self._num_ranks):
                if r not in self.last_ranks:
                    self.transport.send(loss.detach().float(), ("loss", self.rank, r))
            self.transport.flush()
            return loss
        if loss is not None:  # another replica of the last stage: it has the sum already
            return loss
        return self.transport.recv_now((), torch.float32, ("loss", self.last_rank, self.rank))

    def _sum_over_last_replicas(self, part: torch.Tensor) -> torch.Tensor:
        """The mini-batch loss from the parts of a replicated last stage's ranks, added in rank order on each
        (the same bits on every one of them)."""
        incoming = {}
        for r in self.last_ranks:
            if r != self.rank:
                self.transport.send(part, ("loss", self.rank, r))
                incoming[r] = self.transport.recv(tuple(part.shape), part.dtype, ("loss", r, self.rank))
        parts = {self.rank: part, **{r: message.wait() for r, message in incoming.items()}}
        self.transport.flush()
        total = parts[self.last_ranks[0]]
        for r in self.last_ranks[1:]:
            total = total + parts[r]
        return total

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters, each once (a tied tensor shared by two local stages included once)."""
        for _, param in self.named_parameters():
            yield param

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters, under their names in the full model (a tied one under its first stage's name)."""
        seen: set[int] = set()
        for _, stage in sorted(self.stages.items()):
            for name, param in stage.module.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield name, param

    def zero_grad(self) -> None:
        for stage in self.stages.values():
            stage.module.zero_grad(set_to_none=True)

    def _optimizer_step(self, stage: int, mb: int | None = None) -> None:
        if stage not in self.optimizers:
            return
        optimizer = self.optimizers[stage]
        if self._stream_lr is not None and mb is not None:
            # Each update of a stream takes the rate of the mini-batch it follows, on every stage alike.
            _set_lr([optimizer], self._stream_lr(mb // self.num_microbatches))
        self.steps_taken[stage] = self.steps_taken.get(stage, 0) + 1
        # Under float16 the loss scale has checked every rank's gradients already (and skips together).
        if self.nonfinite != "allow" and self.loss_scale is None and not _finite_grads(optimizer):
            where = f"stage {stage} (rank {self.rank}), update {self.steps_taken[stage]}"
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"{where}: the gradients hold NaN or inf (a non-finite loss, or an overflow); the weights were"
                    " not changed. Pipeline(nonfinite='skip') skips such updates instead"
                )
            warnings.warn(f"{where}: the gradients hold NaN or inf; this update is skipped", stacklevel=2)
            self.skipped_steps += 1
        else:
            optimizer.step()
        # Only this optimizer's parameters: a tied tensor another local stage steps keeps its gradient for it.
        optimizer.zero_grad(set_to_none=True)


def _set_lr(optimizers: Iterable[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


class _Feed:
    """A stream's micro-batches, read from its mini-batches as the executor asks for them, in order.

    `inputs[k]`, `targets[k]` and `weights[k]` are those of micro-batch k; a mini-batch is read
    when its first micro-batch is asked for and let go once the next one is read.
    """

    def __init__(
        self, batches: Iterator[tuple[Any, Any]], m: int, num_batches: int, device: torch.device, per_step: int | None
    ) -> None:
        self._batches, self._m, self._num_batches, self._device = batches, m, num_batches, device
        self._per_step = per_step or m
        self._index = -1
        self._current: tuple[list[Any], list[Any], list[float]] = ([], [], [])
        self._first: Any = None
        self.inputs = _Column(self, 0)
        self.targets = _Column(self, 1)
        self.weights = _Column(self, 2)

    def signature(self) -> int:
        """The shapes of the stream's micro-batches (every one must have them): those of the first."""
        return _signature([self.get(0, 0)])

    def get(self, k: int, column: int) -> Any:
        batch, j = divmod(k, self._m)
        if batch != self._index:
            if batch != self._index + 1 or batch >= self._num_batches:
                raise RuntimeError(f"the stream asked for micro-batch {k} out of order (mini-batch {self._index})")
            self._read(batch)
        return self._current[column][j]

    def _read(self, batch: int) -> None:
        try:
            inputs, targets = next(self._batches)
        except StopIteration:
            raise ValueError(f"the stream's batches ended after {batch} of the {self._num_batches} asked for") from None
        m, device = self._m, self._device
        _check_rows(inputs, targets, f" of mini-batch {batch}")
        input_mbs = split_microbatches(map_tensors(inputs, lambda t: t.to(device)), m) if inputs is not None else []
        target_mbs = split_microbatches(map_tensors(targets, lambda t: t.to(device)), m) if targets is not None else []
        for mb in input_mbs:
            shapes = _signature([mb])
            if self._first is None:
                self._first = shapes
            elif shapes != self._first:
                raise ValueError(
                    f"mini-batch {batch} splits into micro-batches of other shapes than the stream's first: an"
                    " asynchronous stream needs every micro-batch alike (a batch size divisible by the micro-batches)"
                )
        sizes = [len(part) for part in torch.arange(batch_size(targets)).tensor_split(m)] if targets is not None else []
        # Each step's loss is the mean over the micro-batches it applies (one, or a whole mini-batch).
        weights = [
            n / sum(sizes[j - j % self._per_step : j - j % self._per_step + self._per_step])
            for j, n in enumerate(sizes)
        ]
        self._index = batch
        self._current = (input_mbs, target_mbs, weights)


class _Column:
    """One of a `_Feed`'s sequences (inputs, targets or loss weights), indexed by micro-batch."""

    def __init__(self, feed: _Feed, column: int) -> None:
        self._feed, self._column = feed, column

    def __getitem__(self, k: int) -> Any:
        return self._feed.get(k, self._column)


def _replicas_of_mesh(
    mesh: DeviceMesh, num_stages: int, replicas: Sequence[int] | None, group: dist.ProcessGroup | None
) -> tuple[int, ...]:
    """Pipeline x data parallelism from a 2-D mesh ("pp", "dp"): every stage on its column of dp ranks.

    The mesh must place rank pp_index * dp + dp_index at (pp_index, dp_index), as
    `init_device_mesh(device, (pp, dp), mesh_dim_names=("pp", "dp"))` does: stage s on ranks s*dp .. s*dp+dp-1.
    """
    if replicas is not None or group is not None:
        raise ValueError("give mesh= alone: it decides the replicas and the process group")
    if mesh.mesh_dim_names != ("pp", "dp"):
        raise ValueError(f"mesh= needs two dimensions named ('pp', 'dp'); got {mesh.mesh_dim_names}")
    pp, dp = mesh.mesh.shape
    if pp != num_stages:
        raise ValueError(f"the mesh has {pp} pipeline ranks (pp) for {num_stages} stages: one stage per pp rank")
    if mesh.mesh.numel() != dist.get_world_size():
        raise ValueError(f"the mesh holds {mesh.mesh.numel()} ranks; the world has {dist.get_world_size()}")
    expected = torch.arange(pp * dp).reshape(pp, dp)
    if not torch.equal(mesh.mesh.cpu(), expected):
        raise ValueError(
            f"the mesh must hold stage s on ranks s*dp .. s*dp+dp-1 ({expected.tolist()}); got {mesh.mesh.tolist()}"
        )
    return (int(dp),) * num_stages


def _method(program: Program) -> str:
    return "evaluate/predict" if program.forward_only else "step"


def _check_rows(inputs: Any, targets: Any, where: str) -> None:
    """Every sample needs its target: a target batch of another size would broadcast, or go unnoticed."""
    if inputs is None or targets is None:
        return
    rows, wanted = batch_size(targets), batch_size(inputs)
    if rows != wanted:
        raise ValueError(
            f"the targets{where} have {rows} rows but the inputs {wanted}: each sample needs its target"
            " (dimension 0 is the batch)"
        )


def _finite_grads(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite (one reduction, one sync)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([g.detach().float().abs().max() for g in grads]).isfinite().all())


def _signature(microbatches: list[Any]) -> int:
    """A 63-bit name for the shapes and dtypes of a step's micro-batches (only its equality matters).

    The same on every process (replicas of the first stage compare theirs), so not Python's `hash`.
    """
    described = tuple(tuple((tuple(t.shape), str(t.dtype)) for t in tensors_in(mb)) for mb in microbatches)
    words = hashlib.blake2b(repr(described).encode(), digest_size=8).digest()
    return int.from_bytes(words, "little") & (2**63 - 1)


def _digest(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 128-bit hash of the tensors' bits, as two int64 words."""
    hashed = hashlib.blake2b(digest_size=16)
    for param in params:
        hashed.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    words = hashed.digest()
    return torch.frombuffer(bytearray(words), dtype=torch.int64).clone()

"""The user-facing pipeline: a rank's stages, a schedule, and `step(batch)`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .runtime.agreement import agree
from .runtime.cuda_graph import CapturedSteps
from .runtime.cuda_graph import refusal as cuda_graph_refusal
from .runtime.executor import Executor, Tracer
from .runtime.host_memory import keep_freed_host_memory
from .runtime.loss_report import LossReport
from .runtime.loss_scale import LossScale
from .runtime.loss_weights import LossWeights, WeightFn
from .runtime.microbatch import check_rows, concat_microbatches, input_signature, map_tensors, split_microbatches
from .runtime.shared import share_gradients, share_local_ties, shared_channels
from .runtime.stage import LossFn, MicrobatchResult, Stage
from .runtime.stage_io import StageIO
from .runtime.stream_feed import StreamFeed
from .runtime.transport import Transport
from .runtime.update import OptimizerFactory, UpdatePolicy, make_optimizers
from .runtime.weights import WeightVersions
from .schedules import Kind, PipelineSpec, Program, StageGraph, build_schedule, validate
from .split import Split, manual_split

__all__ = ["AUTOCAST", "OptimizerFactory", "Pipeline"]

AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each `PipelineSpec.precision`."""


class Pipeline:
    """This rank's part of a pipeline-parallel model.

    Every rank of the process group builds a Pipeline with the same model and
    an equal `spec` (`PipelineSpec`: schedule, ranks, micro-batches, replicas,
    recompute, precision; the ranks compare them first and all refuse to start
    if they differ), and calls `step` once per mini-batch: the rank of the
    first stage passes the inputs, the rank of the last stage the targets (the
    others may pass them too; they are ignored).

    `model` is a split of the model (`manual_split`, `trace_split`): each rank
    builds the stages the schedule places on it, and the split's stage graph
    (skip connections, tied parameters) becomes the program's transfers and
    reductions. Or it is this rank's own stage modules, in a chain of
    `spec.num_stages`: one module when the rank runs one stage, else
    `{stage: module}`.

    `loss_fn(output, target)` must return the mean loss of a micro-batch, and
    `loss_weight(target)` what that mean is over (its tokens; by default its
    samples): each micro-batch's loss is weighted by its count over the whole
    mini-batch's, so the accumulated gradients and the returned loss equal
    those of the unsplit model on the whole mini-batch (`conveyor.losses`: the
    contract, and losses that carry their weight, such as `losses.causal_lm`
    for padded token targets). With `optimizer` (a function of a stage's parameters), each
    stage steps and zeroes its gradients at the end of `step`, as `update`
    (`runtime/update.py`) decides; without it, gradients accumulate until you
    step yourself.

    `group` is the process group of the pipeline's ranks (None: the default
    one), or a 2-D `DeviceMesh` ("pp", "dp") for pipeline x data parallelism;
    with `spec.dp` > 1 and no mesh, the pipeline makes one over the default
    group. `timeout_s` bounds each wait for another rank's message (over
    gloo; NCCL keeps its process group's timeout): a peer that is stuck,
    stopped or making other calls is reported as a TimeoutError naming this
    rank, the peer, the link and the micro-batch, and a peer that ended as a
    ConnectionError. None waits as long as the process group does.

    `spec.cuda_graph` captures a training step's compute in a CUDA graph after
    two eager steps of the same input shapes, and replays it after that: for
    a rank that holds every stage of a synchronous fp32 schedule, with an
    optimizer (`runtime/cuda_graph.py`: what it needs, each refused with what
    to change).
    """

    def __init__(
        self,
        model: Split | nn.Module | Mapping[int, nn.Module],
        spec: PipelineSpec,
        *,
        loss_fn: LossFn,
        optimizer: OptimizerFactory | None = None,
        loss_weight: WeightFn | None = None,
        device: torch.device | str = "cpu",
        group: dist.ProcessGroup | DeviceMesh | None = None,
        timeout_s: float | None = 120.0,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Pipeline needs torch.distributed to be initialized (see conveyor.launch)")
        self.spec = spec
        self.loss_weights = LossWeights.of(loss_fn, loss_weight)
        """How each micro-batch's loss counts in the mini-batch's (`conveyor.losses` states the contract)."""
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_host_memory()  # each step frees and allocates the same again (runtime/host_memory.py)
        mesh, self.group = _mesh_and_group(spec, group, self.device)
        self.rank = dist.get_rank(self.group)
        ranks = dist.get_world_size(self.group)
        split = model if isinstance(model, Split) else None
        self.graph: StageGraph = split.graph if split is not None else StageGraph.chain(spec.num_stages)
        # Before anything that could fail on some ranks only: ranks that disagree would send each other
        # messages of other sizes or in another order (a crash or a hang); here they all raise at once.
        settings = {**spec.describe(), "stage graph": self.graph.describe()}
        agree(settings, self.group, torch.device("cpu") if dist.get_backend(self.group) == "gloo" else self.device)
        if ranks != spec.ranks:
            raise ValueError(f"the spec is for {spec.ranks} ranks; the process group has {ranks}")
        _check_ties_not_replicated(spec, self.graph)
        self.program: Program = build_schedule(spec, self.graph)
        modules = self._local_modules(model, split)
        share_local_ties(self.graph, modules)
        autocast = AUTOCAST[spec.precision]
        self.stages = {
            s: Stage(
                module.to(self.device),
                s,
                spec.num_stages,
                loss_fn if s == spec.num_stages - 1 else None,
                recompute=spec.recomputes(s),
                autocast=autocast,
            )
            for s, module in modules.items()
        }
        if self.program.asynchronous:
            for s, stage in self.stages.items():
                stage.versions = WeightVersions(stage.module, s, stashing=spec.weight_stashing)
        channels = {
            **self.program.channels(),
            **LossReport.channels(self.program, ranks),
            **shared_channels(self.program),
        }
        self.transport = Transport.open(channels, self.device, self.group, timeout_s)
        shared = share_gradients(
            self.program, self.rank, modules, self.transport, _replica_groups(self.program, self.rank, self.group, mesh)
        )
        self.update = UpdatePolicy(
            self.stages,
            make_optimizers(self.stages, optimizer),
            self.program,
            self.rank,
            nonfinite=spec.nonfinite,
            loss_scale=LossScale() if spec.precision == "fp16" else None,
            group=self.group,
            device=self.device,
        )
        """How this rank's stages step: optimizers, clipping, the loss scale, the non-finite guard."""
        io = StageIO(self.transport, self.program, self.rank)
        self.executor = Executor(self.program, self.rank, self.stages, io, self.update, shared)
        self._losses = LossReport(self.transport, self.program, self.rank, ranks, self.device)
        self.captured: CapturedSteps | None = None
        """With `spec.cuda_graph`: the training steps captured in CUDA graphs (`runtime/cuda_graph.py`)."""
        if spec.cuda_graph:
            why = cuda_graph_refusal(spec, self.program, self.rank, self.device, optimizer is not None)
            if why is not None:
                raise ValueError(f"cuda_graph=True: {why}")
            self.captured = CapturedSteps(self.executor)
        self._forward_program: Program | None = None
        self._streams: dict[int, Program] = {}

    @classmethod
    def from_model(
        cls,
        model: nn.Module | Callable[[], nn.Module],
        spec: PipelineSpec,
        *,
        layers_per_stage: tuple[int, ...] | None = None,
        blocks: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> Pipeline:
        """Split `model` by hand into `spec.num_stages` stages (see `manual_split`) and keep this rank's."""
        split = manual_split(model, spec.num_stages, layers_per_stage, blocks=blocks, seed=seed)
        return cls(split, spec, **kwargs)

    def _local_modules(
        self, model: Split | nn.Module | Mapping[int, nn.Module], split: Split | None
    ) -> dict[int, nn.Module]:
        local = self.program.stages_of(self.rank)
        if split is not None:
            return {s: split.build_stage(s, "cpu") for s in local}
        if isinstance(model, nn.Module):
            if len(local) != 1:
                raise ValueError(f"rank {self.rank} runs stages {local}: pass modules as {{stage: module}}")
            return {local[0]: model}
        assert isinstance(model, Mapping)
        if sorted(model) != local:
            raise ValueError(
                f"rank {self.rank} runs stages {local} of {self.spec.schedule!r}; got modules for {sorted(model)}"
            )
        return dict(model)

    @property
    def last_rank(self) -> int:
        """The rank that reports the loss: the last stage's (its first replica's, when it is replicated)."""
        return self.last_ranks[0]

    @property
    def last_ranks(self) -> tuple[int, ...]:
        """The ranks that hold the last stage (several when it is replicated); each returns the loss."""
        return self.program.replicas_of(self.program.num_stages - 1)

    @property
    def tracer(self) -> Tracer | None:
        """Told when each action starts and ends and how long it waited (`observe.trace.Recorder`); None: off."""
        return self.executor.tracer

    @tracer.setter
    def tracer(self, tracer: Tracer | None) -> None:
        self.executor.tracer = tracer

    @property
    def track_memory(self) -> bool:
        """Whether each stage counts the bytes it holds for backward (`Stage.peak_held_bytes`), at a small cost
        per forward."""
        return any(stage.track_memory for stage in self.stages.values())

    @track_memory.setter
    def track_memory(self, on: bool) -> None:
        for stage in self.stages.values():
            stage.track_memory = on

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
        steps wait until the program has run; `update.last_grad_norm` is the
        norm before clipping, on every rank.
        """
        if outputs is not None:
            self._check_whole_outputs("step(outputs=...)")
        if self.program.asynchronous:
            raise RuntimeError(
                f"{self.spec.schedule} never flushes between mini-batches, so it runs no single step: feed it with"
                " Pipeline.stream(batches, num_batches), which drains at the end"
            )
        self.update.begin(max_grad_norm)
        results = self._run(self.program, inputs, targets, outputs is not None, loss_on_all_ranks)
        if self.update.deferring:
            self.update.finish(_local_loss(results))
        return self._losses.report(results, loss_on_all_ranks, losses, outputs)

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
        return self._losses.report(results, loss_on_all_ranks, None, None)

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
            self._forward_program = build_schedule(self.spec, self.graph, forward_only=True)
        return self._forward_program

    def _run(
        self, program: Program, inputs: Any, targets: Any, keep_outputs: bool, loss_on_all_ranks: bool = False
    ) -> list[MicrobatchResult] | None:
        """Split the mini-batch, run `program` once, and return the last stage's results (on its rank)."""
        m = self.spec.microbatches
        input_mbs = target_mbs = weights = None
        signature = None
        check_rows(inputs, targets)
        if 0 in self.stages:
            if inputs is None:
                method = "evaluate/predict" if program.forward_only else "step"
                raise ValueError(f"rank {self.rank} runs the first stage: {method}() needs the inputs")
            input_mbs = split_microbatches(map_tensors(inputs, lambda t: t.to(self.device)), m)
            signature = input_signature(input_mbs)
        last = self.program.num_stages - 1
        if last in self.stages:
            if targets is None and not program.forward_only:
                raise ValueError(f"rank {self.rank} runs the last stage: step() needs the targets")
            if targets is not None:
                target_mbs = split_microbatches(targets, m)
                # From the targets where they are: on the host, often.
                weights = self.loss_weights(target_mbs, batch=targets)
                target_mbs = [map_tensors(t, lambda t: t.to(self.device)) for t in target_mbs]
        options = ("loss_on_all_ranks", int(loss_on_all_ranks))  # it decides who waits for the loss message
        if self.captured is not None and program is self.program:
            self.captured.run(program, input_mbs, target_mbs, weights, signature, keep_outputs, options)
        else:
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
        self.update.stream_lr = lr
        try:
            if self.program.asynchronous:
                yield from self._stream_async(batches, num_batches)
            else:
                yield from self._stream_steps(batches, num_batches)
        finally:
            self.update.stream_lr = None

    def _stream_async(self, batches: Iterable[tuple[Any, Any]], num_batches: int) -> Iterator[tuple[int, torch.Tensor]]:
        """An asynchronous schedule's stream: one program over all `num_batches` mini-batches."""
        program = self._stream_program(num_batches)
        m, per_step = self.spec.microbatches, program.microbatches_per_step
        feed = StreamFeed(iter(batches), m, num_batches, self.device, per_step, self.loss_weights)
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
        lr = self.update.stream_lr
        for index, (inputs, targets) in enumerate(batches):
            if index == num_batches:
                break
            if lr is not None:
                self.update.set_lr(lr(index))
            losses: list[torch.Tensor] = []
            self.step(inputs, targets, losses=losses)
            for loss in losses:
                yield reported, loss
                reported += 1

    def _stream_program(self, num_batches: int) -> Program:
        if num_batches not in self._streams:
            # One length at a time: a stream of another length builds its own.
            self._streams = {num_batches: build_schedule(self.spec, self.graph, mini_batches=num_batches)}
        return self._streams[num_batches]

    def run_program(self, program: Program, inputs: Any = None, targets: Any = None) -> None:
        """Run `program` once over a mini-batch: a lowered program of this pipeline's own stages, placement and
        micro-batch count, in an order of the caller's (the graph profiler's, `plan/profile_graph.py`). It is
        validated first; its STEP actions, if any, step the optimizers."""
        if program.placement != self.program.placement or program.num_microbatches != self.spec.microbatches:
            raise ValueError(
                f"run_program needs this pipeline's placement {self.program.placement} and"
                f" {self.spec.microbatches} micro-batches; got {program.placement} and {program.num_microbatches}"
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
        self.update.zero_grad()


def _local_loss(results: list[MicrobatchResult] | None) -> torch.Tensor | None:
    """This rank's part of the mini-batch loss (a rank of the last stage), for the update policy's guard."""
    if results is None:
        return None
    weighted = [r.loss * r.weight for r in results if r.loss is not None and r.weight != 0]
    return torch.stack(weighted).sum() if weighted else None


def _check_ties_not_replicated(spec: PipelineSpec, graph: StageGraph) -> None:
    counts = spec.replica_counts
    if counts is None:
        return
    for tie in graph.ties:
        if any(counts[s] > 1 for s in tie.stages if s < len(counts)):
            raise ValueError(
                f"stages {list(tie.stages)} share a tied parameter and one of them is replicated: conveyor does"
                " not replicate stages with tied parameters"
            )


def _mesh_and_group(
    spec: PipelineSpec, group: dist.ProcessGroup | DeviceMesh | None, device: torch.device
) -> tuple[DeviceMesh | None, dist.ProcessGroup | None]:
    """The mesh of pipeline x data parallelism (given, or made for `spec.dp`) and the pipeline's group."""
    if isinstance(group, DeviceMesh):
        _check_mesh(group, spec)
        return group, None
    if spec.dp == 1:
        return None, group
    if group is not None:
        raise ValueError(
            f"dp={spec.dp} runs on the default process group (or give a DeviceMesh as group=); got a process group"
        )
    mesh = init_device_mesh(device.type, (spec.pipeline_ranks, spec.dp), mesh_dim_names=("pp", "dp"))
    return mesh, None


def _check_mesh(mesh: DeviceMesh, spec: PipelineSpec) -> None:
    """A 2-D mesh ("pp", "dp") must place rank pp_index * dp + dp_index at (pp_index, dp_index), as
    `init_device_mesh(device, (pp, dp), mesh_dim_names=("pp", "dp"))` does: stage s on ranks s*dp .. s*dp+dp-1."""
    if mesh.mesh_dim_names != ("pp", "dp"):
        raise ValueError(f"a mesh needs two dimensions named ('pp', 'dp'); got {mesh.mesh_dim_names}")
    pp, dp = mesh.mesh.shape
    if pp != spec.num_stages:
        raise ValueError(f"the mesh has {pp} pipeline ranks (pp) for {spec.num_stages} stages: one stage per pp rank")
    if dp != spec.dp:
        raise ValueError(f"the mesh has {dp} data-parallel ranks (dp), but the spec's dp is {spec.dp}")
    if mesh.mesh.numel() != dist.get_world_size():
        raise ValueError(f"the mesh holds {mesh.mesh.numel()} ranks; the world has {dist.get_world_size()}")
    expected = torch.arange(pp * dp).reshape(pp, dp)
    if not torch.equal(mesh.mesh.cpu(), expected):
        raise ValueError(
            f"the mesh must hold stage s on ranks s*dp .. s*dp+dp-1 ({expected.tolist()}); got {mesh.mesh.tolist()}"
        )


def _replica_groups(
    program: Program, rank: int, group: dist.ProcessGroup | None, mesh: DeviceMesh | None
) -> dict[int, dist.ProcessGroup]:
    """The process group of each replicated stage on this rank: the mesh's "dp" group, or one made here by the
    stage's ranks (in stage order on each)."""
    groups = {}
    for s in range(program.num_stages):
        ranks = program.replicas_of(s)
        if len(ranks) < 2 or rank not in ranks:
            continue
        if mesh is not None:
            groups[s] = mesh.get_group("dp")
        else:
            members = [r if group is None else dist.get_global_rank(group, r) for r in ranks]
            created = dist.new_group(members, use_local_synchronization=True)
            assert created is not None
            groups[s] = created
    return groups

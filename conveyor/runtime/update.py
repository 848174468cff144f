"""The update policy: when and how a rank's stages apply their gradients.

The executor's STEP actions call `UpdatePolicy.step`. What happens there depends
on things that span the whole pipeline, which this module decides in one place:

- **Deferred steps.** Clipping by the global gradient norm and float16's loss
  scale need every stage's gradients of the mini-batch, so `begin(max_grad_norm)`
  turns the STEPs into notes, and `finish()` applies them once the program has
  run: unscale (one all-reduce of "did any overflow"), clip (one all-reduce of
  the squared norms), then step each noted stage.
- **The non-finite guard.** Before a stage's update its gradients are checked:
  "raise" stops naming the stage and the update, "skip" skips it with a
  warning, "allow" applies it. Under float16 the loss scale's all-reduce has
  checked every rank already, and every rank skips alike.
- **Per-micro-batch steps.** An asynchronous schedule (PipeDream) steps after
  single micro-batches inside a stream; `stream_lr(i)` gives the learning rate
  of the updates that follow mini-batch i, on every stage alike.

It takes the stages and their optimizers, not the pipeline: it sits below it.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..schedules import Program
from .loss_scale import LossScale
from .stage import Stage

__all__ = ["MAX_CONSECUTIVE_SKIPS", "OptimizerFactory", "UpdatePolicy", "make_optimizers"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

MAX_CONSECUTIVE_SKIPS = 40
"""float16 under nonfinite="raise": this many updates skipped in a row stop the run. The scale halves at each
skip, so by then it has fallen from 2**16 to its floor, 2**-24: gradients that still overflow are not a matter
of scale."""


def make_optimizers(stages: Mapping[int, Stage], factory: OptimizerFactory | None) -> dict[int, torch.optim.Optimizer]:
    """One optimizer per stage, over its parameters; a tensor shared with an earlier stage on this rank is
    stepped there. A stage without parameters gets none (torch refuses an empty list)."""
    if factory is None:
        return {}
    seen: set[int] = set()
    optimizers = {}
    for s, stage in sorted(stages.items()):
        params = [p for p in stage.module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            optimizers[s] = factory(params)
    return optimizers


class UpdatePolicy:
    """How this rank's `stages` step their `optimizers` (see the module's docstring).

    `program` says which ranks hold each stage and which parameters are tied (for the global norm, which
    counts each shared tensor once); `group` is the pipeline's process group, for the norm's and the loss
    scale's all-reduce.
    """

    def __init__(
        self,
        stages: Mapping[int, Stage],
        optimizers: Mapping[int, torch.optim.Optimizer],
        program: Program,
        rank: int,
        *,
        nonfinite: str,
        loss_scale: LossScale | None,
        group: dist.ProcessGroup | None,
        device: torch.device,
    ) -> None:
        self.stages, self.optimizers, self.program, self.rank = stages, optimizers, program, rank
        self.nonfinite = nonfinite
        self.loss_scale = loss_scale
        """float16's dynamic loss scale, the same on every rank; None otherwise."""
        self.group, self.device = group, device
        self.last_grad_norm: torch.Tensor | None = None
        """The global gradient norm before clipping of the last step that measured it, on every rank."""
        self.steps_taken: dict[int, int] = {}
        self.skipped_steps = 0
        """Updates the non-finite guard skipped (nonfinite="skip"; float16's skips are `loss_scale.skipped`)."""
        self.stream_lr: Callable[[int], float] | None = None
        """While a stream runs: the learning rate of the updates that follow mini-batch i of the stream."""
        self._deferred: list[int] | None = None
        self._max_grad_norm: float | None = None
        self._consecutive_skips = 0
        self._updates = 0  # mini-batch updates begun (applied or skipped), for messages

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters, each once (a tied tensor shared by two local stages included once)."""
        seen: set[int] = set()
        for _, stage in sorted(self.stages.items()):
            for param in stage.module.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield param

    def set_lr(self, lr: float, optimizers: Iterable[torch.optim.Optimizer] | None = None) -> None:
        """Set the learning rate of every optimizer on this rank (or of `optimizers`)."""
        for optimizer in self.optimizers.values() if optimizers is None else optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def begin(self, max_grad_norm: float | None = None) -> None:
        """Before a synchronous step: defer the STEPs when clipping or float16 needs every stage's gradients."""
        self._max_grad_norm = max_grad_norm
        if max_grad_norm is None and self.loss_scale is None:
            self._deferred = None
            return
        self._deferred = []
        last = self.stages.get(self.program.num_stages - 1)
        if last is not None and self.loss_scale is not None:
            last.loss_scale = self.loss_scale.scale

    @property
    def deferring(self) -> bool:
        """Whether this step's updates wait for `finish` (clipping, or float16's loss scale)."""
        return self._deferred is not None

    def step(self, stage: int, mb: int | None = None) -> None:
        """The executor's STEP of `stage` (after micro-batch `mb` in an asynchronous program, else None)."""
        if self._deferred is not None:
            self._deferred.append(stage)
            return
        self._apply(stage, mb)

    def finish(self, loss: torch.Tensor | None = None) -> None:
        """After a synchronous step's program: apply the deferred updates (unscaled, clipped), if any.

        `loss` is the mini-batch loss on a rank of the last stage (None elsewhere): under float16 a
        non-finite loss is told apart from an overflow the scale can cure.
        """
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return
        self._updates += 1
        finite, bad_loss = True, False
        if self.loss_scale is not None:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            loss_finite = loss is None or bool(torch.isfinite(loss).all())
            finite, bad_loss = self.loss_scale.unscale(grads, self.group, self.device, loss_finite)
        if finite:
            if self._max_grad_norm is not None:
                self.last_grad_norm = self.clip_grad_norm_(self._max_grad_norm)
            for stage in deferred:
                self._apply(stage, None)
        else:  # a gradient overflowed on some rank: every rank skips this update, and the scale backs off
            self.zero_grad()
            self.last_grad_norm = torch.tensor(math.inf)
        if self.loss_scale is not None:
            self.loss_scale.update(finite)
            self._guard_scale(finite, bad_loss, loss)

    def _guard_scale(self, finite: bool, bad_loss: bool, loss: torch.Tensor | None) -> None:
        """float16 and the non-finite guard: a loss that is not finite, or overflows no scale cures, stop a run
        under nonfinite="raise" (every rank alike: they all saw the same all-reduce)."""
        assert self.loss_scale is not None
        self._consecutive_skips = 0 if finite else self._consecutive_skips + 1
        if finite or self.nonfinite == "allow":
            return
        last = self.program.num_stages - 1
        shown = f" ({float(loss):g} here)" if loss is not None else ""
        if bad_loss:
            why = f"the loss of stage {last} (the last) is not finite{shown}: no loss scale can cure that"
        elif self._consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            why = (
                f"{self._consecutive_skips} updates in a row overflowed, down to a loss scale of"
                f" {self.loss_scale.scale:g}: the gradients overflow whatever the scale"
            )
        else:
            return  # an overflow at this scale: skip, back off and try again, as GradScaler does
        where = f"rank {self.rank}, update {self._updates}"
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{where}: {why}; the weights were not changed. PipelineSpec(nonfinite='skip') skips such updates"
            )
        warnings.warn(f"{where}: {why}; this update is skipped", stacklevel=3)

    def _apply(self, stage: int, mb: int | None) -> None:
        if stage not in self.optimizers:
            return
        optimizer = self.optimizers[stage]
        if self.stream_lr is not None and mb is not None:
            # Each update of a stream takes the rate of the mini-batch it follows, on every stage alike.
            self.set_lr(self.stream_lr(mb // self.program.num_microbatches), [optimizer])
        self.steps_taken[stage] = self.steps_taken.get(stage, 0) + 1
        # Under float16 the loss scale has checked every rank's gradients already (and skips together).
        if self.nonfinite != "allow" and self.loss_scale is None and not _finite_grads(optimizer):
            where = f"stage {stage} (rank {self.rank}), update {self.steps_taken[stage]}"
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"{where}: the gradients hold NaN or inf (a non-finite loss, or an overflow); the weights were"
                    " not changed. PipelineSpec(nonfinite='skip') skips such updates instead"
                )
            warnings.warn(f"{where}: the gradients hold NaN or inf; this update is skipped", stacklevel=3)
            self.skipped_steps += 1
        else:
            optimizer.step()
        # Only this optimizer's parameters: a tied tensor another local stage steps keeps its gradient for it.
        _zero_grad(optimizer)

    def zero_grad(self) -> None:
        for stage in self.stages.values():
            stage.module.zero_grad(set_to_none=True)

    def grad_norm(self) -> torch.Tensor:
        """The global 2-norm of the gradients over every stage on every rank (each rank must call it).

        A parameter held by several stages or ranks (tied, or a replicated stage's) counts once: on the
        rank of its first holder. One all-reduce over the pipeline's group.
        """
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for param in self._counted_parameters():
            if param.grad is not None:
                squares += param.grad.detach().double().pow(2).sum()
        if dist.get_backend(self.group) == "gloo":
            squares = squares.cpu()
        dist.all_reduce(squares, group=self.group)
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
        for tie in self.program.graph.ties:
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


def _finite_grads(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite."""
    return all_finite([p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None])


def _zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """`optimizer.zero_grad(set_to_none=True)`: for torch's own, the same loop without its profiler range, which
    costs as much as the loop on a small stage; an optimizer with a zero_grad of its own gets that called."""
    if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad:
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None


_CHECKED_IN_ONE_PASS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of `tensors` is finite: one pass over them and one host sync.

    Dense floating-point tensors go through the kernel of torch's GradScaler
    (`_amp_foreach_non_finite_check_and_unscale_`), one call per device and dtype, multiplying by 1, which
    leaves every value as it is: on CPU it costs a tenth of an abs and a max per tensor. Others (sparse,
    complex) are checked one by one.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    flags: list[torch.Tensor] = []
    with torch.no_grad():  # the kernel writes each tensor back in place, unchanged
        for tensor in tensors:
            if tensor.layout is torch.strided and tensor.dtype in _CHECKED_IN_ONE_PASS:
                groups[(tensor.device, tensor.dtype)].append(tensor)
            else:
                values = tensor.coalesce().values() if tensor.is_sparse else tensor
                flags.append((~torch.isfinite(values)).any().float().reshape(1))
        for (device, _), group in groups.items():
            found = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones(1, device=device))
            flags.append(found)
    if not flags:
        return True
    if len(flags) == 1:
        return not bool(flags[0])
    return not bool(torch.cat([flag.cpu() for flag in flags]).any())

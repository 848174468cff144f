"""One pipeline stage: runs forward and backward per micro-batch, keeping only what backward needs."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.autograd.variable import Variable
from torch.utils.checkpoint import checkpoint

from .microbatch import map_tensors, tensors_in
from .offload import ActivationOffload
from .split_backward import WeightWork, backward_input
from .tensor_meta import TensorMeta
from .weights import WeightVersions

__all__ = ["LossFn", "MicrobatchResult", "Stage", "call_module"]

LossFn = Callable[[Any, Any], torch.Tensor]


_NOTHING = contextlib.nullcontext()  # reusable: it holds no state


@dataclass(slots=True)
class _Stash:
    """What one micro-batch's backward needs: the stage's inputs and outputs (or the loss)."""

    inputs: list[torch.Tensor]  # the stage's flat inputs (none on the first stage: the user's data needs no gradient)
    outputs: list[torch.Tensor]
    bytes: int = 0  # held for backward, when the stage counts them


@dataclass(frozen=True)
class MicrobatchResult:
    """What the last stage keeps of one micro-batch: its mean loss, its share of the mini-batch, its output."""

    loss: torch.Tensor | None  # detached; None in a forward-only run without targets
    weight: float
    output: Any = None  # the last stage's output, when asked to keep it


class Stage:
    """Stage `index` of `num_stages`, wrapping the module that owns its layers.

    The first stage is called with the user's micro-batch (a tensor, a tuple
    of positional arguments or a dict of keyword arguments); later stages with
    their inputs (the values of their in-edges, see `schedules/graph.py`) as
    positional arguments, or, for an `nn.Sequential` stage, as its one argument
    (a tuple when there are several), the way its layers hand values on. A stage
    other than the last returns a tensor or a tuple of tensors: its outputs. The
    last stage's output goes to `loss_fn(output, target)`.

    With `recompute`, the forward keeps only the stage's inputs and runs again
    during backward (`torch.utils.checkpoint`, RNG state preserved, so dropout
    draws the same mask). With `track_memory`, the stage counts the bytes each
    micro-batch holds for backward (saved tensors, inputs and outputs, not
    parameters) in `held_bytes` and `peak_held_bytes`: on its device, so an
    offloaded micro-batch's saved tensors count from its reload on again
    (`offload`, `reload`, `runtime/offload.py`).
    """

    def __init__(
        self,
        module: nn.Module,
        index: int,
        num_stages: int,
        loss_fn: LossFn | None = None,
        *,
        recompute: bool = False,
        track_memory: bool = False,
        autocast: torch.dtype | None = None,
    ) -> None:
        if index == num_stages - 1 and loss_fn is None:
            raise ValueError(f"stage {index} is the last stage and needs a loss function")
        self.module = module
        self.index = index
        self.num_stages = num_stages
        self.loss_fn = loss_fn
        self.recompute = recompute
        self.track_memory = track_memory
        self.autocast = autocast
        """Run forwards (and the loss) under torch.autocast to this dtype; None: as the weights are."""
        self.loss_scale = 1.0
        """On the last stage: what its loss is multiplied by before backward (float16's loss scale)."""
        self.held_bytes = 0
        self.peak_held_bytes = 0
        self._stash: dict[int, _Stash] = {}
        self._weight_work: dict[int, tuple[WeightWork, int]] = {}
        self.results: dict[int, MicrobatchResult] = {}
        self.versions: WeightVersions | None = None
        """Set for an asynchronous program: which weights each micro-batch runs with (weight stashing)."""
        self._gradient_checked = False
        self._offloads: ActivationOffload | None = None  # made by the first forward saved for offloading
        self.is_first = index == 0
        self.is_last = index == num_stages - 1
        self._sequential = isinstance(module, nn.Sequential)

    def forward(
        self,
        mb: int,
        inputs: Any,
        target: Any = None,
        loss_weight: float = 1.0,
        keep_output: bool = False,
        offload: bool = False,
    ) -> list[torch.Tensor]:
        """Run micro-batch `mb` and return its outputs for the stages it feeds (none on the last stage).

        `inputs` is the user's micro-batch on the first stage, else the list of
        the stage's input tensors. On the last stage the loss, times
        `loss_weight`, is kept for backward; `results[mb]` keeps the loss (and,
        with `keep_output`, the output) for the step's caller. With `offload`,
        what autograd saves is kept so that `offload(mb)` can move it to host memory.
        """
        if mb in self._stash or mb in self._weight_work:
            raise RuntimeError(f"stage {self.index}: forward of micro-batch {mb} ran twice before its backward")
        counter = _SavedBytes(self.module, tensors_in(inputs), tensors_in(target)) if self.track_memory else None
        weights = self.versions.forward_tensors(mb) if self.versions is not None else None
        hooks: contextlib.AbstractContextManager[Any] | None = counter
        if offload:  # one set of hooks runs at a time: the offload's, which shows the counter what it saves
            # Held anyway: the inputs (the first stage's and the target are views of the caller's batches), weights.
            kept = [*tensors_in(inputs), *tensors_in(target), *(weights or {}).values()]
            hooks = self._offload_store().saving(mb, kept, counter._pack if counter else None)
        with self._forward_context(hooks):
            if self.recompute:  # the replay during backward runs with the same weights and autocast state
                output = checkpoint(self._call, inputs, weights, use_reentrant=False)
            else:
                output = self._call(inputs, weights)
            if self.is_last:
                loss = self._loss(mb, output, target, loss_weight, keep_output)
        # The loss backpropagated: its share of the mini-batch, times the float16 loss scale (else 1). A
        # micro-batch that counts nothing (weight 0: every target ignored) backpropagates zeros, not the NaN
        # an empty mean would give (0 * NaN is NaN).
        if self.is_last:
            outputs = [loss * (loss_weight * self.loss_scale) if loss_weight != 0 else _zero_through(output)]
        else:
            outputs = _flatten_output(output, self.index)
        if offload:
            self._offload_store().keep_on_device(mb, outputs)
        if not self._gradient_checked:
            self._check_gradient_flows(outputs)
        stash = _Stash([] if self.is_first else list(inputs), outputs)
        if counter is not None:
            stash.bytes = counter.total(outputs)
            self._hold(stash.bytes)
        self._stash[mb] = stash
        return [] if self.is_last else outputs

    def infer(
        self, mb: int, inputs: Any, target: Any = None, loss_weight: float = 1.0, keep_output: bool = False
    ) -> list[torch.Tensor]:
        """A forward for evaluation or inference: no graph, nothing kept but the last stage's result."""
        with torch.no_grad(), self._autocast():
            output = self._call(inputs)
            if not self.is_last:
                return _flatten_output(output, self.index)
            if target is None:
                self.results[mb] = MicrobatchResult(None, loss_weight, output)
            else:
                self._loss(mb, output, target, loss_weight, keep_output)
        return []

    def _check_gradient_flows(self, outputs: list[torch.Tensor]) -> None:
        """A stage whose outputs carry no gradient trains nothing before it, and none of its own weights."""
        if any(t.requires_grad for t in outputs):
            return
        self._gradient_checked = True
        if not any(p.requires_grad for p in self.module.parameters()):
            return
        if self.is_last:
            raise RuntimeError(
                f"stage {self.index} (the last): the loss carries no gradient, so nothing would train (was the"
                " output detached, or the loss computed outside autograd?)"
            )
        warnings.warn(
            f"stage {self.index}: none of its outputs carries a gradient, so its parameters and every stage before"
            " it get none (did its forward return a detached tensor?)",
            stacklevel=3,
        )

    def output_metas(self, mb: int) -> list[TensorMeta]:
        """Shapes, dtypes and gradient flags of every output of micro-batch `mb`."""
        return [TensorMeta.of(t) for t in self._stash[mb].outputs]

    def outputs_requiring_grad(self, mb: int) -> list[bool]:
        """For each output of micro-batch `mb`, whether it carries a gradient (its backward needs one for it)."""
        return [t.requires_grad for t in self._stash[mb].outputs]

    def backward(
        self, mb: int, output_grads: Sequence[torch.Tensor | None] = (), split: bool = False
    ) -> list[torch.Tensor | None]:
        """Backpropagate micro-batch `mb`; returns the gradient of each input (None where it needs none).

        `output_grads` has one entry per output (None for an output that needs
        no gradient or that no later stage used; empty on the last stage).
        Without `split` this is the whole backward: parameter gradients
        accumulate and everything `mb` kept is freed. With `split` it is only
        B, the input gradients: `weight(mb)` must follow, and frees it.
        """
        stash = self._stash.pop(mb, None)
        if stash is None:
            raise RuntimeError(f"stage {self.index}: backward of micro-batch {mb} before its forward")
        if self._offloads is not None:
            self._offloads.before_backward(mb)
        if self.versions is not None:
            if split:
                raise RuntimeError(f"stage {self.index}: a split backward (W) cannot run on stashed weights")
            self.versions.before_backward(mb)
        if self.is_last:
            outputs, grads = stash.outputs, [torch.ones_like(stash.outputs[0])]
        else:
            if len(output_grads) != len(stash.outputs):
                raise RuntimeError(
                    f"stage {self.index}, micro-batch {mb}: got {len(output_grads)} output gradients for"
                    f" {len(stash.outputs)} outputs"
                )
            outputs, grads = [], []
            for t, g in zip(stash.outputs, output_grads, strict=True):
                if g is not None and t.requires_grad:
                    outputs.append(t)
                    grads.append(g)
        leaves = [t for t in stash.inputs if t.requires_grad]
        if split:
            params = [p for p in self.module.parameters() if p.requires_grad]
            leaf_grads, work = backward_input(outputs, grads, leaves, params)
            self._weight_work[mb] = (work, stash.bytes)
            found = {id(t): g for t, g in zip(leaves, leaf_grads, strict=True)}
        else:
            if outputs:
                run_backward(outputs, grads)
            if self.versions is not None:
                self.versions.after_backward(mb)
            if stash.bytes:
                self._hold(-stash.bytes)
            if self._offloads is not None:
                self._offloads.release(mb)
            found = {id(t): t.grad for t in leaves}
        return [
            (g if (g := found.get(id(t))) is not None else torch.zeros_like(t)) if t.requires_grad else None
            for t in stash.inputs
        ]

    def weight(self, mb: int) -> None:
        """W: accumulate the weight gradients of micro-batch `mb`, whose B ran with `split`, and free it."""
        work = self._weight_work.pop(mb, None)
        if work is None:
            raise RuntimeError(f"stage {self.index}: weight gradient of micro-batch {mb} before its split backward")
        work[0].run()
        self._hold(-work[1])
        if self._offloads is not None:
            self._offloads.release(mb)

    def offload(self, mb: int) -> None:
        """Start moving what micro-batch `mb`'s forward saved for backward to host memory (its forward ran with
        `offload`); the bytes held on the device fall by what moved."""
        moved = self._offload_store().offload(mb)
        if self.track_memory:
            self._hold(-moved)

    def reload(self, mb: int) -> None:
        """Start bringing micro-batch `mb`'s offloaded activations back; its backward waits until they are there."""
        back = self._offload_store().reload(mb)
        if self.track_memory:
            self._hold(back)

    def _offload_store(self) -> ActivationOffload:
        if self._offloads is None:
            param = next(self.module.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            self._offloads = ActivationOffload(self.index, device, self.module.parameters())
        return self._offloads

    def pop_results(self) -> list[MicrobatchResult]:
        """The last stage's results of the micro-batches run since the last call, in micro-batch order."""
        results = [self.results[mb] for mb in sorted(self.results)]
        self.results.clear()
        return results

    @property
    def activations_held(self) -> int:
        """Micro-batches whose forward ran and whose backward (W, if split) has not."""
        return len(self._stash) + len(self._weight_work)

    def _forward_context(
        self, hooks: contextlib.AbstractContextManager[Any] | None
    ) -> contextlib.AbstractContextManager[Any]:
        """Gradients on, the saved-tensor hooks (the bytes counted, an offload's store), autocast: each entered only
        where needed, since entering a context costs a few microseconds, more than some stages' own work."""
        if hooks is None and self.autocast is None and torch.is_grad_enabled():
            return _NOTHING
        stack = contextlib.ExitStack()
        stack.enter_context(torch.enable_grad())
        if hooks is not None:
            stack.enter_context(hooks)
        stack.enter_context(self._autocast())
        return stack

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return _NOTHING
        param = next(self.module.parameters(), None)
        return torch.autocast(param.device.type if param is not None else "cpu", dtype=self.autocast)

    def _call(self, inputs: Any, weights: dict[str, torch.Tensor] | None = None) -> Any:
        """Call the module by the conventions above; with `weights`, on those tensors instead of its parameters."""
        if self.is_first:
            args, kwargs = call_arguments(inputs)
        elif self._sequential:
            args, kwargs = (inputs[0] if len(inputs) == 1 else tuple(inputs),), {}
        else:
            args, kwargs = tuple(inputs), {}
        try:
            if weights is None:
                return self.module(*args, **kwargs)
            return torch.func.functional_call(self.module, weights, args, kwargs)  # buffers stay the live ones
        except IndexError as error:
            if "index out of range" in str(error):
                try:
                    _name_bad_ids(self.module, self.index, args, kwargs)
                except IndexError as named:
                    raise named from error
            raise
        except TypeError as error:
            if "'NoneType' object is not callable" not in str(error):
                raise
            raise TypeError(
                f"stage {self.index}: {error}. The manual split sets the modules a stage does not own to None, so the"
                " model's forward must skip them (`h = self.norm(h) if self.norm is not None else h`); for a model"
                " you cannot change, use the traced split (conveyor.trace_split)"
            ) from error

    def _loss(self, mb: int, output: Any, target: Any, weight: float, keep_output: bool) -> torch.Tensor:
        assert self.loss_fn is not None
        if output is None:
            raise TypeError(
                f"stage {self.index} (the last) returned None; the loss function needs its output (does its"
                " forward return what it computes?)"
            )
        loss = self.loss_fn(output, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(
                f"stage {self.index}: the loss function must return a scalar tensor (the mean loss of micro-batch"
                f" {mb}); got {got}"
            )
        if loss.dim():
            loss = loss.reshape(())
        kept = map_tensors(output, torch.Tensor.detach) if keep_output else None
        self.results[mb] = MicrobatchResult(loss.detach(), weight, kept)
        return loss

    def _hold(self, change: int) -> None:
        self.held_bytes += change
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes a forward keeps for backward: saved tensors, inputs and outputs, parameters excepted.

    Each storage counts once. A micro-batch of the first stage is a view of
    the whole batch's storage, and the last stage's target of the targets', so
    for storages of the inputs (and the target) only the viewed bytes count.
    """

    def __init__(self, module: nn.Module, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor] = ()) -> None:
        self._params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._inputs = {t.untyped_storage().data_ptr() for t in [*inputs, *targets]}  # counted by the bytes viewed
        self._counted: dict[tuple[int, int], int] = {}
        for tensor in inputs:
            self._count(tensor)
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._count(tensor)
        return tensor

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self._params:
            return
        if storage.data_ptr() in self._inputs:
            self._counted[(tensor.data_ptr(), tensor.nbytes)] = tensor.nbytes
        else:
            self._counted[(storage.data_ptr(), -1)] = storage.nbytes()

    def total(self, outputs: Sequence[torch.Tensor]) -> int:
        for tensor in outputs:
            self._count(tensor)
        return sum(self._counted.values())


def run_backward(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """Accumulate into the leaves the gradients that flow back from `outputs`, given the gradients of `outputs`.

    `torch.autograd.backward` without its Python layer: that layer checks and converts the gradients
    (shapes, dtypes, scalars without one), which the engine checks again, and costs more than the engine's own
    start on a small stage; every gradient here is one the runtime made for its own output.
    """
    _ENGINE.run_backward(tuple(outputs), tuple(grads), False, False, (), True, True)


_ENGINE = Variable._execution_engine


def call_arguments(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How a first stage is called with a micro-batch: a dict as keyword arguments, a tuple or list positionally."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def call_module(module: nn.Module, inputs: Any) -> Any:
    """Call a module with a micro-batch the way a first stage is called (see `call_arguments`)."""
    args, kwargs = call_arguments(inputs)
    return module(*args, **kwargs)


def _name_bad_ids(module: nn.Module, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """After a forward failed with `index out of range in self`: raise an IndexError naming the stage, the
    embedding and the ids, if token ids out of an embedding's range were the cause (else return).

    The forward runs again with a check before each embedding, without gradients and in eval mode (no
    running statistics updated, no dropout drawn), so that a forward that goes well pays nothing for the
    check. Checked on CPU tensors only; on a GPU an id out of range is a device-side assert.
    """

    def check(_: nn.Module, args: tuple[Any, ...], name: str, size: int) -> None:
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor) or ids.device.type != "cpu" or ids.numel() == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= size:
            raise IndexError(
                f"stage {index}: embedding {name or 'module'} has {size} rows but got ids from {low} to {high}"
                f" (ids must be in 0..{size - 1})"
            )

    embeddings = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        return
    handles = [m.register_forward_pre_hook(partial(check, name=name, size=m.num_embeddings)) for name, m in embeddings]
    training = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            module(*args, **kwargs)
    except IndexError as error:
        if str(error).startswith(f"stage {index}: embedding "):
            raise
    except Exception:  # the diagnosis found nothing: the caller raises the original error
        pass
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in training.items():
            m.training = mode


def _flatten_output(output: Any, index: int) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in output):
        return list(output)
    raise TypeError(
        f"stage {index} returned {type(output).__name__}; a stage other than the last must return a tensor"
        " or a tuple of tensors (its outputs, which later stages take as inputs)"
    )


def _zero_through(output: Any) -> torch.Tensor:
    """A zero that depends on `output`, so backward reaches every stage with zero gradients."""
    tensors = [t for t in tensors_in(output) if t.requires_grad]
    if not tensors:
        return torch.zeros(())
    return torch.stack([t.sum() for t in tensors]).sum() * 0.0

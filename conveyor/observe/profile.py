"""Costs from a real model: time F, B, W and a whole backward of each stage (or layer), and the bytes it keeps.

The stages run one after another in this process, on one micro-batch, the
way a rank would run them (same threads). B and W are timed as the runtime
splits a backward (`runtime/split_backward.py`: B the gradient of the stage's
input, W the weight gradients afterwards), and a whole backward on its own,
because a split costs more than one whole backward. The first stage has no
input gradient to compute, so its B is 0 and its W is a whole backward.

`profile_layers` does the same per layer (modules that chain like stages),
and adds what a planner needs to cost any contiguous group of them: the
optimizer's step, the parameters, and the bytes crossing each boundary.
"""

from __future__ import annotations

import copy
import functools
import json
import pickle
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.host_memory import keep_freed_host_memory
from ..runtime.microbatch import map_tensors, tensors_in
from ..runtime.split_backward import backward_input
from ..runtime.stage import LossFn, call_module
from .simulate import CostModel, StageCosts
from .slowdown import measure_pipeline_slowdown
from .transfers import TransferCosts

__all__ = [
    "OPTIMIZER_STATES",
    "LayerCosts",
    "LayerProfile",
    "profile_layers",
    "profile_stages",
    "saved_activation_bytes",
    "timed_rounds",
]

OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
"""Tensors of state per parameter each optimizer keeps: SGD none, SGD with momentum a buffer, Adam two moments."""


@dataclass(frozen=True)
class LayerCosts:
    """One layer (or a group of modules that never part) on one micro-batch; times in seconds, sizes in bytes."""

    name: str
    forward: float
    backward: float
    """B: the input gradient (0 for the first layer, which has none: its backward is all W)."""
    weight: float
    """W: the weight gradients after B."""
    whole: float
    """The backward run whole."""
    step: float
    """The optimizer's step over the layer's parameters (and zeroing their gradients)."""
    parameters: int
    """Parameter count."""
    parameter_bytes: float
    activation_bytes: float
    """Held for backward per micro-batch: saved tensors and inputs that need a gradient, not its output."""
    output_bytes: float
    """What the layer hands to the next one: the bytes sent when a stage boundary follows it."""
    recompute_bytes: float = 0.0
    """Held per micro-batch even when its stage recomputes: the loss's own saved tensors (last layer only)."""


@dataclass(frozen=True)
class LayerProfile:
    """Every layer of a model, in order, at one micro-batch size, with the optimizer they were stepped with.

    `fingerprint` names the model (its layer names and parameter shapes), so a profile is never applied to
    another model.
    """

    fingerprint: str
    microbatch_size: int
    optimizer: str
    layers: tuple[LayerCosts, ...]
    transfers: TransferCosts | None = None
    """What a message between two ranks costs on this machine, if measured (`measure_transfers`)."""
    first: bool = False
    """Whether layers[0] is modules that always go to the first stage (a manual split's embeddings)."""
    last: bool = False
    """Whether layers[-1] is modules that always go to the last stage (a manual split's norm and head)."""
    split: str = "manual"
    """How the model is cut: "manual" (`manual_split`) or "traced" (`trace_split`), as its plans must be."""
    slowdown: float | None = None
    """How many times longer the layers compute in a pipeline's rank than in this profile, right after a message
    with the other rank computing (`measure_pipeline_slowdown`; None: not measured, taken as 1)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerProfile:
        """A profile from `to_json`'s form; raises KeyError or TypeError for anything else."""
        data = dict(data)
        layers = tuple(LayerCosts(**layer) for layer in data.pop("layers"))
        transfers = data.pop("transfers", None)
        data.pop("latency", None)  # profiles before `transfers`: a latency alone, measured again when wanted
        return cls(**data, layers=layers, transfers=None if transfers is None else TransferCosts(**transfers))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LayerProfile:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a layer profile written by conveyor ({error})") from None


def timed_rounds(warmup: int, repeats: int, min_seconds: float = 0.0) -> Iterator[bool]:
    """One item per round of a profile, True for a timed one: `warmup` untimed rounds, then timed ones until
    there have been `repeats` and `min_seconds` have passed since the first.

    A profile that lasts a few seconds samples the machine's speed over a few seconds, where a run measures it
    over tens; `min_seconds` lets it sample longer (docs/planning.md says what that bought on a shared VM).
    """
    for _ in range(warmup):
        yield False
    started = time.perf_counter()
    done = 0
    while done < repeats or time.perf_counter() - started < min_seconds:
        yield True
        done += 1


def profile_stages(
    modules: Sequence[nn.Module],
    example_input: Any,
    example_target: Any,
    loss_fn: LossFn,
    *,
    repeats: int = 5,
    warmup: int = 2,
) -> CostModel:
    """Measure each stage of a split model (stage order) on one micro-batch; times in seconds."""
    keep_freed_host_memory()  # as a Pipeline does: a profile should see the run's allocator
    costs = []
    stage_input: Any = example_input
    for index, module in enumerate(modules):
        last = index == len(modules) - 1
        if index > 0:  # later stages get leaves that require grad, as the runtime gives them
            stage_input = _as_leaves(stage_input)
        run = _stage_runner(module, stage_input, example_target if last else None, loss_fn if last else None)
        samples: list[tuple[float, float, float, float]] = []  # (F, B, W, whole backward)
        for repeat in range(warmup + repeats):
            sample = run()
            if repeat >= warmup:
                samples.append(sample)
        f, b, w, whole = (statistics.median(column) for column in zip(*samples, strict=True))
        activation = saved_activation_bytes(
            module, stage_input, example_target if last else None, loss_fn if last else None
        )
        costs.append(StageCosts(f, b, w, activation, whole))
        with torch.no_grad():
            stage_input = _as_tuple(call_module(module, stage_input))
    return CostModel(tuple(costs))


def profile_layers(
    layers: Sequence[nn.Module],
    example_input: Any,
    example_target: Any,
    loss_fn: LossFn,
    *,
    names: Sequence[str] | None = None,
    optimizer: str = "adamw",
    fingerprint: str = "",
    repeats: int = 5,
    warmup: int = 2,
    min_seconds: float = 0.0,
    slowdown: bool = False,
) -> LayerProfile:
    """Measure each layer of a model on one micro-batch: modules that chain like stages (the output of one is
    the input of the next; the last one's output goes to `loss_fn`), run one after another in this process.

    Costs about (warmup + repeats) x (two forwards, two backwards and an optimizer step) per layer, and the
    timed rounds last at least `min_seconds` (`timed_rounds`). With `slowdown`, also measures how much slower
    the layers compute in a pipeline's rank (`measure_pipeline_slowdown`: a spawned partner process, about
    52 more rounds, with the partner computing its own copy of the layers).
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_STATES)}")
    if names is not None and len(names) != len(layers):
        raise ValueError(f"{len(names)} names for {len(layers)} layers")
    keep_freed_host_memory()  # as a Pipeline does: a profile should see the run's allocator
    inputs: list[Any] = []  # each layer's input, as the runtime hands it over
    layer_input: Any = example_input
    for index, module in enumerate(layers):
        if index > 0:
            layer_input = _as_leaves(layer_input)
        inputs.append(layer_input)
        with torch.no_grad():
            layer_input = _as_tuple(call_module(module, layer_input))
    last = len(layers) - 1
    runs = _layer_runners(layers, inputs, example_target, loss_fn)
    partner_runs = functools.partial(_copied_layer_runners, layers, inputs, example_target, loss_fn)
    if slowdown:
        _check_picklable(partner_runs)  # before the profile's minutes, not after
    # Round-robin over the layers, so that a machine that slows down for a while slows every layer alike.
    samples: list[list[tuple[float, float, float, float]]] = [[] for _ in layers]
    for timed in timed_rounds(warmup, repeats, min_seconds):
        for index, run in enumerate(runs):
            sample = run()
            if timed:
                samples[index].append(sample)
    measured = []
    for index, module in enumerate(layers):
        is_last = index == last
        target, loss = (example_target, loss_fn) if is_last else (None, None)
        f, b, w, whole = (statistics.median(column) for column in zip(*samples[index], strict=True))
        held, output = _held_and_output(module, inputs[index], target, loss)
        # A recomputing stage replays its module, not the loss after it: what the loss saved stays.
        kept_by_loss = loss_saved_bytes(_as_leaves(layer_input)[0], target, loss_fn) if is_last else 0.0
        params = [p for p in module.parameters() if p.requires_grad]
        measured.append(
            LayerCosts(
                names[index] if names is not None else str(index),
                f,
                b,
                w,
                whole,
                step_time(module, optimizer, repeats) if params else 0.0,
                sum(p.numel() for p in params),
                float(sum(p.numel() * p.element_size() for p in params)),
                held,
                0.0 if is_last else output,
                kept_by_loss,
            )
        )
    nbytes = int(max(m.output_bytes for m in measured))
    factor = measure_pipeline_slowdown(runs, nbytes, partner_runs) if slowdown else None
    return LayerProfile(fingerprint, microbatch_rows(example_input), optimizer, tuple(measured), slowdown=factor)


def microbatch_rows(batch: Any) -> int:
    """The samples in a micro-batch: dim 0 of its first tensor that has one."""
    sizes = [t.shape[0] for t in tensors_in(batch) if t.dim() > 0]
    return sizes[0] if sizes else 1


def _held_and_output(module: nn.Module, inputs: Any, target: Any, loss_fn: LossFn | None) -> tuple[float, float]:
    """Bytes a forward keeps for backward besides its output (saved tensors, inputs needing a gradient), and the
    bytes of its floating outputs."""
    total = saved_activation_bytes(module, inputs, target, loss_fn)
    with torch.no_grad():
        output = call_module(module, _fresh_inputs(inputs))
    sent = float(sum(t.untyped_storage().nbytes() for t in tensors_in(output) if t.is_floating_point()))
    if loss_fn is not None:
        return total, sent
    # saved_activation_bytes counts the output too (it needs a gradient); the next layer's input holds it.
    return max(0.0, total - sent), sent


def loss_saved_bytes(output: torch.Tensor, target: Any, loss_fn: LossFn) -> float:
    """Bytes the loss saves for its backward (log-softmax's output, for cross-entropy)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(output, target)
    return float(sum(seen.values()))


def step_time(module: nn.Module, optimizer: str, repeats: int) -> float:
    """Median time of the optimizer's step and zero_grad over `module`'s parameters, with gradients present."""
    params = [p for p in module.parameters() if p.requires_grad]
    kinds: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "sgd": lambda: torch.optim.SGD(params, lr=0.0),
        "momentum": lambda: torch.optim.SGD(params, lr=0.0, momentum=0.9),
        "adam": lambda: torch.optim.Adam(params, lr=0.0),
        "adamw": lambda: torch.optim.AdamW(params, lr=0.0),
    }
    stepper = kinds[optimizer]()
    times = []
    for _ in range(repeats + 1):
        for p in params:
            p.grad = torch.zeros_like(p)
        start = time.perf_counter()
        stepper.step()
        stepper.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def saved_activation_bytes(module: nn.Module, inputs: Any, target: Any = None, loss_fn: LossFn | None = None) -> float:
    """Bytes the forward of `inputs` keeps alive for backward: saved tensors, inputs and outputs, not parameters."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs = _fresh_inputs(inputs)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = call_module(module, inputs)
        if loss_fn is not None:
            output = loss_fn(output, target)
    kept = [t for t in (*tensors_in(inputs), *tensors_in(output)) if t.requires_grad]
    for tensor in kept:
        seen.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
    return float(sum(seen.values()))


def _layer_runners(
    layers: Sequence[nn.Module], inputs: Sequence[Any], target: Any, loss_fn: LossFn
) -> list[Callable[[], tuple[float, float, float, float]]]:
    """A `_stage_runner` per layer, the last one's output going to `loss_fn`."""
    last = len(layers) - 1
    return [
        _stage_runner(m, x, target if i == last else None, loss_fn if i == last else None)
        for i, (m, x) in enumerate(zip(layers, inputs, strict=True))
    ]


def _copied_layer_runners(
    layers: Sequence[nn.Module], inputs: Sequence[Any], target: Any, loss_fn: LossFn
) -> list[Callable[[], tuple[float, float, float, float]]]:
    """`_layer_runners` of copies, for the slowdown's partner process: its tensors arrive in memory shared with
    the profiling process, and a pipeline's other rank computes with weights and activations of its own."""
    layers, inputs, target = copy.deepcopy((list(layers), list(inputs), target))
    return _layer_runners(layers, inputs, target, loss_fn)


def _check_picklable(partner_runs: functools.partial[Any]) -> None:
    """The slowdown's partner process rebuilds the layers' work from a pickle of the layers, inputs and loss."""
    try:
        pickle.dumps(partner_runs)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise ValueError(
            "measuring the slowdown sends the layers, their inputs and the loss function to a partner process, "
            f"and they cannot be pickled ({error}); use a loss defined at module level, not a lambda"
        ) from error


def _stage_runner(
    module: nn.Module, inputs: Any, target: Any, loss_fn: LossFn | None
) -> Callable[[], tuple[float, float, float, float]]:
    """A function that times one forward, a split backward (B, then W) and one whole backward."""
    params = [p for p in module.parameters() if p.requires_grad]

    def forward() -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
        fresh = _fresh_inputs(inputs)
        start = time.perf_counter()
        output = call_module(module, fresh)
        if loss_fn is not None:
            output = loss_fn(output, target)
        elapsed = time.perf_counter() - start
        outputs = [t for t in tensors_in(output) if t.requires_grad]
        return outputs, [t for t in tensors_in(fresh) if t.requires_grad], elapsed

    def run() -> tuple[float, float, float, float]:
        outputs, leaves, f = forward()
        grads = [torch.ones_like(t) for t in outputs]
        start = time.perf_counter()
        _, weight_work = backward_input(outputs, grads, leaves, params)
        middle = time.perf_counter()
        weight_work.run()
        end = time.perf_counter()
        outputs, _, _ = forward()
        start_whole = time.perf_counter()
        torch.autograd.backward(outputs, grads)
        whole = time.perf_counter() - start_whole
        module.zero_grad(set_to_none=True)
        return f, middle - start, end - middle, whole

    return run


def _as_leaves(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Stage inputs as the runtime gives them: floating tensors become leaves that require grad."""
    return tuple(t.detach().requires_grad_(t.is_floating_point()) for t in inputs)


def _fresh_inputs(inputs: Any) -> Any:
    """New leaves for each run, so that no graph is shared between runs."""
    return map_tensors(inputs, lambda t: t.detach().requires_grad_(t.requires_grad))


def _as_tuple(output: Any) -> tuple[torch.Tensor, ...]:
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)

"""Costs from a real model: time F, B, W and a whole backward of each stage, and the bytes it keeps.

The stages run one after another in this process, on one micro-batch, the
way a rank would run them (same threads). B and W are timed as the runtime
splits a backward (`runtime/split_backward.py`: B the gradient of the stage's
input, W the weight gradients afterwards), and a whole backward on its own,
because a split costs more than one whole backward. The first stage has no
input gradient to compute, so its B is 0 and its W is a whole backward.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.microbatch import map_tensors, tensors_in
from ..runtime.split_backward import backward_input
from ..runtime.stage import LossFn, call_module
from .simulate import CostModel, StageCosts

__all__ = ["measure_latency", "profile_stages", "saved_activation_bytes"]


def profile_stages(
    modules: Sequence[nn.Module],
    example_input: Any,
    example_target: Any,
    loss_fn: LossFn,
    *,
    repeats: int = 5,
    warmup: int = 2,
    latency: float = 0.0,
) -> CostModel:
    """Measure each stage of a split model (stage order) on one micro-batch; times in seconds."""
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
    return CostModel(tuple(costs), latency)


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


def measure_latency(nbytes: int, repeats: int = 20, timeout_s: float = 60) -> float:
    """One-way time (seconds) of an `nbytes` point-to-point message between two spawned gloo ranks.

    Measured as half of a median round trip; the simulator adds it to every cross-rank dependency.
    """
    import tempfile

    from ..launch import spawn

    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        spawn(_ping_pong, 2, (nbytes, repeats, out.name), timeout_s=timeout_s)
        return float(Path(out.name).read_text())


def _ping_pong(rank: int, world: int, nbytes: int, repeats: int, out: str) -> None:
    import torch.distributed as dist

    payload = torch.zeros(max(1, nbytes // 4), dtype=torch.float32)
    rounds = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        if rank == 0:
            dist.send(payload, 1)
            dist.recv(payload, 1)
        else:
            dist.recv(payload, 0)
            dist.send(payload, 0)
        rounds.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(str(statistics.median(rounds[2:]) / 2))

"""Activation offload at run time, on one process: what comes back is bit for bit what left, and it really left."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import token_batch, token_loss, transformer
from torch import nn

from conveyor.runtime import Stage
from conveyor.runtime.offload import ActivationOffload
from conveyor.schedules import PipelineSpec


class Mixed(nn.Module):
    """Saves views, transposes, a bfloat16 copy, integer indices and its own output: what an offload must rebuild."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(x))
        left, right = h[:, :16], h[:, 16:]  # views of one storage, both saved
        mixed = left * right.t().contiguous().t()
        picked = torch.gather(mixed, 1, torch.argsort(mixed, dim=1))  # int64 indices saved
        low = picked.to(torch.bfloat16).float()
        return torch.tanh(self.down(low * picked))  # tanh saves its output: the stage's output


def _stage() -> Stage:
    torch.manual_seed(0)
    return Stage(Mixed(), 1, 3, track_memory=True)


def _run(stage: Stage, offload: bool, reload: bool = True, split: bool = False) -> list[torch.Tensor]:
    """Forward three micro-batches, offload them all (if asked), then reload and backpropagate each in turn."""
    torch.manual_seed(1)
    inputs = [torch.randn(4, 8) for _ in range(3)]
    for mb, x in enumerate(inputs):
        stage.forward(mb, [x.requires_grad_()], offload=offload)
    if offload:
        for mb in range(3):
            stage.offload(mb)
    grads = []
    for mb in range(3):
        if offload and reload:
            stage.reload(mb)
        grads += stage.backward(mb, [torch.full((4, 8), 0.5 + mb)], split=split)
        if split:
            stage.weight(mb)
    return [g for g in grads if g is not None] + [p.grad for p in stage.module.parameters() if p.grad is not None]


@pytest.mark.parametrize("split", [False, True])
def test_offloaded_activations_come_back_bitwise_equal(split: bool) -> None:
    kept, moved = _stage(), _stage()
    expected, got = _run(kept, offload=False, split=split), _run(moved, offload=True, split=split)
    assert len(expected) == len(got) == 3 + 4
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_a_backward_before_its_reload_is_refused() -> None:
    with pytest.raises(RuntimeError, match="stage 1, micro-batch 0: its activations are in host memory"):
        _run(_stage(), offload=True, reload=False)


def test_offload_moves_the_saved_tensors_and_leaves_inputs_and_outputs() -> None:
    stage = _stage()
    x = torch.randn(4, 8, requires_grad=True)
    (out,) = stage.forward(0, [x], offload=True)
    held = stage.held_bytes
    store = stage._offloads
    assert store is not None
    record = store._records[0]
    saved = [s.device for s in record.storages.values() if not s.stays]
    moved = sum(t.numel() for t in saved if t is not None)
    assert moved > 0 and any(s.stays for s in record.storages.values())  # tanh's output stays with the stage
    before = {t.data_ptr() for t in saved if t is not None}
    stage.offload(0)
    # On the device: only the input and the output (which the stage keeps for its backward).
    assert stage.held_bytes == held - moved == x.nbytes + out.nbytes
    assert all(s.device is None and s.host is not None for s in record.storages.values() if not s.stays)
    stage.reload(0)
    assert stage.held_bytes == held
    after = {s.device.data_ptr() for s in record.storages.values() if not s.stays and s.device is not None}
    assert not before & after  # the activations came back into new buffers: they had really been copied away
    stage.backward(0, [torch.ones(4, 8)])
    assert stage.held_bytes == 0 and not store._records


def test_parameters_are_never_offloaded() -> None:
    layer = nn.Linear(4, 4)
    store = ActivationOffload(0, torch.device("cpu"), layer.parameters())
    x = torch.randn(2, 4, requires_grad=True)
    with store.saving(0, [x]):
        y = torch.tanh(layer(x) * 2)  # saves the weight (for x's gradient) and the linear's output
    storages = store._records[0].storages
    assert layer.weight.untyped_storage().data_ptr() not in storages
    assert x.untyped_storage().data_ptr() not in storages
    assert len(storages) == 1  # tanh's output, which `y` is: saved once however many times it is used
    store.keep_on_device(0, [y])
    assert store.offload(0) == 0  # nothing left to move: the only saved storage is the output
    store.reload(0)
    y.sum().backward()
    assert x.grad is not None


def test_offload_and_reload_refuse_what_they_cannot_do() -> None:
    store = ActivationOffload(2, torch.device("cpu"), [])
    with pytest.raises(RuntimeError, match="stage 2: OFFLOAD of micro-batch 0, whose forward did not save"):
        store.offload(0)
    x = torch.randn(3, requires_grad=True)
    with store.saving(0, []):
        (x.exp() * 2).sum()
    with pytest.raises(RuntimeError, match="RELOAD of micro-batch 0, which was not offloaded"):
        store.reload(0)
    store.offload(0)
    with pytest.raises(RuntimeError, match="micro-batch 0 was offloaded twice"):
        store.offload(0)
    with pytest.raises(RuntimeError, match="micro-batch 0's activations were saved twice"):
        store.saving(0, [])


def test_a_transformer_stage_trains_the_same_with_offload() -> None:
    def grads(offload: bool) -> list[torch.Tensor]:
        stage = Stage(transformer(), 0, 1, loss_fn=token_loss)
        tokens, targets = token_batch(6)
        for mb in range(2):
            part = slice(3 * mb, 3 * mb + 3)
            stage.forward(mb, tokens[part], targets[part], 0.5, offload=offload)
            if offload:
                stage.offload(mb)
        for mb in range(2):
            if offload:
                stage.reload(mb)
            stage.backward(mb)
        return [p.grad for p in stage.module.parameters() if p.grad is not None]

    expected, got = grads(False), grads(True)
    assert len(expected) == len(got) > 0
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_recompute_and_offload_on_one_stage_are_refused() -> None:
    assert PipelineSpec("looped-bfs", 1, 2, 3, offload="all").offloaded == {0, 1, 2}
    assert PipelineSpec("looped-bfs", 1, 2, 3, offload=[2], recompute="all-but-last-stage").offloaded == {2}
    with pytest.raises(ValueError, match="stages \\[0, 1\\] would both recompute and offload"):
        PipelineSpec("looped-bfs", 1, 2, 3, offload="all", recompute="all-but-last-stage")
    with pytest.raises(ValueError, match="stages \\[1\\] would both recompute and offload"):
        PipelineSpec("looped-bfs", 1, 2, 3, offload="1", recompute="full")


def test_the_last_stage_leaves_the_callers_targets_where_they_are() -> None:
    """A target is a view of the mini-batch's targets, which the caller holds: moving it would free nothing."""
    targets = torch.randn(64, 4)
    stage = Stage(nn.Linear(4, 4), 1, 2, loss_fn=F.mse_loss, track_memory=True)
    x = torch.randn(8, 4, requires_grad=True)
    stage.forward(0, [x], targets[:8], offload=True)
    store = stage._offloads
    assert store is not None
    assert targets.untyped_storage().data_ptr() not in store._records[0].storages
    held = stage.held_bytes
    stage.offload(0)
    assert 0 <= stage.held_bytes < held
    stage.reload(0)
    stage.backward(0)
    assert stage.held_bytes == 0

"""bf16 autocast on real ranks: the pipeline trains as the unsplit model does under the same autocast.

Tolerances: bf16 keeps 8 bits of mantissa, and the pipeline's micro-batches
change the shapes of its matmuls (so their rounding), so its losses are
compared with the unsplit model's under autocast at 1e-2 relative, and with
fp32 training at 5e-2 (6 AdamW steps of a tiny GPT). Every stage's linear
layers give bf16 (autocast ran, in the backward's recompute too); the weights
stay fp32.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from conveyor import Pipeline, PipelineSpec, manual_split, spawn
from conveyor.models import GPT, GPTConfig, lm_loss

CONFIG = GPTConfig(context=16, dim=32, layers=2, heads=2)
STEPS, LR = 6, 3e-3


def _batches() -> list[torch.Tensor]:
    """One batch of random bytes, STEPS times: the loss must fall as the model learns it."""
    tokens = torch.randint(0, 256, (8, CONFIG.context + 1), generator=torch.Generator().manual_seed(3))
    return [tokens] * STEPS


def _one_process(autocast: bool) -> list[float]:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for tokens in _batches():
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _bf16(rank: int, world: int) -> None:
    pipe = Pipeline(
        manual_split(lambda: GPT(CONFIG), 2, seed=0),
        PipelineSpec("1f1b", world, 4, precision="bf16"),
        loss_fn=lm_loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
    )
    matmuls: list[torch.dtype] = []  # what this rank's linear layers give: bf16 under autocast
    for module in pipe.stages[rank].module.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: matmuls.append(out.dtype))
    losses = []
    for tokens in _batches():
        loss = pipe.step(tokens[:, :-1], tokens[:, 1:], loss_on_all_ranks=True)
        assert loss is not None
        losses.append(loss.item())
    pipe.close()
    assert all(p.dtype == torch.float32 for p in pipe.parameters()), "autocast must leave the weights in fp32"
    assert matmuls and set(matmuls) == {torch.bfloat16}, f"rank {rank}'s linear layers gave {set(matmuls)}"
    autocast, full = _one_process(True), _one_process(False)
    for step, (mine, same, fp32) in enumerate(zip(losses, autocast, full, strict=True)):
        assert abs(mine - same) <= 1e-2 * abs(same), f"rank {rank}, step {step}: {mine} against autocast's {same}"
        assert abs(mine - fp32) <= 5e-2 * abs(fp32), f"rank {rank}, step {step}: {mine} against fp32's {fp32}"
    assert losses[-1] < losses[0], f"bf16 did not train: {losses}"
    assert losses != full, "bf16 gave fp32's exact losses: autocast did not run"
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, losses)
    assert gathered[0] == gathered[1]


@pytest.mark.timeout(120)
def test_bf16_autocast_trains_like_the_unsplit_model_under_autocast() -> None:
    spawn(_bf16, 2, timeout_s=100)


def _one_process_fp16(init_scale: float) -> tuple[list[float], list[float]]:
    """The unsplit model under float16 autocast with torch's GradScaler: each step's loss and scale after it."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    losses, scales = [], []
    for tokens in _batches():
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    return losses, scales


def _fp16(rank: int, world: int) -> None:
    pipe = Pipeline(
        manual_split(lambda: GPT(CONFIG), 2, seed=0),
        PipelineSpec("1f1b", world, 4, precision="fp16"),
        loss_fn=lm_loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
    )
    assert pipe.update.loss_scale is not None
    pipe.update.loss_scale.scale = 2.0**22  # overflows at first: the first updates are skipped, on every rank
    losses, scales = [], []
    for tokens in _batches():
        loss = pipe.step(tokens[:, :-1], tokens[:, 1:], loss_on_all_ranks=True)
        assert loss is not None
        losses.append(loss.item())
        scales.append(pipe.update.loss_scale.scale)
    pipe.close()
    expected_losses, expected_scales = _one_process_fp16(2.0**22)
    assert scales == expected_scales, f"rank {rank}: scales {scales}, GradScaler's {expected_scales}"
    assert 0 < pipe.update.loss_scale.skipped < STEPS, (
        f"rank {rank}: {pipe.update.loss_scale.skipped} skipped, scales {scales}"
    )
    for step, (mine, same) in enumerate(zip(losses, expected_losses, strict=True)):
        assert abs(mine - same) <= 1e-2 * abs(same), f"rank {rank}, step {step}: {mine} against {same}"
    assert losses[-1] < losses[0], f"fp16 did not train: {losses}"


@pytest.mark.timeout(120)
def test_float16_skips_and_scales_as_grad_scaler_on_every_rank() -> None:
    spawn(_fp16, 2, timeout_s=100)


def test_float16_is_refused_for_a_stream() -> None:
    # Checked before anything else, without a process group.
    with pytest.raises(ValueError, match="pipedream updates inside a stream: use precision=bf16"):
        PipelineSpec("pipedream", 2, 2, precision="fp16")

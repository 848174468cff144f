"""A training step captured in a CUDA graph (`PipelineSpec(cuda_graph=True)`, runtime/cuda_graph.py).

On CPU: every setting the capture cannot serve is refused when the pipeline is built, naming what to
change, and a pipeline without it steps exactly as before. On a GPU (skipped elsewhere; run by
scripts/gpu_check.sh): captured steps train exactly as eager steps do, for one stage and for looped
placements of several stages on one rank.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny_models import assert_close, assert_grads_match, mlp, mlp_batch, token_batch, token_loss, transformer

from conveyor import Pipeline, PipelineSpec, spawn
from conveyor.runtime.cuda_graph import MAX_GRAPHS, WARMUP_STEPS


def _sgd(params: object) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)  # type: ignore[arg-type]


def _refused(spec: PipelineSpec, message: str, **options: object) -> None:
    settings: dict = {"loss_fn": F.mse_loss, "optimizer": _sgd} | options  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        Pipeline.from_model(mlp(), dataclasses.replace(spec, cuda_graph=True), **settings)


def _one_rank(rank: int, world: int) -> None:
    one = PipelineSpec("1f1b", 1, 2)
    _refused(one, r"cuda_graph=True: a CUDA graph needs a CUDA device; this pipeline runs on cpu")
    _refused(one, r"no optimizer: a captured backward writes each gradient as the first", optimizer=None)
    _refused(PipelineSpec("1f1b", 1, 2, precision="bf16"), r"precision='bf16': a captured step runs fp32 only")
    _refused(PipelineSpec("1f1b", 1, 2, recompute="full"), "recompute: its replay during backward saves and restores")
    # Without it nothing changes: a step trains as the unsplit model does (fp32: 1e-6 relative).
    model = mlp()
    reference = copy.deepcopy(model)
    x, y = mlp_batch(4)
    pipe = Pipeline.from_model(model, PipelineSpec("interleaved-1f1b", 1, 2, virtual=2), loss_fn=F.mse_loss)
    assert pipe.captured is None
    loss = pipe.step(x, y)
    expected = F.mse_loss(reference(x), y)
    expected.backward()
    assert loss is not None
    assert_close(loss, expected.detach(), "loss", 1e-6)
    assert_grads_match(pipe.named_parameters(), reference, "interleaved-1f1b, 2 stages", 1e-6)


@pytest.mark.timeout(120)
def test_what_a_captured_step_cannot_serve_is_refused_on_one_rank() -> None:
    spawn(_one_rank, 1, timeout_s=100)


def _two_ranks(rank: int, world: int) -> None:
    _refused(
        PipelineSpec("1f1b", world, 2),
        rf"rank {rank}'s program sends, receives or reduces \(.*\): a captured step cannot wait on another rank",
    )
    _refused(PipelineSpec("pipedream", world, 2), "pipedream streams without a step to capture")


@pytest.mark.timeout(120)
def test_a_step_that_crosses_ranks_or_streams_is_refused() -> None:
    spawn(_two_ranks, 2, timeout_s=100)


# On a GPU: captured steps against eager ones, from the same weights on the same batches.

CASES = [("1f1b", 1), ("gpipe", 1), ("interleaved-1f1b", 2), ("looped-bfs", 2), ("interleaved-1f1b", 4)]


def _captured_equals_eager(rank: int, world: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda", 0)
    steps = WARMUP_STEPS + 4
    for schedule, virtual in CASES:
        where = f"{schedule}, {virtual} stage(s)"
        pipes = [
            Pipeline.from_model(
                transformer(),
                PipelineSpec(schedule, 1, 4, virtual=virtual, cuda_graph=captured),
                loss_fn=token_loss,
                optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
                device=device,
            )
            for captured in (False, True)
        ]
        eager, captured = pipes
        assert captured.captured is not None
        for step in range(steps):
            x, y = (t.to(device) for t in token_batch(8, seed=step))
            mb_losses: list[list[torch.Tensor]] = [[], []]
            losses = [pipe.step(x, y, losses=mine) for pipe, mine in zip(pipes, mb_losses, strict=True)]
            assert losses[0] is not None and losses[1] is not None
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0, msg=f"{where}, step {step}: loss")
            for got, want in zip(*mb_losses, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=f"{where}, step {step}")
        for (name, got), (_, want) in zip(captured.named_parameters(), eager.named_parameters(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=f"{where}: {name} after {steps} steps")
        assert captured.captured.replays == steps - WARMUP_STEPS, f"{where}: steps after the warm-up must replay"
        # A batch of other shapes is a capture of its own; the first shapes still replay.
        x, y = (t.to(device) for t in token_batch(6, seed=99))
        for pipe in pipes:
            pipe.step(x, y)
        assert captured.captured.replays == steps - WARMUP_STEPS
    assert MAX_GRAPHS >= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.timeout(300)
def test_captured_steps_train_as_eager_steps_on_a_gpu() -> None:
    spawn(_captured_equals_eager, 1, backend="nccl", timeout_s=280)

"""The engine on a CUDA GPU, against the same model trained on that GPU without pipelining.

Skipped without a GPU. One GPU is enough: NCCL refuses two ranks on one GPU,
so these tests run every stage in one process (NCCL, world size 1), or two
ranks sharing the GPU over gloo, where tensors travel through host memory.
(Dropout replayed on the GPU is in test_split_backward.py, beside the CPU case.)

Tolerance: 1e-4 relative. Micro-batches sum their losses in another order than
one full batch, and GPU kernels (TF32 is switched off) do not promise the
bit-for-bit sums that the CPU tests rely on for 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODELS, assert_close, assert_grads_match

from conveyor import Pipeline, spawn
from conveyor.schedules import SCHEDULES, PipelineSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = 1e-4
BATCH = 12


def _exact_float32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _check_against_reference(
    rank: int, world: int, schedule: str, m: int, kind: str, recompute: str, offload: str = "none"
) -> None:
    build, make_batch, loss_fn = MODELS[kind]
    device = torch.device("cuda", 0)
    where = f"{schedule} on {world} rank(s), m={m}, {kind}, recompute={recompute}, offload={offload}, rank {rank}"
    x, y = (t.to(device) for t in make_batch(BATCH))
    reference = build().to(device)
    expected = loss_fn(reference(x), y)
    expected.backward()

    spec = PipelineSpec(schedule, world, m, recompute=recompute, offload=offload)
    pipe = Pipeline.from_model(build(), spec, loss_fn=loss_fn, device=device)
    assert all(p.device == device for p in pipe.parameters()), f"{where}: a parameter is not on the GPU"
    loss = pipe.step(x, y, loss_on_all_ranks=True)
    assert loss is not None and loss.device == device, f"{where}: the loss must come back on the GPU"
    assert_close(loss, expected, f"{where}: loss", TOL)
    assert_grads_match(pipe.named_parameters(), reference, where, TOL)


def _every_schedule_in_one_process(rank: int, world: int) -> None:
    _exact_float32()
    for schedule, info in SCHEDULES.items():
        if info.asynchronous:  # they stream, never step: tests/test_pipedream_distributed.py
            continue
        for kind in MODELS:
            _check_against_reference(rank, world, schedule, 4, kind, "none")
        _check_against_reference(rank, world, schedule, 4, "transformer", "full")


@pytest.mark.timeout(300)
def test_every_schedule_runs_on_one_gpu_in_one_process() -> None:
    """All stages of a rank on the GPU, over NCCL: local hand-offs, split backward, recompute."""
    spawn(_every_schedule_in_one_process, 1, backend="nccl", timeout_s=240)


def _two_ranks_through_host(rank: int, world: int) -> None:
    _exact_float32()
    for schedule in ("gpipe", "1f1b", "zbv", "interleaved-1f1b"):
        _check_against_reference(rank, world, schedule, 4, "transformer", "none")
    _check_against_reference(rank, world, "1f1b", 3, "mlp", "full")


@pytest.mark.timeout(300)
def test_two_ranks_share_one_gpu_through_host_memory() -> None:
    """Gloo cannot move CUDA tensors: activations, gradients and the loss are staged through the host."""
    spawn(_two_ranks_through_host, 2, backend="gloo", timeout_s=240)


def test_a_stage_built_on_the_gpu_starts_with_the_cpu_weights() -> None:
    """The same seed gives the same weights on every device (a GPU's generator would draw other numbers)."""
    from conveyor import split_model
    from conveyor.models import GPT, GPTConfig

    def build() -> GPT:
        return GPT(GPTConfig(dim=32, heads=2, layers=4, context=16))

    for stage in range(2):
        on_cpu = dict(split_model(build, stage, 2, seed=3).named_parameters())
        on_gpu = dict(split_model(build, stage, 2, seed=3, device="cuda").named_parameters())
        assert on_cpu.keys() == on_gpu.keys()
        for name, param in on_gpu.items():
            assert param.is_cuda, f"stage {stage}: {name} is not on the GPU"
            torch.testing.assert_close(param.cpu(), on_cpu[name], rtol=0, atol=0, msg=f"stage {stage}: {name}")


def _offload_through_host(rank: int, world: int) -> None:
    _exact_float32()
    for schedule, m in (("v-half", 4), ("v-min", 6), ("gpipe", 4)):
        _check_against_reference(rank, world, schedule, m, "transformer", "none", "all")


@pytest.mark.timeout(300)
def test_offload_trains_like_the_unsplit_model_on_the_gpu() -> None:
    """Activations offloaded to pinned host memory on a side stream and reloaded: the same training."""
    spawn(_offload_through_host, 2, backend="gloo", timeout_s=240)


def test_offload_uses_pinned_memory_and_a_side_stream_and_comes_back_bitwise() -> None:
    from torch import nn

    from conveyor.runtime import Stage

    device = torch.device("cuda", 0)

    def run(offload: bool) -> tuple[list[torch.Tensor], Stage]:
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).to(device)
        stage = Stage(module, 1, 3, track_memory=True)
        inputs = [torch.randn(512, 64, device=device, generator=None) for _ in range(3)]
        for mb, x in enumerate(inputs):
            stage.forward(mb, [x.requires_grad_()], offload=offload)
        if offload:
            store = stage._offloads
            assert store is not None and store._stream is not None
            assert store._stream != torch.cuda.current_stream(device)  # copies run beside the computes
            held = stage.held_bytes
            for mb in range(3):
                stage.offload(mb)
                hosts = [s.host for s in store._records[mb].storages.values() if not s.stays]
                assert hosts and all(h is not None and h.is_pinned() for h in hosts)
            assert stage.held_bytes < held
        grads = []
        for mb in range(3):
            if offload:
                stage.reload(mb)
            grads += stage.backward(mb, [torch.full((512, 64), 0.5, device=device)], split=mb == 1)
            if mb == 1:
                stage.weight(mb)
        torch.cuda.synchronize(device)
        return [g for g in grads if g is not None] + [p.grad for p in module.parameters()], stage

    expected, _ = run(False)
    got, stage = run(True)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    assert stage.held_bytes == 0

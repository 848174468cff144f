"""The runtime's shortcuts on its hot path give the answers of the long way round.

The non-finite guard checks gradients in one pass (and leaves them as they were), input signatures are
memoized (and still tell shapes apart), torch's zero_grad is replaced only where an optimizer does not
bring its own, ids out of an embedding's range are named by a diagnosis that changes no running
statistics, and the executor binds a program's actions once (and again when its actions change).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import token_batch, token_loss, transformer
from torch import nn

from conveyor.runtime import Executor, Stage, StageIO, Transport
from conveyor.runtime.loss_weights import LossWeights
from conveyor.runtime.microbatch import input_signature, split_microbatches
from conveyor.runtime.update import _zero_grad, all_finite
from conveyor.schedules import Program
from conveyor.split import split_model

BAD = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_guard_finds_every_non_finite_value_and_changes_none(dtype: torch.dtype) -> None:
    tensors = [torch.randn(7, 3).to(dtype), torch.tensor([-0.0, 1e-40, 3.0e4]).to(dtype), torch.randn(5).double()]
    before = [t.clone() for t in tensors]
    assert all_finite(tensors)
    for kept, was in zip(tensors, before, strict=True):  # bit for bit: -0.0 and subnormals included
        assert torch.equal(kept.view(torch.uint8), was.view(torch.uint8))
    for bad in BAD:
        for index in range(3):
            broken = [t.clone() for t in tensors]
            broken[index].view(-1)[1] = bad
            assert not all_finite(broken), f"{bad} in tensor {index} ({broken[index].dtype}) went unseen"


def test_the_guard_checks_sparse_and_complex_gradients_one_by_one() -> None:
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, float("nan")], (3,))
    assert not all_finite([torch.ones(2), sparse])
    assert all_finite([torch.sparse_coo_tensor([[0]], [1.0], (3,)), torch.ones(2, dtype=torch.complex64)])
    assert not all_finite([torch.tensor([1 + 1j, complex(float("inf"), 0)])])
    assert all_finite([])


def test_memoized_signatures_still_tell_shapes_and_dtypes_apart() -> None:
    first = input_signature(split_microbatches(torch.zeros(8, 4), 4))
    assert input_signature(split_microbatches(torch.ones(8, 4), 4)) == first  # values do not matter
    others = [
        split_microbatches(torch.zeros(8, 5), 4),
        split_microbatches(torch.zeros(8, 4), 2),
        split_microbatches(torch.zeros(8, 4, dtype=torch.float64), 4),
        split_microbatches(torch.zeros(9, 4), 4),
        split_microbatches((torch.zeros(8, 4), torch.zeros(8)), 4),
    ]
    signatures = {first, *(input_signature(mbs) for mbs in others)}
    assert len(signatures) == 1 + len(others)


def test_an_optimizers_own_zero_grad_is_kept() -> None:
    class Counting(torch.optim.SGD):
        calls = 0

        def zero_grad(self, set_to_none: bool = True) -> None:
            Counting.calls += 1
            super().zero_grad(set_to_none)

    layer = nn.Linear(2, 2)
    layer(torch.ones(1, 2)).sum().backward()
    _zero_grad(Counting(layer.parameters(), lr=0.1))
    assert Counting.calls == 1 and layer.weight.grad is None
    layer(torch.ones(1, 2)).sum().backward()
    _zero_grad(torch.optim.SGD(layer.parameters(), lr=0.1))
    assert layer.weight.grad is None and layer.bias.grad is None


class NormThenEmbed(nn.Module):
    """Batch norm over features, then an embedding of ids: the norm runs before the ids fail."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)
        self.embed = nn.Embedding(10, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(x) + self.embed(ids).sum(1)


def test_ids_out_of_range_are_named_without_a_second_update_of_running_statistics() -> None:
    torch.manual_seed(0)
    module = NormThenEmbed()
    x = torch.randn(4, 3)
    reference = nn.BatchNorm1d(3)
    reference(x)  # one update: what the failing forward itself does before the embedding
    stage = Stage(module, 0, 2)
    with pytest.raises(IndexError, match=r"stage 0: embedding embed has 10 rows but got ids from 0 to 12") as raised:
        stage.forward(0, {"x": x, "ids": torch.tensor([[0, 12], [1, 2], [3, 4], [5, 6]])})
    assert "index out of range" in str(raised.value.__cause__)
    assert torch.equal(module.norm.running_mean, reference.running_mean), "the diagnosis updated running statistics"
    assert module.training and module.norm.training, "the diagnosis left the module in eval mode"
    assert module.norm.num_batches_tracked.item() == 1
    # A forward whose ids are fine but that fails with the same message elsewhere keeps its own error.
    with pytest.raises(IndexError, match="index out of range in self") as raised:
        Stage(GathersTooFar(), 0, 2).forward(0, torch.tensor([[1, 2]]))
    assert "embedding" not in str(raised.value)


class GathersTooFar(nn.Module):
    """Embeds ids in range, then selects a row that does not exist."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids).index_select(0, torch.tensor([99]))


def test_the_executor_binds_a_program_again_when_its_actions_change() -> None:
    model = transformer()
    stages = {s: Stage(split_model(model, s, 2), s, 2, token_loss if s == 1 else None) for s in range(2)}
    program = Program.from_strings(["0F0 1F0 1B0 0B0 0F1 1F1 1B1 0B1"], (0, 0), 2)
    executor = Executor(program, 0, stages, StageIO(Transport(torch.device("cpu")), program, rank=0))
    order: list[str] = []

    class Tracer:
        def action_started(self, action: object) -> None:
            order.append(str(action))

        def action_ended(self, action: object) -> None:
            pass

        def waited(self, action: object, start: float, end: float) -> None:
            pass

    executor.tracer = Tracer()
    tokens, targets = token_batch(4)
    inputs, labels = split_microbatches(tokens, 2), split_microbatches(targets, 2)
    executor.run(inputs, labels, LossWeights(None)(labels), signature=0)
    program.actions[0] = Program.from_strings(["0F0 0F1 1F0 1F1 1B0 1B1 0B0 0B1"], (0, 0), 2).actions[0]
    order.clear()
    executor.run(inputs, labels, LossWeights(None)(labels), signature=0)
    assert order == ["0F0", "0F1", "1F0", "1F1", "1B0", "1B1", "0B0", "0B1"]
    assert all(stage.activations_held == 0 for stage in stages.values())

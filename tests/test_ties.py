"""A tied parameter stays one tensor: on a rank holding several of its stages, under every name, in checkpoints.

On one rank of a one-process group, in the test process. The model ties its
embedding the way T5 does: the first stage reads it as `embed.weight`, the
last both as `decoder_embed.weight` and as `head.weight`. Losses and weights
are checked against the unsplit model (relative error <= 1e-5 in fp32).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from faults import checkpoint_tensors
from tiny_models import assert_close
from torch import nn

from conveyor import Pipeline, PipelineSpec, checkpoint, trace_split
from conveyor.split.traced import TracedSplit

VOCAB, DIM, BATCH, SEQ, STEPS = 11, 6, 8, 4, 3
NAMES = ("embed.weight", "decoder_embed.weight", "head.weight")


class TiedThrice(nn.Module):
    """An encoder over `tokens`, then a decoder embedding of `decoder_tokens` and a head, all three one weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(4))
        self.decoder_embed = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.decoder_embed.weight = self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, decoder_tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h + self.decoder_embed(decoder_tokens))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def batches() -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    made = []
    for _ in range(STEPS + 1):
        tokens, decoder_tokens, targets = (torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(3))
        made.append(({"tokens": tokens, "decoder_tokens": decoder_tokens}, targets))
    return made


def traced() -> TracedSplit:
    x = batches()[0][0]
    return trace_split(TiedThrice(), (), {k: v[:3] for k, v in x.items()}, num_stages=2)


def sgd(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def trained_reference(steps: int) -> tuple[TiedThrice, list[float]]:
    reference = TiedThrice()
    optimizer = sgd(reference.parameters())
    losses = []
    for x, y in batches()[:steps]:
        optimizer.zero_grad()
        loss = loss_fn(reference(**x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return reference, losses


def test_the_split_ties_all_three_names(one_rank: None) -> None:
    split = traced()
    assert [tie.names for tie in split.graph.ties] == [((0, "embed.weight"), (1, "decoder_embed.weight"))]
    assert split.parameter_names(1)[:2] == ["decoder_embed.weight", "head.weight"]
    last = split.build_stage(1)
    assert last.get_parameter("head.weight") is last.get_parameter("decoder_embed.weight")


def test_stages_of_a_tie_on_one_rank_train_one_tensor_under_every_name(one_rank: None, tmp_path: Path) -> None:
    pipe = Pipeline(traced(), PipelineSpec("interleaved-1f1b", 1, 2), loss_fn=loss_fn, optimizer=sgd)
    reference, losses = trained_reference(STEPS)
    for step, (x, y) in enumerate(batches()[:STEPS]):
        loss = pipe.step(x, y)
        assert loss is not None
        assert_close(loss, torch.tensor(losses[step]), f"loss of step {step}")
    held = [
        (s, name, param)
        for s, stage in pipe.stages.items()
        for name, param in stage.module.named_parameters(remove_duplicate=False)
        if name in NAMES
    ]
    assert sorted(name for _, name, _ in held) == sorted(NAMES)
    assert all(param is held[0][2] for _, _, param in held), [(s, n, id(p)) for s, n, p in held]
    listed = dict(pipe.named_parameters())
    assert [name for name in listed if name in NAMES] == ["embed.weight"]
    trained = reference.embed.weight
    assert_close(listed["embed.weight"], trained, f"the tie after {STEPS} steps")
    # Every name the checkpoint holds it by is the trained tensor, and so is what the unsplit model loads.
    saved = checkpoint.save(pipe, tmp_path / "ck", STEPS)
    tensors = checkpoint_tensors(saved)
    for name in NAMES:
        assert_close(tensors[f"model.{name}"], trained, f"checkpoint's model.{name}")
        assert torch.equal(tensors[f"optim.{name}.momentum_buffer"], tensors["optim.embed.weight.momentum_buffer"])
    unsplit = TiedThrice()
    checkpoint.load_model(unsplit, saved)
    for name in NAMES:
        assert_close(unsplit.get_parameter(name), trained, f"unsplit model's {name} loaded from the checkpoint")
    pipe.close()


def test_a_checkpoint_whose_tied_copies_differ_is_refused(one_rank: None, tmp_path: Path) -> None:
    """A checkpoint written while a tie was held as two tensors: loading would keep whichever DCP wrote last."""
    pipe = Pipeline(traced(), PipelineSpec("interleaved-1f1b", 1, 2), loss_fn=loss_fn, optimizer=sgd)
    saved = checkpoint.save(pipe, tmp_path / "ck", 0)
    state = checkpoint_tensors(saved)
    state["model.head.weight"] = state["model.head.weight"] + 0.5
    stale = tmp_path / "stale"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(stale), no_dist=True)
    checkpoint.write_manifest(stale, {"precision": "fp32"})  # its files as they are: only the tie is wrong
    message = r"holds model\.\S+ and model\.\S+ with different values \(by up to 0\.5\), but they are one tied tensor"
    with pytest.raises(ValueError, match=message) as raised:
        checkpoint.load(pipe, stale)
    assert "model.head.weight" in str(raised.value)
    with pytest.raises(ValueError, match=message):
        checkpoint.load_model(TiedThrice(), stale)
    checkpoint.load(pipe, saved)  # the consistent one loads
    pipe.close()

"""The stage graph on real ranks: a skipped value travels straight to its stage, tied parameters train as one.

A hand-split model (so this file tests the runtime, not a splitter): an
embedding whose output also skips to the last stage, three blocks, and a head
that reuses the embedding's weight. Each rank checks its stages against the
unsplit model it trains itself (relative error <= 1e-5 in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tiny_models import assert_close
from torch import nn

from conveyor import Pipeline, PipelineSpec, spawn
from conveyor.runtime.stage_io import STEP_HEADER
from conveyor.schedules import Edge, StageGraph, Tie

VOCAB, DIM, SEQ, BATCH, STEPS = 11, 6, 4, 9, 3


class Whole(nn.Module):
    """The unsplit model: embed, a skip of half the embedding, three residual blocks, a tied head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        skip = 0.5 * h
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return (h + skip) @ self.embed.weight.T


class Embed(nn.Module):
    def __init__(self, whole: Whole) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.embed.load_state_dict(whole.embed.state_dict())

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(tokens)
        return h, 0.5 * h


class Block(nn.Module):
    def __init__(self, whole: Whole, index: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({str(index): nn.Linear(DIM, DIM)})
        self.blocks[str(index)].load_state_dict(whole.blocks[index].state_dict())
        self.index = index

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.blocks[str(self.index)](h))


class Head(Block):
    """The last block and the tied head; takes the skip (from stage 0) before h (from stage 2)."""

    def __init__(self, whole: Whole) -> None:
        super().__init__(whole, 2)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.embed.load_state_dict(whole.embed.state_dict())

    def forward(self, skip: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (super().forward(h) + skip) @ self.embed.weight.T


GRAPH = StageGraph(
    4,
    (Edge(0, 1, (0,)), Edge(0, 3, (1,)), Edge(1, 2), Edge(2, 3)),
    (Tie(((0, "embed.weight"), (3, "embed.weight"))),),
)


@dataclass
class HandSplit:
    graph: StageGraph

    def build_stage(self, stage: int, device: torch.device | str = "cpu") -> nn.Module:
        whole = Whole()
        module = [Embed(whole), Block(whole, 0), Block(whole, 1), Head(whole)][stage]
        return module.to(device)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


CASES = {2: [("interleaved-1f1b", 4), ("zbv", 4), ("looped-bfs", 3)], 4: [("1f1b", 5), ("gpipe", 3), ("zb-h1", 4)]}


def _skip_and_tie(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g))]
    batches *= STEPS
    for schedule, m in CASES[world]:
        where = f"{schedule} on {world} ranks, m={m}, rank {rank}"
        reference = Whole()
        reference_optimizer = torch.optim.Adam(reference.parameters(), lr=0.05)
        pipe = Pipeline(
            HandSplit(GRAPH),
            PipelineSpec(schedule, world, m),
            loss_fn=loss_fn,
            optimizer=lambda params: torch.optim.Adam(params, lr=0.05),
        )
        for step, (x, y) in enumerate(batches):
            reference_optimizer.zero_grad()
            expected = loss_fn(reference(x), y)
            expected.backward()
            reference_optimizer.step()
            loss = pipe.step(x, y, loss_on_all_ranks=True)
            assert loss is not None
            assert_close(loss, expected, f"{where}: loss of step {step}")
        wanted = dict(reference.named_parameters())
        for s, stage in pipe.stages.items():
            for name, param in stage.module.named_parameters():
                assert_close(param, wanted[name], f"{where}: stage {s} {name} after {STEPS} steps")
        # The two copies of the tied weight end bitwise equal.
        copies: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(world)]
        mine = [(s, st.module.embed.weight.detach().clone()) for s, st in pipe.stages.items() if s in (0, 3)]
        dist.all_gather_object(copies, mine)
        held = [tensor for rank_copies in copies for _, tensor in rank_copies]
        assert len(held) == 2, f"{where}: {len(held)} copies of the tied weight"
        assert torch.equal(held[0], held[1]), f"{where}: the tied copies differ after training"
        # The skipped value crossed only its own link: the blocks' links carry h alone.
        sent = pipe.transport.bytes_sent
        h_bytes = BATCH * SEQ * DIM * 4 * STEPS  # every micro-batch's h (or skip), over the steps
        mine_to_send = [
            link for link, (sender, _) in pipe.program.channels().items() if sender == rank and link[0] == "act"
        ]
        for link in mine_to_send:
            assert link in sent, f"{where}: nothing went over {link}"
            data = (
                sent[link] - 8 * 128 * m - 8 * STEP_HEADER * STEPS
            )  # a metadata message per micro-batch, a header a step
            assert data == h_bytes, f"{where}: {link} carried {data} bytes of data, not {h_bytes}"
        if schedule == "zbv":
            assert ("act", 0, 3) not in pipe.transport.channels, f"{where}: stages 0 and 3 share a rank"
        pipe.close()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, 4])
def test_skip_edges_and_tied_weights_train_like_one_process(world: int) -> None:
    spawn(_skip_and_tie, world, timeout_s=180)

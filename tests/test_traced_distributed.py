"""Traced splits on real ranks: conveyor's GPT, a skip connection, and Hugging Face GPT-2 (tied weights, a mask).

Every rank traces the model (the same split on every rank), builds the stages
the schedule gives it, and checks them against the unsplit model it trains
itself: losses of every step, every gradient, and the weights after the steps
(relative error <= 1e-5 in fp32). One spawn per rank count, four stages each,
every schedule: those of one stage per rank on 4 ranks, those of two on 2.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tiny_models import assert_close, assert_grads_match
from torch import nn

from conveyor import Pipeline, PipelineSpec, spawn, trace_split
from conveyor.models import GPT, GPTConfig, lm_loss
from conveyor.runtime.stage_io import STEP_HEADER

STEPS, BATCH, SEQ = 3, 10, 12
# Every schedule: those of one stage per rank on 4 ranks, those of two per rank on 2 (micro-batches they accept).
SCHEDULES = {
    4: [("gpipe", 4), ("1f1b", 5), ("zb-h1", 4), ("zb-h2", 5)],
    2: [("interleaved-1f1b", 4), ("looped-bfs", 3), ("zbv", 4), ("dualpipev", 4)],
}


class Skip(nn.Module):
    """Residual blocks whose input also skips straight to the head, three stages on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(32, 50)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = skipped = self.embed(tokens)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(torch.cat([h, skipped], dim=-1))


def gpt2_config(**extra: Any) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=4, n_embd=32, n_head=2, vocab_size=100, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, use_cache=False, bos_token_id=1, eos_token_id=1, pad_token_id=0, **extra,
    )  # fmt: skip


def gpt2_lm() -> nn.Module:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config())


def gpt2_classifier() -> nn.Module:
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(0)
    return GPT2ForSequenceClassification(gpt2_config(num_labels=3))


def logits_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits.flatten(0, -2), targets.flatten())


def token_batches(vocab: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(1, vocab, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def padded_batches() -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Sequences of different lengths, right-padded, with their attention mask and a class each."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(1, 100, (BATCH, SEQ), generator=g)
        lengths = torch.randint(4, SEQ + 1, (BATCH,), generator=g)
        mask = (torch.arange(SEQ) < lengths[:, None]).long()
        batches.append(({"input_ids": ids * mask, "attention_mask": mask}, torch.randint(0, 3, (BATCH,), generator=g)))
    return batches


def _case(name: str) -> tuple[Callable[[], nn.Module], list[tuple[Any, torch.Tensor]], Callable[..., torch.Tensor]]:
    if name == "gpt":
        return (lambda: _seeded(GPT, GPTConfig(layers=4, dim=32, heads=2, context=16))), token_batches(256, 1), lm_loss
    if name == "skip":
        return Skip, token_batches(50, 2), lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())
    if name == "gpt2-lm":
        return gpt2_lm, token_batches(100, 4), logits_loss
    return gpt2_classifier, padded_batches(), logits_loss


def _seeded(cls: Callable[..., nn.Module], *args: Any) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args)


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _example(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, dict):
        return (), {k: v[:3] for k, v in inputs.items()}
    return (inputs[:3],), {}


def _train_traced(rank: int, world: int, names: list[str]) -> None:
    for name in names:
        build, batches, loss_fn = _case(name)
        args, kwargs = _example(batches[0][0])
        split = trace_split(build(), args, kwargs, num_stages=4)
        for schedule, m in SCHEDULES[world]:
            where = f"{name}, {schedule} on {world} ranks, rank {rank}"
            reference = build()
            pipe = Pipeline(split, PipelineSpec(schedule, world, m), loss_fn=loss_fn)
            # One step without an optimizer: every gradient.
            x, y = batches[0]
            expected = loss_fn(_call(reference, x), y)
            expected.backward()
            loss = pipe.step(x, y, loss_on_all_ranks=True)
            assert loss is not None
            assert_close(loss, expected, f"{where}: loss")
            assert_grads_match(pipe.named_parameters(), reference, where)
            pipe.close()
            # Then training, losses of every step and the weights at the end. SGD with momentum rather than Adam:
            # Adam turns a gradient that is zero up to rounding (attention's key bias) into a full-size step.
            reference = build()
            reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
            pipe = Pipeline(
                split,
                PipelineSpec(schedule, world, m),
                loss_fn=loss_fn,
                optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
            )
            for step, (x, y) in enumerate(batches):
                reference_optimizer.zero_grad()
                expected = loss_fn(_call(reference, x), y)
                expected.backward()
                reference_optimizer.step()
                loss = pipe.step(x, y, loss_on_all_ranks=True)
                assert loss is not None
                assert_close(loss, expected, f"{where}: loss of step {step}")
            wanted = dict(reference.named_parameters(remove_duplicate=False))
            for s, stage in pipe.stages.items():
                for param_name, param in stage.module.named_parameters():
                    assert_close(param, wanted[param_name], f"{where}: stage {s} {param_name} after {STEPS} steps")
            _tied_copies_are_equal(pipe, world, where)
            if name == "skip":
                _each_link_carries_one_hidden_state(pipe, rank, where)
            pipe.close()


def _each_link_carries_one_hidden_state(pipe: Pipeline, rank: int, where: str) -> None:
    """The embedding that skips to the head travels on its own edge 0->3, so every link carries one [*, SEQ, 16]."""
    assert any(e.src == 0 and e.dst == 3 for e in pipe.graph.edges), f"{where}: no edge 0->3 in {pipe.graph.edges}"
    m = pipe.num_microbatches
    for link, (sender, _) in pipe.program.channels().items():
        if sender != rank or link[0] != "act":
            continue
        # Less the metadata (one 128-word message per micro-batch, once) and the step headers.
        data = pipe.transport.bytes_sent[link] - 8 * 128 * m - 8 * STEP_HEADER * STEPS
        assert data == STEPS * BATCH * SEQ * 16 * 4, f"{where}: {link} carried {data} bytes of activations"


def _tied_copies_are_equal(pipe: Pipeline, world: int, where: str) -> None:
    """Every stage's copy of a tied parameter holds the same bits after training."""
    mine = [
        (index, copy.deepcopy(stage.module.get_parameter(tie.name_on(s)).detach()))
        for index, tie in enumerate(pipe.graph.ties)
        for s, stage in pipe.stages.items()
        if s in tie.stages
    ]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    copies: dict[int, list[torch.Tensor]] = {}
    for index, tensor in (item for rank_items in gathered for item in rank_items):
        copies.setdefault(index, []).append(tensor)
    for index, tie in enumerate(pipe.graph.ties):
        held = copies[index]
        assert len(held) == len(tie.stages), f"{where}: {len(held)} copies of tie {tie}"
        assert all(torch.equal(held[0], other) for other in held[1:]), f"{where}: copies of tie {tie} differ"


def _models() -> list[str]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return ["gpt", "skip"]
    return ["gpt", "skip", "gpt2-lm", "gpt2-classifier"]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [2, 4])
def test_traced_splits_train_like_one_process(world: int) -> None:
    names = _models()
    if len(names) < 4:
        pytest.skip("transformers is not installed: GPT-2 cases need the [hf] extra")
    spawn(_train_traced, world, (names,), timeout_s=380)

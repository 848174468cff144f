"""Traced splits on real ranks: conveyor's GPT, a skip connection, Hugging Face GPT-2 (tied weights, a mask) and T5.

Every rank traces the model (the same split on every rank), builds the stages
the schedule gives it, and checks them against the unsplit model it trains
itself: losses of every step, every gradient, and the weights after the steps
(relative error <= 1e-5 in fp32). One spawn per rank count, four stages each,
every schedule: those of one stage per rank on 4 ranks, those of two on 2.
T5 ties one embedding under four names, two on each end of the model: it
trains, is saved, and resumes in another split as the unsplit model would.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from tiny_models import assert_close, assert_grads_match
from torch import nn

from conveyor import Pipeline, PipelineSpec, checkpoint, spawn, trace_split
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
    m = pipe.spec.microbatches
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


# T5: the embedding is `shared.weight` and `encoder.embed_tokens.weight` on the first stage,
# `decoder.embed_tokens.weight` and `lm_head.weight` on the last; zbv puts both on rank 0, where they must be one
# tensor under all four names.
T5_VOCAB, T5_SOURCE, T5_TARGET, T5_STEPS, T5_RESUMED = 32, 6, 5, 3, 2
T5_TIE = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=T5_VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=4, num_decoder_layers=2, num_heads=2,
        dropout_rate=0.0, tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, use_cache=False,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def t5_batches() -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(6)
    made = []
    for _ in range(T5_STEPS + T5_RESUMED):
        source = torch.randint(1, T5_VOCAB, (BATCH, T5_SOURCE), generator=g)
        target = torch.randint(1, T5_VOCAB, (BATCH, T5_TARGET + 1), generator=g)
        made.append(({"input_ids": source, "decoder_input_ids": target[:, :-1]}, target[:, 1:]))
    return made


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def t5_trained(steps: int) -> tuple[nn.Module, list[torch.Tensor]]:
    """The unsplit T5 after `steps` steps, and the loss of each of them."""
    reference = t5()
    optimizer = sgd(reference.parameters())
    losses = []
    for x, y in t5_batches()[:steps]:
        optimizer.zero_grad()
        loss = logits_loss(reference(**x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return reference, losses


def _t5_trains_saves_and_resumes(rank: int, world: int, folder: str) -> None:
    batches = t5_batches()
    reference, expected = t5_trained(T5_STEPS + T5_RESUMED)
    example = {k: v[:3] for k, v in batches[0][0].items()}
    split = trace_split(t5(), (), example, num_stages=4, blocks="encoder.block")
    pipe = Pipeline(split, PipelineSpec("zbv", world, 4), loss_fn=logits_loss, optimizer=sgd)
    where = f"T5, 4 stages, zbv on 2 ranks, rank {rank}"
    for step, (x, y) in enumerate(batches[:T5_STEPS]):
        loss = pipe.step(x, y, loss_on_all_ranks=True)
        assert loss is not None
        assert_close(loss, expected[step], f"{where}: loss of step {step}")
    if rank == pipe.program.rank_of(0):
        held = {
            name: param
            for stage in pipe.stages.values()
            for name, param in stage.module.named_parameters(remove_duplicate=False)
            if name in T5_TIE
        }
        assert sorted(held) == sorted(T5_TIE), f"{where}: holds the tie as {sorted(held)}"
        assert all(param is held["shared.weight"] for param in held.values()), f"{where}: the tie is several tensors"
        listed = [name for name, _ in pipe.named_parameters() if name in T5_TIE]
        assert len(listed) == 1, f"{where}: named_parameters lists the tie as {listed}"
    _tied_copies_are_equal(pipe, world, where)
    checkpoint.save(pipe, folder, T5_STEPS)
    pipe.close()
    # The next steps in another split (two stages on two ranks, 1f1b) continue the unsplit model's training.
    split = trace_split(t5(), (), example, num_stages=2, blocks="encoder.block")
    pipe = Pipeline(split, PipelineSpec("1f1b", world, 4), loss_fn=logits_loss, optimizer=sgd)
    checkpoint.load(pipe, Path(folder) / f"step-{T5_STEPS}")
    where = f"T5 resumed in 2 stages, 1f1b on 2 ranks, rank {rank}"
    for step, (x, y) in enumerate(batches[T5_STEPS:], T5_STEPS):
        loss = pipe.step(x, y, loss_on_all_ranks=True)
        assert loss is not None
        assert_close(loss, expected[step], f"{where}: loss of step {step}")
    pipe.close()


@pytest.mark.timeout(240)
def test_t5_tie_stays_one_tensor_through_training_checkpoints_and_resuming(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    spawn(_t5_trains_saves_and_resumes, 2, (str(tmp_path),), timeout_s=220)
    trained, _ = t5_trained(T5_STEPS)
    saved = tmp_path / f"step-{T5_STEPS}"
    metadata = dcp.FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    held = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in metadata.items() if k[:6] == "model."}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(held, checkpoint_id=str(saved), no_dist=True)
    # Every name of every parameter, the four of the tie included, holds the trained value.
    for name, param in trained.named_parameters(remove_duplicate=False):
        assert_close(held[f"model.{name}"], param, f"checkpoint's model.{name}")
    unsplit = t5()
    checkpoint.load_model(unsplit, saved)
    for name, param in trained.named_parameters(remove_duplicate=False):
        assert_close(unsplit.get_parameter(name), param, f"the unsplit model's {name} loaded from the checkpoint")

"""A token-mean loss over padded targets (-100) on real ranks: with the loss contract's weights, every schedule
gives the unsplit model's loss and gradients (fp32, relative error <= 1e-5); without them it warns.

The padding is spread unevenly on purpose: the 4 micro-batches of a mini-batch of 12 sequences of 5 tokens
hold 15, 11, 4 and 2 tokens to predict, so weighing them by samples would be far off.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny_models import SEQ, VOCAB, assert_close, assert_grads_match, assert_params_match, relative_error, transformer

from conveyor import Pipeline, PipelineSpec, losses, spawn
from conveyor.schedules import SCHEDULES

KEEP = [5, 5, 5, 4, 4, 3, 2, 1, 1, 1, 1, 0]  # tokens kept per sequence: micro-batches of 3 count 15, 11, 4, 2
M = 4
LR = 0.1


def padded_batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (len(KEEP), SEQ), generator=g)
    targets = torch.randint(0, VOCAB, (len(KEEP), SEQ), generator=g)
    for row, keep in enumerate(KEEP):
        targets[row, keep:] = -100
    return tokens, targets


def token_mean(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A user's own loss: cross-entropy averaged over the tokens that count."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def by_tokens(targets: torch.Tensor) -> torch.Tensor:
    return (targets != -100).sum()


def _reference(clip: float | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    model = transformer()
    tokens, targets = padded_batch()
    loss = token_mean(model(tokens), targets)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return model, loss.detach()


def _check(pipe: Pipeline, where: str, clip: float | None = None) -> None:
    tokens, targets = padded_batch()
    reference, expected = _reference(clip)
    loss = pipe.step(tokens, targets, loss_on_all_ranks=True, max_grad_norm=clip)
    assert loss is not None
    assert_close(loss, expected, f"{where}: loss")
    assert_grads_match(pipe.named_parameters(), reference, where)


def _every_schedule(rank: int, world: int) -> None:
    tokens, targets = padded_batch()
    _, expected = _reference()
    for name, info in SCHEDULES.items():
        if info.asynchronous:  # below, as streams
            continue
        spec = PipelineSpec(name, world, M)
        where = f"{name}, rank {rank}"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # with its weights, nothing to warn about
            _check(Pipeline.from_model(transformer(), spec, loss_fn=token_mean, loss_weight=by_tokens), where)
        # conveyor.losses carry their weight: the same, with nothing more to give.
        pipe = Pipeline.from_model(transformer(), spec, loss_fn=losses.token_classification)
        _check(pipe, f"{where}, losses.token_classification")
        # Clipping by the global norm clips the exact gradients.
        pipe = Pipeline.from_model(transformer(), spec, loss_fn=token_mean, loss_weight=by_tokens)
        _check(pipe, f"{where}, clipped", clip=0.5)
        # Without the weights: a warning naming the fix, and the loss of the micro-batches weighted by samples.
        pipe = Pipeline.from_model(transformer(), spec, loss_fn=token_mean)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wrong = pipe.step(tokens, targets, loss_on_all_ranks=True)
            pipe.step(tokens, targets)  # once is enough
        told = [str(w.message) for w in caught if "hold -100" in str(w.message)]
        if rank == pipe.last_rank:
            assert len(told) == 1 and "loss_weight=lambda t: (t != -100).sum()" in told[0], told
        assert wrong is not None and relative_error(wrong, expected) > 1e-2, f"{where}: the test cannot tell"
    # A summed loss: every micro-batch weighs 1, and the mini-batch loss is the sum over its tokens.
    reference = transformer()
    total = F.cross_entropy(reference(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    total.backward()
    summed = losses.Summed(lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten(), reduction="sum"))
    pipe = Pipeline.from_model(transformer(), PipelineSpec("1f1b", world, M), loss_fn=summed)
    loss = pipe.step(tokens, targets, loss_on_all_ranks=True)
    assert loss is not None
    assert_close(loss, total, f"summed loss, rank {rank}")
    assert_grads_match(pipe.named_parameters(), reference, f"summed loss, rank {rank}")


@pytest.mark.timeout(300)
def test_every_schedule_gives_the_token_mean_with_its_weights_and_warns_without() -> None:
    spawn(_every_schedule, 2, timeout_s=280)


def _data_parallel_and_replicas(rank: int, world: int) -> None:
    for spec in (PipelineSpec("1f1b", 4, M, dp=2), PipelineSpec("gpipe", 4, M, replicas=(1, 1, 2))):
        if spec.num_stages == 3:
            # 3 stages of the 4 blocks' transformer: a manual split of 3 (embed and 2 blocks, 1 block, 1 block).
            pipe = Pipeline.from_model(
                transformer(), spec, loss_fn=token_mean, loss_weight=by_tokens, layers_per_stage=(2, 1, 1)
            )
        else:
            pipe = Pipeline.from_model(transformer(), spec, loss_fn=token_mean, loss_weight=by_tokens)
        _check(pipe, f"{spec.schedule} dp={spec.dp} replicas={spec.replicas}, rank {rank}")
        pipe.close()


@pytest.mark.timeout(200)
def test_data_parallel_and_replicated_stages_give_the_token_mean() -> None:
    spawn(_data_parallel_and_replicas, 4, timeout_s=180)


def _fp16_update(rank: int, world: int) -> None:
    """float16 with its loss scale: the weighted micro-batch losses are scaled, and unscaled before the update,
    so one SGD step moves the weights as the unsplit model's token mean does under autocast and GradScaler."""
    scale, lr = 2.0**10, 0.1
    tokens, targets = padded_batch()
    reference = transformer()
    before = {name: p.detach().clone() for name, p in reference.named_parameters()}
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = token_mean(reference(tokens), targets)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    expected = {name: p.detach() - before[name] for name, p in reference.named_parameters()}
    spec = PipelineSpec("1f1b", world, M, precision="fp16")
    for weight, close in ((by_tokens, True), (None, False)):
        pipe = Pipeline.from_model(
            transformer(), spec, loss_fn=token_mean, loss_weight=weight, optimizer=lambda ps: torch.optim.SGD(ps, lr=lr)
        )
        assert pipe.update.loss_scale is not None
        pipe.update.loss_scale.scale = scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # without the weights it warns (checked above)
            mine = pipe.step(tokens, targets, loss_on_all_ranks=True)
        assert mine is not None and pipe.update.loss_scale.skipped == 0
        errors = [relative_error(p.detach() - before[name], expected[name]) for name, p in pipe.named_parameters()]
        where = f"fp16, {'weighted by tokens' if close else 'by samples'}, rank {rank}"
        if close:
            assert relative_error(mine, loss.detach()) <= 1e-2, f"{where}: loss {mine} against {loss}"
            assert max(errors) <= 1e-2, f"{where}: updates off by up to {max(errors):.2e}"
        else:  # the test can tell: weighing by samples moves the weights elsewhere
            assert max(errors) > 5e-2, f"{where}: the test cannot tell ({max(errors):.2e})"
        pipe.close()


@pytest.mark.timeout(200)
def test_float16_loss_scaling_keeps_the_token_mean_exact() -> None:
    spawn(_fp16_update, 2, timeout_s=180)


def _streams(rank: int, world: int) -> None:
    """pipedream-2bw applies one update per mini-batch: its weights come from the mini-batch's token mean.
    pipedream updates after every micro-batch: each update's loss is that micro-batch's token mean."""
    tokens, targets = padded_batch()
    reference, _ = _reference()
    with torch.no_grad():
        for param in reference.parameters():
            param -= LR * param.grad  # one SGD step on the token mean of the mini-batch
    spec = PipelineSpec("pipedream-2bw", world, M)
    sgd: Any = lambda params: torch.optim.SGD(params, lr=LR)  # noqa: E731
    pipe = Pipeline.from_model(transformer(), spec, loss_fn=token_mean, loss_weight=by_tokens, optimizer=sgd)
    for _ in pipe.stream([(tokens, targets)], 1):
        pass
    assert_params_match(pipe.named_parameters(), reference, f"pipedream-2bw, rank {rank}", tol=1e-5)
    pipe.close()
    pipe = Pipeline.from_model(transformer(), PipelineSpec("pipedream", world, M), loss_fn=token_mean)
    streamed = [loss for _, loss in pipe.stream([(tokens, targets)], 1)]  # weights of 1: no warning needed
    if rank == pipe.last_rank:
        model = transformer()
        parts = zip(tokens.tensor_split(M), targets.tensor_split(M), streamed, strict=True)
        for k, (x, y, loss) in enumerate(parts):
            if k == 0:  # the first micro-batch ran on the initial weights
                assert_close(loss, token_mean(model(x), y), f"pipedream, rank {rank}: micro-batch {k}")
    pipe.close()


@pytest.mark.timeout(200)
def test_streams_weigh_each_update_by_its_tokens() -> None:
    spawn(_streams, 2, timeout_s=180)


def test_the_losses_weigh_what_they_average_and_an_empty_micro_batch_is_zero() -> None:
    logits = torch.randn(3, SEQ, VOCAB, requires_grad=True)
    tokens, targets = padded_batch()
    labels = targets[:3]
    assert int(losses.token_classification.weight(labels)) == 15
    assert int(losses.causal_lm.weight(labels)) == int((labels[:, 1:] != -100).sum())
    shifted = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(losses.causal_lm(logits, labels), shifted)
    empty = torch.full((2, SEQ), -100)
    loss = losses.causal_lm(logits[:2], empty)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None and torch.isfinite(logits.grad).all()
    summed = losses.Summed(lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten(), reduction="sum"))
    assert summed.reduction == "sum"

"""Real multi-process runs over gloo, each rank checked against a single-process reference it builds itself.

Starting a process group costs seconds, so each test spawns once and loops over
the cases inside the ranks; assertion messages name the case, the rank and the
parameter that differs.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import (
    MODELS,
    TinyTransformer,
    assert_close,
    assert_grads_match,
    assert_params_match,
    token_batch,
    token_loss,
    transformer,
    two_stream,
)

from conveyor import Pipeline, PipelineSpec, spawn, split_model

SCHEDULES = ("gpipe", "1f1b")
MICROBATCHES = (1, 2, 3, 4, 8)
BATCH = 10  # not a multiple of 3, 4 or 8: uneven micro-batches


def _one_step_matches_the_reference(rank: int, world: int) -> None:
    for schedule in SCHEDULES:
        for m in MICROBATCHES:
            for kind, (build, make_batch, loss_fn) in MODELS.items():
                where = f"{schedule} p={world} m={m} {kind}, rank {rank}"
                x, y = make_batch(BATCH)
                reference = build()
                expected = loss_fn(reference(x), y)
                expected.backward()

                pipe = Pipeline(split_model(build(), rank, world), PipelineSpec(schedule, world, m), loss_fn=loss_fn)
                # Only the first stage's rank gets inputs and only the last's gets targets.
                loss = pipe.step(x if rank == 0 else None, y if rank == world - 1 else None)

                if rank == world - 1:
                    assert loss is not None, f"{where}: the last rank must return the loss"
                    assert_close(loss, expected, f"{where}: loss")
                else:
                    assert loss is None, f"{where}: only the last rank returns the loss without loss_on_all_ranks"
                assert_grads_match(pipe.named_parameters(), reference, where)
                for stage in pipe.stages.values():
                    assert stage.activations_held == 0, f"{where}: stage {stage.index} kept activations"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_one_step_matches_the_reference(world: int) -> None:
    """Loss and every gradient, for gpipe and 1f1b, m in 1, 2, 3, 4, 8, an MLP and a Transformer."""
    spawn(_one_step_matches_the_reference, world, timeout_s=120)


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


def _training_follows_the_reference(rank: int, world: int) -> None:
    m, steps = 4, 10
    for schedule in SCHEDULES:
        for kind, optimizer_name in (("mlp", "sgd"), ("transformer", "adam")):
            build, make_batch, loss_fn = MODELS[kind]
            optimizer = OPTIMIZERS[optimizer_name]
            where = f"{schedule} p={world} m={m} {kind} {optimizer_name}, rank {rank}"
            reference = build()
            reference_optimizer = optimizer(reference.parameters())
            pipe = Pipeline(
                split_model(build(), rank, world),
                PipelineSpec(schedule, world, m),
                loss_fn=loss_fn,
                optimizer=optimizer,
            )
            for step in range(steps):
                x, y = make_batch(BATCH, seed=100 + step)
                reference_optimizer.zero_grad()
                expected = loss_fn(reference(x), y)
                expected.backward()
                reference_optimizer.step()
                loss = pipe.step(x, y)
                if loss is not None:
                    assert_close(loss, expected, f"{where}: loss of step {step}")
                # The pipeline steps and zeroes its gradients itself.
                assert all(p.grad is None for p in pipe.parameters()), f"{where}: gradients left after step {step}"
            assert_params_match(pipe.named_parameters(), reference, f"{where}: after {steps} steps", tol=1e-5)
            initial = dict(build().named_parameters())
            moved = [n for n, p in pipe.named_parameters() if not torch.equal(p, initial[n])]
            assert moved, f"{where}: training did not change any parameter"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_training_follows_the_reference(world: int) -> None:
    """Ten optimizer steps (an MLP with SGD and momentum, a Transformer with Adam): losses and final parameters."""
    spawn(_training_follows_the_reference, world, timeout_s=100)


def _features(rank: int, world: int) -> None:
    last = world - 1
    for schedule in SCHEDULES:
        # loss_on_all_ranks: every rank gets the mini-batch loss.
        build, make_batch, loss_fn = MODELS["transformer"]
        x, y = make_batch(BATCH)
        reference = build()
        expected = loss_fn(reference(x), y)
        expected.backward()
        pipe = Pipeline(split_model(build(), rank, world), PipelineSpec(schedule, world, 3), loss_fn=loss_fn)
        loss = pipe.step(x, y, loss_on_all_ranks=True)
        assert loss is not None, f"{schedule} rank {rank}: loss_on_all_ranks gave None"
        assert_close(loss, expected, f"{schedule} rank {rank}: loss_on_all_ranks")
        assert_grads_match(pipe.named_parameters(), reference, f"{schedule} loss_on_all_ranks, rank {rank}")

        # Gradients accumulate over steps until zeroed: a second batch adds its gradients.
        x2, y2 = make_batch(BATCH, seed=7)
        loss_fn(reference(x2), y2).backward()
        pipe.step(x2, y2)
        assert_grads_match(pipe.named_parameters(), reference, f"{schedule} accumulated, rank {rank}")

        # A first stage called with keyword arguments, one of them not a tensor.
        tokens, targets = token_batch(BATCH, seed=3)
        offset = torch.randn(BATCH, 1, 8, generator=torch.Generator().manual_seed(4))
        inputs = {"tokens": tokens, "offset": offset, "scale": 0.5}
        reference = transformer()
        expected = token_loss(reference(**inputs), targets)
        expected.backward()
        pipe = Pipeline(split_model(transformer(), rank, world), PipelineSpec(schedule, world, 4), loss_fn=token_loss)
        loss = pipe.step(inputs if rank == 0 else None, targets if rank == last else None)
        if rank == last:
            assert_close(loss, expected, f"{schedule} dict input: loss")
        assert_grads_match(pipe.named_parameters(), reference, f"{schedule} dict input, rank {rank}")

        # Stages that pass three tensors on; a float mask and int64 positions carry no gradient.
        reference = two_stream()
        expected = token_loss(reference(tokens), targets)
        expected.backward()
        pipe = Pipeline(split_model(two_stream(), rank, world), PipelineSpec(schedule, world, 3), loss_fn=token_loss)
        loss = pipe.step(tokens, targets)
        if rank == last:
            assert_close(loss, expected, f"{schedule} two streams: loss")
        assert_grads_match(pipe.named_parameters(), reference, f"{schedule} two streams, rank {rank}")

        # The batch size may change between steps (new shapes travel once, then are cached) and come back.
        reference = transformer()
        pipe = Pipeline(split_model(transformer(), rank, world), PipelineSpec(schedule, world, 3), loss_fn=token_loss)
        for step, size in enumerate((10, 7, 10, 7, 3)):
            tokens, targets = token_batch(size, seed=20 + step)
            reference.zero_grad(set_to_none=True)
            pipe.zero_grad()
            expected = token_loss(reference(tokens), targets)
            expected.backward()
            loss = pipe.step(tokens, targets)
            if rank == last:
                assert_close(loss, expected, f"{schedule} batch of {size}: loss")
            where = f"{schedule} step {step}, batch of {size}, rank {rank}"
            assert_grads_match(pipe.named_parameters(), reference, where)

        # from_model with a function: built on the meta device, each rank materializing its own stage.
        reference = split_model(TinyTransformer, 0, 1)
        expected = token_loss(reference(tokens), targets)
        expected.backward()
        pipe = Pipeline.from_model(TinyTransformer, PipelineSpec(schedule, world, 2), loss_fn=token_loss)
        assert all(p.device.type == "cpu" for p in pipe.parameters())
        loss = pipe.step(tokens, targets, loss_on_all_ranks=True)
        assert_close(loss, expected, f"{schedule} from_model: loss, rank {rank}")
        assert_grads_match(pipe.named_parameters(), reference, f"{schedule} from_model, rank {rank}")

    # A stage with no parameters (stage 1 holds only a Tanh), trained with an optimizer.
    build, make_batch, loss_fn = MODELS["mlp"]
    reference = build()
    reference_optimizer = OPTIMIZERS["sgd"](reference.parameters())
    pipe = Pipeline(
        split_model(build(), rank, world, [3, 1, 3]),
        PipelineSpec("1f1b", world, 2),
        loss_fn=loss_fn,
        optimizer=OPTIMIZERS["sgd"],
    )
    assert (rank == 1) == (not list(pipe.parameters()))
    for step in range(3):
        x, y = make_batch(BATCH, seed=30 + step)
        reference_optimizer.zero_grad()
        expected = loss_fn(reference(x), y)
        expected.backward()
        reference_optimizer.step()
        loss = pipe.step(x, y, loss_on_all_ranks=True)
        assert_close(loss, expected, f"parameterless stage: loss of step {step}, rank {rank}")
    assert_params_match(pipe.named_parameters(), reference, f"parameterless stage, rank {rank}", tol=1e-5)


@pytest.mark.timeout(120)
def test_features_on_three_ranks() -> None:
    """loss_on_all_ranks, accumulation, keyword inputs, several tensors between stages, changing batch sizes, ..."""
    spawn(_features, 3, timeout_s=100)


def _mlp_pipeline(schedule: str, world: int, m: int) -> Pipeline:
    """The MLP on `world` ranks (two stages per rank under zbv)."""
    build, _, loss_fn = MODELS["mlp"]
    return Pipeline.from_model(build(), PipelineSpec(schedule, world, m), loss_fn=loss_fn)


def _own_messages_after_pipelines(rank: int, world: int) -> None:
    x, y = MODELS["mlp"][1](BATCH)
    for schedule in ("1f1b", "zbv"):
        _mlp_pipeline(schedule, world, 4).step(x, y)
    # The pipelines left the next step's signature receives posted; the user's tag-0 messages must pass them by.
    message = torch.arange(5.0)
    if rank == 0:
        dist.send(message, dst=1)
    elif rank == 1:
        received = torch.zeros(5)
        dist.recv(received, src=0)
        assert torch.equal(received, message), f"rank 1 received {received.tolist()}"


@pytest.mark.timeout(90)
def test_the_users_own_messages_on_the_same_group_still_arrive() -> None:
    spawn(_own_messages_after_pipelines, 2, timeout_s=60)


def _two_pipelines_on_subgroups(rank: int, world: int) -> None:
    # Ranks {0, 1} and {2, 3} each run a 2-stage pipeline on their own group, as data-parallel replicas would.
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    group = groups[rank // 2]
    local = dist.get_rank(group)
    build, make_batch, loss_fn = MODELS["transformer"]
    x, y = make_batch(BATCH, seed=1 + rank // 2)  # each replica its own batch
    reference = build()
    expected = loss_fn(reference(x), y)
    expected.backward()
    pipe = Pipeline(split_model(build(), local, 2), PipelineSpec("1f1b", 2, 4), loss_fn=loss_fn, group=group)
    loss = pipe.step(x, y, loss_on_all_ranks=True)
    where = f"replica {rank // 2}, rank {rank} (rank {local} of its group)"
    assert loss is not None
    assert_close(loss, expected, f"{where}: loss")
    assert_grads_match(pipe.named_parameters(), reference, where)


@pytest.mark.timeout(120)
def test_pipelines_on_subgroups_match_the_reference() -> None:
    spawn(_two_pipelines_on_subgroups, 4, timeout_s=90)


def _close_answers_what_was_left_posted(rank: int, world: int) -> None:
    x, y = MODELS["mlp"][1](BATCH)
    for schedule in ("1f1b", "zbv"):
        where = f"{schedule}, rank {rank}"
        with _mlp_pipeline(schedule, world, 2 * world) as pipe:
            io = pipe.executor.io
            assert io.receives_posted == 0, f"{where}: nothing is posted before the first step"
            pipe.step(x, y)
            fed_by_others = [s for s in pipe.stages if s > 0 and pipe.program.rank_of(s - 1) != rank]
            assert io.receives_posted == len(fed_by_others), f"{where}: one signature receive per stage fed by a peer"
        assert io.receives_posted == 0, f"{where}: close() left a receive posted"
        pipe.step(x, y)  # a step after close() still works
        pipe.close()
        pipe.close()  # a second close() does nothing
        assert io.receives_posted == 0, f"{where}: close() after a later step left a receive posted"


@pytest.mark.timeout(90)
def test_close_answers_the_receives_left_for_a_next_step() -> None:
    spawn(_close_answers_what_was_left_posted, 3, timeout_s=60)


def _rank_zero_closes_while_rank_one_steps(rank: int, world: int) -> None:
    build, make_batch, loss_fn = MODELS["mlp"]
    x, y = make_batch(BATCH)
    pipe = Pipeline(split_model(build(), rank, world), PipelineSpec("1f1b", world, 2), loss_fn=loss_fn)
    pipe.step(x, y)
    if rank == 0:
        pipe.close()
    else:
        pipe.step(x, y)


@pytest.mark.timeout(90)
def test_closing_on_one_rank_only_is_a_clear_error() -> None:
    with pytest.raises(mp.ProcessRaisedException, match="rank 0 closed the pipeline while this rank began a step"):
        spawn(_rank_zero_closes_while_rank_one_steps, 2, timeout_s=60)


def _results_and_forward_only_runs(rank: int, world: int) -> None:
    from conveyor.schedules import SCHEDULES as ALL

    build, make_batch, loss_fn = MODELS["transformer"]
    x, y = make_batch(BATCH, seed=11)
    reference = build()
    with torch.no_grad():
        logits = reference(x)
    parts = [loss_fn(p, t) for p, t in zip(logits.tensor_split(4), y.tensor_split(4), strict=True)]
    for schedule, info in ALL.items():
        m = 4  # 4 micro-batches on 2 ranks suit every schedule
        where = f"{schedule}, rank {rank}"
        pipe = Pipeline.from_model(build(), PipelineSpec(schedule, world, m), loss_fn=loss_fn)
        # evaluate: the loss and nothing else; no gradient, nothing held.
        loss = pipe.evaluate(x, y, loss_on_all_ranks=True)
        assert loss is not None
        assert_close(loss, loss_fn(logits, y), f"{where}: evaluate")
        assert all(p.grad is None for p in pipe.parameters()), f"{where}: evaluate left gradients"
        assert all(s.activations_held == 0 for s in pipe.stages.values()), f"{where}: evaluate kept activations"
        # predict: the last stage's output for the whole batch, on its rank.
        predicted = pipe.predict(x)
        if rank == pipe.last_rank:
            assert_close(predicted, logits, f"{where}: predict")
        else:
            assert predicted is None, f"{where}: predict returned something on a rank without the last stage"
        if info.asynchronous:  # they stream, never step: tests/test_pipedream_distributed.py
            pipe.close()
            continue
        # step: per-micro-batch losses and outputs on the last stage's rank.
        losses: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        pipe.step(x, y, losses=losses, outputs=outputs)
        if rank == pipe.last_rank:
            assert len(losses) == len(outputs) == 4, f"{where}: {len(losses)} losses, {len(outputs)} outputs"
            for k in range(4):
                assert_close(losses[k], parts[k], f"{where}: loss of micro-batch {k}")
            assert_close(torch.cat(outputs), logits, f"{where}: outputs")
        pipe.close()


@pytest.mark.timeout(150)
def test_results_evaluate_and_predict_with_every_schedule() -> None:
    """Every schedule of 4 micro-batches on 2 ranks: evaluate, predict, per-micro-batch losses and outputs."""
    spawn(_results_and_forward_only_runs, 2, timeout_s=120)

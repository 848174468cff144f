"""Planning a traced model (Hugging Face GPT-2): its per-layer profile, plans cut from its graph, and the CLI."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conveyor import Pipeline, PipelineSpec
from conveyor.cli import main
from conveyor.plan import Plan, make_plan, profile_model, split_with_plan, stage_costs, traced_fingerprint
from conveyor.train import TrainConfig

pytest.importorskip("transformers")

from conveyor.models.gpt2 import gpt2_config, gpt2_lm, logits_loss  # noqa: E402 - after the skip

SIZES = ["--layers", "3", "--dim", "32", "--heads", "2", "--context", "16", "--batch-size", "4", "--microbatches", "2"]


def tiny() -> torch.nn.Module:
    return gpt2_lm(gpt2_config(n_positions=16, n_embd=32, n_layer=3, n_head=2))()


def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def profile():  # type: ignore[no-untyped-def]
    x = tokens()
    return profile_model(tiny, x[:, :-1], x[:, 1:], logits_loss, split="traced", repeats=1, warmup=0)


def test_the_layers_are_the_ends_and_each_block(profile) -> None:  # type: ignore[no-untyped-def]
    names = [layer.name for layer in profile.layers]
    blocks = [f"transformer.h.{i}" for i in range(3)]
    assert names == ["before transformer.h", *blocks, "after transformer.h"]
    assert (profile.split, profile.first, profile.last) == ("traced", True, True)
    assert profile.fingerprint == traced_fingerprint(tiny)
    embeddings, head = profile.layers[0], profile.layers[-1]
    # The head's weight is the token embedding's (tied): each end holds it, as each end's rank does.
    assert head.parameters == 256 * 32 + 2 * 32 and embeddings.parameters == 256 * 32 + 16 * 32
    assert all(layer.forward > 0 and layer.whole > 0 and layer.step > 0 for layer in profile.layers)
    assert all(layer.backward > 0 and layer.weight > 0 for layer in profile.layers[1:])
    assert embeddings.backward == 0  # the first stage has no input gradient: its backward is all W
    assert head.recompute_bytes > 0 and head.output_bytes == 0  # what the loss saves stays under recompute


@pytest.mark.timeout(120)
@pytest.mark.parametrize("counts", [(2, 1), (0, 3), (3, 0)])
def test_layer_memory_covers_what_a_stage_keeps(profile, counts: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    """Summed per layer, a stage's bytes are what its forward keeps, or up to 1 % more: a value several layers
    read without a gradient (the attention mask) counts once per layer that keeps it."""
    plan = _with_counts(make_plan(profile, PipelineSpec("1f1b", 2, 2)), counts)
    x = tokens()
    split = split_with_plan(tiny, plan, example_args=(x[:, :-1],))
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            pipe = Pipeline(split, PipelineSpec("looped-bfs", 1, 1, virtual=2), loss_fn=logits_loss)
            pipe.track_memory = True
            pipe.step(x[:, :-1], x[:, 1:])
            kept = [pipe.stages[s].peak_held_bytes for s in range(2)]
        finally:
            dist.destroy_process_group()
    costs = stage_costs(profile, counts)
    for s in range(2):
        predicted = costs.of(s).activation_bytes
        assert kept[s] <= predicted <= 1.01 * kept[s], (s, kept[s], predicted)


def test_a_plan_cuts_the_traced_model_where_it_says(profile) -> None:  # type: ignore[no-untyped-def]
    plan = _with_counts(make_plan(profile, PipelineSpec("zbv", 2, 4)), (0, 1, 2, 0))
    assert plan.split == "traced"
    x = tokens()
    split = split_with_plan(tiny, plan, example_args=(x[:, :-1],))
    held = [split.parameter_names(s) for s in range(4)]
    assert all(name.startswith("transformer.w") for name in held[0])
    assert {name.split(".")[2] for name in held[1]} == {"0"} and {name.split(".")[2] for name in held[2]} == {"1", "2"}
    assert "lm_head.weight" in held[3]
    with pytest.raises(ValueError, match="example_args"):
        split_with_plan(tiny, plan)
    other = gpt2_lm(gpt2_config(n_positions=16, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match="this plan is for the model with fingerprint"):
        split_with_plan(other, plan, example_args=(x[:, :-1],))


@pytest.mark.timeout(180)
def test_plan_and_train_gpt2_with_it(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    argv = ["plan", "--model", "gpt2", *SIZES, "--profile", str(tmp_path / "profile.json"), "--out", str(out)]
    assert main([*argv, "--repeats", "1"]) == 0
    printed = capfd.readouterr().out
    assert "before transformer.h" in printed and "after transformer.h" in printed
    assert "--model gpt2" in printed.split("train with it:")[1]
    assert Plan.load(out).split == "traced"
    train = ["train", "--model", "gpt2", *SIZES, "--plan", str(out), "--steps", "2", "--no-progress"]
    assert main([*train, "--timeout-s", "100"]) == 0
    assert "loss " in capfd.readouterr().out
    with pytest.raises(ValueError, match="cut traced, but --model gpt is cut manual"):
        TrainConfig(plan=str(out), layers=3, dim=32, heads=2, context=16, batch_size=4, microbatches=2)
    with pytest.raises(ValueError, match="fingerprint"):
        TrainConfig(model="gpt2", plan=str(out), layers=3, dim=64, heads=2, context=16, batch_size=4, microbatches=2)


def test_a_traced_model_with_nothing_around_its_blocks_is_refused_by_name() -> None:
    def blocks_only() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))

    x, y = torch.randn(4, 8), torch.randn(4, 4)
    with pytest.raises(ValueError, match="the nodes before the blocks, each block and the nodes after it"):
        profile_model(blocks_only, x, y, torch.nn.functional.mse_loss, split="traced", repeats=1, warmup=0)


def _with_counts(plan: Plan, counts: tuple[int, ...]) -> Plan:
    import dataclasses

    return dataclasses.replace(plan, layers_per_stage=counts)

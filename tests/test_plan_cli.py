"""`conveyor plan` on a tiny GPT: profile, plan file, reuse, search, and training with the plan; bad input."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

from conveyor.cli import main
from conveyor.models import GPT, GPTConfig, lm_loss
from conveyor.observe.profile import saved_activation_bytes
from conveyor.plan import Plan, profile_model, read_profiles, split_with_plan, stage_costs
from conveyor.plan.profiles import store_profile
from conveyor.train import TrainConfig

TINY = ["--layers", "2", "--dim", "32", "--heads", "2", "--context", "16", "--batch-size", "4", "--microbatches", "2"]


def plan_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["plan", *TINY, "--profile", str(tmp_path / "profile.json"), "--out", str(tmp_path / "plan.json"), *extra]


@pytest.mark.timeout(120)  # it measures what a message costs between 2 spawned ranks
def test_plan_prints_stages_writes_a_plan_and_reuses_its_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(plan_argv(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "profile of micro-batches of 2 x 16 tokens: measured" in out
    assert "stage  rank  layers" in out and "tok_emb+pos_emb" in out and "norm+head" in out
    assert "predicted step" in out and "(synchronous" in out and "period" in out
    plan = Plan.load(tmp_path / "plan.json")
    assert (plan.spec.schedule, plan.spec.ranks, plan.spec.microbatches, plan.microbatch_size) == ("1f1b", 2, 2, 2)
    assert sum(plan.layers_per_stage) == 2 and len(plan.stages) == 2
    assert f"conveyor train --plan {tmp_path / 'plan.json'}" in out
    assert main(plan_argv(tmp_path, "--method", "uniform")) == 0
    again = capsys.readouterr().out
    assert "tokens: reused" in again
    assert Plan.load(tmp_path / "plan.json").layers_per_stage == (1, 1)


@pytest.mark.timeout(120)
def test_plan_charges_what_a_message_costs_measured_once_and_kept_with_the_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(plan_argv(tmp_path, "--method", "uniform", "--no-transfers")) == 0
    assert "take no time in this prediction (--no-transfers)" in capsys.readouterr().out
    free = Plan.load(tmp_path / "plan.json")
    assert free.transfers is None
    assert read_profiles(tmp_path / "profile.json")[0].transfers is None
    # The kept profile lacks them: they are measured now, added to it, and charged to the prediction.
    assert main(plan_argv(tmp_path, "--method", "uniform")) == 0
    out = capsys.readouterr().out
    assert "tokens: reused" in out and "a send busies its rank" in out
    charged = Plan.load(tmp_path / "plan.json")
    assert charged.transfers is not None and min(charged.transfers.send, charged.transfers.recv) > 0
    assert charged.transfers.latency > 0 and charged.transfers.nbytes > 0
    assert charged.transfers.late_recv is not None and charged.transfers.late_recv > 0
    assert "after its message arrived" in out
    (kept,) = read_profiles(tmp_path / "profile.json")
    assert kept.transfers == charged.transfers
    # 1f1b on 2 ranks has sends and receive posts on its critical path.
    assert charged.step_time > free.step_time
    assert main(plan_argv(tmp_path, "--method", "uniform")) == 0
    assert Plan.load(tmp_path / "plan.json").transfers == charged.transfers  # reused, not measured again
    # A profile kept before late posts were measured has them measured too.
    store_profile(
        tmp_path / "profile.json",
        dataclasses.replace(kept, transfers=dataclasses.replace(charged.transfers, late_recv=None)),
    )
    assert main(plan_argv(tmp_path, "--method", "uniform")) == 0
    remeasured = Plan.load(tmp_path / "plan.json").transfers
    assert remeasured is not None and remeasured.late_recv is not None and remeasured != charged.transfers


@pytest.mark.timeout(180)  # the slowdown's partner is a spawned process
def test_plan_scales_its_prediction_by_the_slowdown_only_when_asked_and_keeps_it_with_the_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uniform = ("--method", "uniform", "--no-transfers")  # without messages, a step is all computes
    assert main(plan_argv(tmp_path, *uniform)) == 0
    assert "slower in a pipeline's rank" not in capsys.readouterr().out
    assert read_profiles(tmp_path / "profile.json")[0].slowdown is None
    # The kept profile lacks it: the layers are profiled again, with it.
    assert main(plan_argv(tmp_path, *uniform, "--slowdown")) == 0
    out = capsys.readouterr().out
    assert "tokens: measured" in out and "slower in a pipeline's rank than alone (predictions scaled)" in out
    (kept,) = read_profiles(tmp_path / "profile.json")
    assert kept.slowdown is not None and kept.slowdown > 0
    scaled = Plan.load(tmp_path / "plan.json").step_time
    # Not asked: the same kept profile predicts unscaled, and keeps its factor for the next run that asks.
    assert main(plan_argv(tmp_path, *uniform)) == 0
    out = capsys.readouterr().out
    assert "tokens: reused" in out and "slower in a pipeline's rank" not in out
    unscaled = Plan.load(tmp_path / "plan.json").step_time
    assert read_profiles(tmp_path / "profile.json")[0].slowdown == kept.slowdown
    assert scaled == pytest.approx(unscaled * kept.slowdown, rel=1e-9)


def test_the_slowdown_is_refused_for_a_traced_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(plan_argv(tmp_path, "--model", "gpt2", "--slowdown"))
    assert "--slowdown is measured for a manual split's layers only" in capsys.readouterr().err


def test_search_ranks_configurations_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = plan_argv(tmp_path, "--search", "--microbatch-counts", "2,4", "--top", "3", "--no-transfers")
    assert main(argv) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("#"))
    for column in ("schedule", "recompute", "blocks per stage", "step (sync)", "bubble", "peak/rank"):
        assert column in header
    ranking = out.split("configurations ranked")[0].splitlines()
    rows = [line for line in ranking if line[:2] in ("1 ", "2 ", "3 ")]
    assert len(rows) == 3
    times = [float(row.split(" ms")[0].split()[-1]) for row in rows]
    assert times == sorted(times)
    best = Plan.load(tmp_path / "plan.json")
    assert f"{best.step_time * 1e3:.1f} ms" in rows[0]
    profiles = json.loads((tmp_path / "profile.json").read_text())["profiles"]
    assert sorted(p["microbatch_size"] for p in profiles) == [1, 2]  # one profile per micro-batch size


def test_a_cap_nothing_fits_says_the_smallest_that_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(plan_argv(tmp_path, "--memory", "1KiB", "--no-transfers"))
    err = capsys.readouterr().err
    assert "fits in 1,024 bytes" in err and "the smallest peak is" in err and "layers per stage" in err


def test_more_stages_than_layers_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(plan_argv(tmp_path, "--ranks", "5", "--no-transfers"))  # 4 layers: the embeddings, 2 blocks, the head
    assert "5 stages need at least 5 layers to own; the model has 4" in capsys.readouterr().err


def test_a_negative_profile_time_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(plan_argv(tmp_path, "--profile-seconds", "-1", "--no-transfers"))
    assert "--profile-seconds must be at least 0; got -1.0" in capsys.readouterr().err


def test_a_plan_for_another_model_or_other_settings_is_refused(tmp_path: Path) -> None:
    assert main(plan_argv(tmp_path, "--no-transfers")) == 0
    path = str(tmp_path / "plan.json")
    sizes = {"dim": 32, "heads": 2, "context": 16, "batch_size": 4, "microbatches": 2}
    TrainConfig(plan=path, layers=2, **sizes)  # the model it was made for
    with pytest.raises(ValueError, match="this plan is for the model with fingerprint"):
        TrainConfig(plan=path, layers=3, **sizes)
    with pytest.raises(ValueError, match="use --schedule 1f1b"):
        TrainConfig(plan=path, layers=2, schedule="gpipe", **sizes)
    with pytest.raises(ValueError, match="use --batch-size 4"):
        TrainConfig(plan=path, layers=2, **{**sizes, "batch_size": 8})
    with pytest.raises(ValueError, match="fingerprint"):
        split_with_plan(lambda: GPT(GPTConfig(layers=2, dim=64, heads=2, context=16)), path)


@pytest.mark.timeout(120)
def test_train_with_a_plan(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(plan_argv(tmp_path, "--no-transfers")) == 0
    argv = [
        "train",
        *TINY,
        "--plan",
        str(tmp_path / "plan.json"),
        "--steps",
        "3",
        "--no-progress",
        "--timeout-s",
        "100",
    ]
    assert main(argv) == 0
    assert "loss " in capfd.readouterr().out


def test_a_profile_times_its_layers_for_as_long_as_asked() -> None:
    config = GPTConfig(layers=1, dim=32, heads=2, context=16)
    tokens = torch.randint(0, config.vocab_size, (2, 17))
    start = time.perf_counter()
    profile_model(lambda: GPT(config), tokens[:, :-1], tokens[:, 1:], lm_loss, repeats=1, warmup=0, min_seconds=0.5)
    assert time.perf_counter() - start >= 0.5


def test_layer_memory_adds_up_to_what_a_stage_keeps() -> None:
    """The per-layer bytes summed into a stage equal what the stage's own forward keeps alive."""
    torch.manual_seed(0)
    config = GPTConfig(layers=3, dim=32, heads=2, context=16)
    tokens = torch.randint(0, config.vocab_size, (2, 17))
    profile = profile_model(lambda: GPT(config), tokens[:, :-1], tokens[:, 1:], lm_loss, repeats=1, warmup=0)
    split = split_with_plan_counts(config, (2, 1))
    first, second = (split.build_stage(s) for s in range(2))
    costs = stage_costs(profile, (2, 1))
    kept_first = saved_activation_bytes(first, tokens[:, :-1])
    with torch.no_grad():
        hidden = first(tokens[:, :-1])
    kept_second = saved_activation_bytes(second, hidden.requires_grad_(), tokens[:, 1:], lm_loss)
    assert costs.of(0).activation_bytes == kept_first
    assert costs.of(1).activation_bytes == kept_second


def split_with_plan_counts(config: GPTConfig, counts: tuple[int, ...]):  # type: ignore[no-untyped-def]
    from conveyor import manual_split

    return manual_split(lambda: GPT(config), len(counts), counts)

"""`conveyor train` end to end on spawned ranks: the loss falls, and --trace writes a Chrome trace and a timeline."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conveyor.cli import main
from conveyor.train import PRESETS, TrainConfig, read_config


@pytest.mark.timeout(240)
def test_train_lowers_the_loss_and_traces(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    trace = tmp_path / "trace"
    argv = [
        "train",
        "--steps",
        "12",
        "--dim",
        "64",
        "--layers",
        "2",
        "--heads",
        "2",
        "--context",
        "32",
        "--batch-size",
        "8",
        "--microbatches",
        "4",
        "--lr",
        "3e-3",
        "--no-progress",
        "--trace",
        str(trace),
        "--timeout-s",
        "200",
    ]
    assert main(argv) == 0
    out = capfd.readouterr().out  # the ranks are other processes: read their file descriptors
    line = next(line for line in out.splitlines() if line.startswith("loss "))
    first, last = (float(word) for word in line.split()[1:4:2])
    assert last < first, line

    events = json.loads((trace / "trace.json").read_text())["traceEvents"]
    work = [e for e in events if e.get("ph") == "X"]
    assert {e["pid"] for e in work} == {0, 1}
    assert {e["cat"] for e in work} >= {"F", "B"}
    for rank in (0, 1):  # every traced step runs each micro-batch's F and B once per rank
        steps = {e["args"]["step"] for e in work if e["pid"] == rank}
        forwards = [e for e in work if e["pid"] == rank and e["cat"] == "F"]
        assert len(forwards) == 4 * len(steps)
    assert all(e["dur"] >= 0 for e in work)
    assert (trace / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_refuses_a_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--schedule", "zbv", "--virtual", "3"])
    assert "zbv runs 2 stages per rank; got 3" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_train_gpt2_traced_into_four_stages_lowers_the_loss(capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    argv = ["train", "--model", "gpt2", "--ranks", "2", "--schedule", "zbv", "--steps", "10", "--dim", "32"]
    argv += ["--layers", "4", "--heads", "2", "--context", "32", "--batch-size", "8", "--lr", "3e-3", "--no-progress"]
    assert main(argv) == 0
    out = capfd.readouterr().out
    assert "model=gpt2" in out
    line = next(line for line in out.splitlines() if line.startswith("loss "))
    first, last = (float(word) for word in line.split()[1:4:2])
    assert last < first, line


def test_train_checks_the_gpt2_config_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(SystemExit):
        main(["train", "--model", "gpt2", "--model-config", "n_layers=2"])
    assert "GPT2Config has no field 'n_layers'; did you mean ['n_layer']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model-config", "n_layer=2"])
    assert "--model-config sets GPT-2 fields: use it with --model gpt2" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_train_pipedream_streams_and_reports_its_weight_versions(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--schedule", "pipedream", "--steps", "10", "--dim", "32", "--layers", "2", "--heads", "2"]
    argv += ["--context", "32", "--batch-size", "8", "--lr", "3e-3", "--no-progress", "--vertical-sync"]
    argv += ["--warmup-steps", "3", "--lr-decay", "cosine", "--metrics", str(tmp_path / "metrics.csv")]
    assert main(argv) == 0
    out = capfd.readouterr().out
    # The stream's updates follow the warm-up and the decay (the rates the ranks set are checked against a
    # single-process run in test_pipedream_distributed.py).
    rates = [float(row["lr"]) for row in csv.DictReader((tmp_path / "metrics.csv").open())]
    expected = [TrainConfig(lr=3e-3, warmup_steps=3, lr_decay="cosine", steps=10).learning_rate(s) for s in range(10)]
    assert rates == pytest.approx(expected, rel=1e-6), rates
    # Two ranks of one stage each; with vertical sync both keep the first stage's version of 2 in-flight micro-batches.
    assert "weight versions held at most: stage 0 2 (" in out and ", stage 1 2 (" in out, out
    line = next(line for line in out.splitlines() if line.startswith("loss "))
    first, last = (float(word) for word in line.split()[1:4:2])
    assert last < first, line


def test_train_refuses_asynchronous_options_for_synchronous_schedules(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--schedule", "1f1b", "--vertical-sync"])
    assert "--vertical-sync and --no-weight-stashing are for pipedream and pipedream-2bw" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--schedule", "pipedream", "--batch-size", "10", "--microbatches", "4"])
    assert "the batch size (10) must be a multiple of the micro-batches (4)" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_train_a_replicated_first_stage(capfd: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--schedule", "pipedream", "--ranks", "3", "--replicas", "2,1", "--steps", "10", "--dim", "32"]
    argv += ["--layers", "2", "--heads", "2", "--context", "32", "--batch-size", "8", "--lr", "3e-3", "--no-progress"]
    assert main(argv) == 0
    out = capfd.readouterr().out
    # Each replica of stage 0 has NOAM = ceil(3 / 2) = 2 micro-batches in flight: its live version and one more.
    assert "ranks=3, replicas=2,1, schedule=pipedream" in out and "held at most: stage 0 2 (" in out, out
    line = next(line for line in out.splitlines() if line.startswith("loss "))
    first, last = (float(word) for word in line.split()[1:4:2])
    assert last < first, line


def test_train_checks_replicas_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, error in [
        (["--replicas", "2,1"], "--replicas 2,1 holds 3 ranks: use --ranks 3"),
        (["--replicas", "2,1", "--ranks", "3", "--schedule", "zbv"], "--replicas 2,1 needs a schedule that replicates"),
        (["--replicas", "2,x"], "--replicas takes ranks per stage, e.g. 2,1; got '2,x'"),
    ]:
        with pytest.raises(SystemExit):
            main(["train", *argv])
        assert error in capsys.readouterr().err, argv


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--heads", "0"], "--heads must be at least 1; got 0"),
        (["--dim", "0"], "--dim must be at least 1; got 0"),
        (["--dim", "30", "--heads", "4"], "--dim 30 must be a multiple of --heads 4"),
        (["--timeout-s", "-1"], "--timeout-s must be a positive number of seconds; got -1.0"),
        (["--lr", "0"], "--lr must be positive; got 0.0"),
        (["--device", "tpu"], "--device must be cpu or cuda; got 'tpu'"),
    ],
)
def test_every_train_flag_is_checked_before_any_rank_starts(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["train", *argv])
    assert error in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_train_on_cuda_without_a_gpu_fails_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--device", "cuda"])
    assert "--device cuda: this machine has no CUDA GPU" in capsys.readouterr().err


def test_pictures_without_matplotlib_name_the_extra_before_any_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit):
        main(["train", "--trace", str(tmp_path / "t")])
    assert "--trace draws its timeline with matplotlib: pip install 'conveyor[plot]'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "4", "--plot", "x.png"])
    assert "--plot draws with matplotlib: pip install 'conveyor[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


@pytest.mark.timeout(120)
def test_train_with_its_progress_bar_leaves_no_leaked_resource() -> None:
    small = ["--steps", "2", "--dim", "32", "--layers", "2", "--heads", "2", "--context", "16", "--batch-size", "4"]
    done = subprocess.run(
        [sys.executable, "-m", "conveyor", "train", *small], capture_output=True, text=True, timeout=100
    )
    assert done.returncode == 0, done.stderr
    assert "train: 100%" in done.stderr, "the progress bar should have been drawn"
    assert "leaked" not in done.stderr and "resource_tracker" not in done.stderr, done.stderr[-2000:]


def test_the_learning_rate_warms_up_then_follows_a_cosine_to_its_floor() -> None:
    config = TrainConfig(steps=10, warmup_steps=2, lr_decay="cosine", lr=1.0, min_lr=0.1)
    rates = [config.learning_rate(step) for step in range(10)]
    assert rates[:3] == [0.5, 1.0, 1.0] and rates[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(rates[2:], rates[3:], strict=False)), rates  # falls after the warm-up
    assert rates[2 + 7 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7)))
    assert TrainConfig(lr=0.3).learning_rate(5) == 0.3


@pytest.mark.timeout(240)
def test_train_writes_metrics_evaluates_and_clips(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    metrics = tmp_path / "metrics.csv"
    argv = ["train", "--steps", "6", "--dim", "32", "--layers", "2", "--heads", "2", "--context", "32"]
    argv += ["--batch-size", "8", "--no-progress", "--eval-every", "3", "--metrics", str(metrics)]
    argv += ["--warmup-steps", "2", "--lr-decay", "cosine", "--clip-grad-norm", "0.5"]
    board = tmp_path / "board"
    has_board = importlib.util.find_spec("tensorboard") is not None  # the [tensorboard] extra, which CI installs
    assert main([*argv, *(["--tensorboard", str(board)] if has_board else [])]) == 0
    out = capfd.readouterr().out
    rows = list(csv.DictReader(metrics.open()))
    if has_board:  # TensorBoard holds the CSV's values
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(board))
        events.Reload()
        for name in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mib"):
            logged = [(e.step, e.value) for e in events.Scalars(name)]
            assert logged == [(int(r["step"]), pytest.approx(float(r[name]))) for r in rows], name
        assert [e.step for e in events.Scalars("eval_loss")] == [3, 6]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["eval_loss"] != "" for r in rows] == [False, False, True, False, False, True]
    config = TrainConfig(steps=6, warmup_steps=2, lr_decay="cosine")
    assert [float(r["lr"]) for r in rows] == pytest.approx([config.learning_rate(k) for k in range(6)])
    assert all(float(r["grad_norm"]) > 0.5 for r in rows), "the norm before clipping: above the cap here"
    assert all(float(r["peak_mib"]) > 0 for r in rows)
    line = next(line for line in out.splitlines() if line.startswith("held-out loss "))
    assert f"{float(rows[2]['eval_loss']):.4f} (step 3)" in line and "(step 6)" in line, line
    assert "peak memory per rank" in out
    # The CSV's losses are the ones the run reports, and its rate counts the steps after the first.
    summary = next(line for line in out.splitlines() if line.startswith("loss "))
    assert summary.startswith(f"loss {float(rows[0]['loss']):.4f} -> {float(rows[-1]['loss']):.4f}"), summary
    assert float(rows[0]["tokens_per_s"]) == 0 and all(float(r["tokens_per_s"]) > 0 for r in rows[1:])


def test_async_schedules_refuse_gradient_clipping(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--schedule", "pipedream", "--clip-grad-norm", "1"])
    assert "--clip-grad-norm is for the synchronous schedules" in capsys.readouterr().err


def test_a_toml_config_sets_defaults_the_flags_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.toml"
    config.write_text('schedule = "zbv"\nbatch-size = 8\nheads = 0\nlr = 1\n')
    assert read_config(config) == {"schedule": "zbv", "batch_size": 8, "heads": 0, "lr": 1.0}
    with pytest.raises(SystemExit):  # the file's heads = 0 is checked like a flag
        main(["train", "--config", str(config)])
    assert "--heads must be at least 1; got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a flag wins over the file: now --virtual is what is wrong
        main(["train", "--config", str(config), "--heads", "2", "--virtual", "3"])
    assert "zbv runs 2 stages per rank; got 3" in capsys.readouterr().err
    for text, error in [
        ("batchsize = 8", "there is no setting 'batchsize'; did you mean 'batch_size'?"),
        ('steps = "ten"', "steps must be a int; got 'ten'"),
        ("stages = 2", "there is no setting 'stages'; did you mean 'ranks'?"),
    ]:
        config.write_text(text)
        with pytest.raises(SystemExit):
            main(["train", "--config", str(config)])
        assert error in capsys.readouterr().err


def test_every_preset_is_a_valid_config_of_the_model_it_names() -> None:
    assert sorted(p.stem for p in PRESETS.glob("*.toml")) == ["gpt-small", "gpt2-124m"]
    assert TrainConfig(**read_config("gpt-small")) == TrainConfig(), "gpt-small is the default, written out"
    if importlib.util.find_spec("transformers") is None:
        return
    from conveyor.models.gpt2 import gpt2_lm

    config = TrainConfig(**read_config("gpt2-124m"))  # raises on a bad preset
    assert (config.layers, config.dim, config.heads, config.ranks) == (12, 768, 12, 4)
    with torch.device("meta"):
        params = sum(p.numel() for p in gpt2_lm(config.source.hf_config())().parameters())
    # GPT-2 small's blocks (7,087,872 parameters each), a 256-byte vocabulary, 128 positions, the final norm.
    assert params == 12 * 7_087_872 + 256 * 768 + 128 * 768 + 2 * 768 == 85_350_912


@pytest.mark.timeout(300)
def test_train_data_parallel_equals_one_pipeline(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """--ranks 4 --dp 2 (two 2-rank pipelines, half the micro-batches each) trains as --ranks 2 does."""
    argv = ["train", "--steps", "4", "--dim", "32", "--layers", "2", "--heads", "2", "--context", "32"]
    argv += ["--batch-size", "8", "--microbatches", "4", "--clip-grad-norm", "0.5", "--no-progress"]
    losses = {}
    for name, extra in (("pp", ["--ranks", "2"]), ("pp x dp", ["--ranks", "4", "--dp", "2"])):
        metrics = tmp_path / f"{name}.csv"
        assert main([*argv, *extra, "--metrics", str(metrics)]) == 0
        losses[name] = [float(row["loss"]) for row in csv.DictReader(metrics.open())]
    assert "ranks=4, dp=2" in capfd.readouterr().out
    assert len(losses["pp"]) == 4
    for step, (one, two) in enumerate(zip(losses["pp"], losses["pp x dp"], strict=True)):
        assert abs(one - two) <= 1e-5 * abs(one), f"step {step}: --dp 2 loss {two} != {one}"


def test_train_checks_dp_and_precision_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, error in [
        (["--ranks", "3", "--dp", "2"], "--dp 2 does not divide --ranks 3"),
        (["--ranks", "4", "--dp", "2", "--schedule", "zbv"], "--dp 2 runs under gpipe and 1f1b"),
        (["--ranks", "4", "--dp", "2", "--replicas", "2,2"], "give one of them"),
        (["--ranks", "4", "--dp", "4", "--microbatches", "2"], "use at least 4"),
        (["--dp", "0"], "--dp must be at least 1; got 0"),
        (["--precision", "fp8"], "--precision must be one of fp32, bf16, fp16; got 'fp8'"),
        (["--precision", "fp16", "--schedule", "pipedream"], "--precision fp16 steps or skips once per mini-batch"),
    ]:
        with pytest.raises(SystemExit):
            main(["train", *argv])
        assert error in capsys.readouterr().err, argv


# The command line a user's scripts call: a flag renamed or dropped must be a decision, made here too.
TRAIN_FLAGS = """
--config --model --data --model-config --ranks --schedule --virtual --replicas --dp --recompute --offload
--precision --vertical-sync --no-weight-stashing --microbatches --steps --batch-size --context --dim --layers
--heads --lr --warmup-steps --lr-decay --min-lr --clip-grad-norm --eval-every --eval-batches --metrics
--tensorboard --device --seed --threads --timeout-s --watchdog-s --max-restarts --trace --trace-steps
--no-progress --checkpoint-dir --checkpoint-every --keep-checkpoints --async-checkpoints --resume --plan
""".split()


def test_the_train_command_line_is_the_one_users_know(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    listed = re.findall(r"^  (--[a-z0-9-]+)", capsys.readouterr().out, flags=re.MULTILINE)
    assert [flag for flag in listed if flag != "--help"] == TRAIN_FLAGS

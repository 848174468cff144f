"""Checkpoints: exact resume, other ranks and stages, the unsplit model, a save killed halfway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from faults import checkpoint_tensors

from conveyor import checkpoint
from conveyor.cli import main
from conveyor.data.batches import Batches, decode_state
from conveyor.losses import causal_lm
from conveyor.models import GPT, GPTConfig
from conveyor.train import TrainConfig, sequences

SMALL = ["--dim", "32", "--layers", "4", "--heads", "2", "--context", "32", "--batch-size", "8", "--no-progress"]


def _train(capfd: pytest.CaptureFixture[str], *argv: str) -> list[float]:
    """Run `conveyor train` and return the loss it printed for its last step."""
    assert main(["train", *SMALL, *argv]) == 0
    out = capfd.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("loss "))
    return [float(word) for word in line.split()[1:4:2]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["1f1b", "pipedream", "1f1b fp16"])
def test_resuming_continues_exactly(tmp_path: Path, capfd: pytest.CaptureFixture[str], schedule: str) -> None:
    """6 steps with a checkpoint every 3 equal 3 steps, stop, resume, 3 more: bit for bit (fp32, CPU; and fp16
    autocast, whose loss scale the checkpoint keeps)."""
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    name, *precision = schedule.split()
    plan = ["--schedule", name, "--checkpoint-every", "3", *(["--precision", "fp16"] if precision else [])]
    _, last_whole = _train(capfd, "--steps", "6", "--checkpoint-dir", str(whole), *plan)
    _train(capfd, "--steps", "3", "--checkpoint-dir", str(halves), *plan)
    _, last_resumed = _train(capfd, "--steps", "6", "--checkpoint-dir", str(halves), "--resume", *plan)
    assert last_resumed == last_whole
    one, other = checkpoint_tensors(whole / "step-6"), checkpoint_tensors(halves / "step-6")
    assert one.keys() == other.keys()
    assert any(k.startswith("optim.") for k in one) and any(k.startswith("model.") for k in one)
    for key in one:
        assert torch.equal(one[key], other[key]), f"{schedule}: {key} differs after resuming"
    assert [p.name for p in checkpoint.checkpoints(whole)] == ["step-3", "step-6"]


@pytest.mark.timeout(300)
def test_asynchronous_checkpoints_equal_synchronous_ones(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """--async-checkpoints writes while the next steps train: each checkpoint still holds its own step's state."""
    plan = ["--steps", "6", "--checkpoint-every", "2"]
    _train(capfd, *plan, "--checkpoint-dir", str(tmp_path / "sync"))
    _train(capfd, *plan, "--checkpoint-dir", str(tmp_path / "async"), "--async-checkpoints")
    names = [p.name for p in checkpoint.checkpoints(tmp_path / "async")]
    assert names == ["step-2", "step-4", "step-6"] and not list((tmp_path / "async").glob("*.partial"))
    for name in names:
        one, other = checkpoint_tensors(tmp_path / "sync" / name), checkpoint_tensors(tmp_path / "async" / name)
        assert one.keys() == other.keys()
        for key in one:
            assert torch.equal(one[key], other[key]), f"{name}: {key} differs when written asynchronously"


@pytest.mark.timeout(300)
def test_a_checkpoint_loads_with_other_stages_and_into_the_unsplit_model(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "ck"
    _train(capfd, "--steps", "3", "--checkpoint-dir", str(saved))  # 2 ranks, 2 stages, 1f1b
    # The next step's loss (taken before its update) on the weights of step 3, three ways.
    _, on_two = _train(capfd, "--steps", "4", "--checkpoint-dir", str(saved), "--resume")
    (saved / "step-4").rename(tmp_path / "step-4-of-two")
    _, on_four = _train(capfd, "--steps", "4", "--checkpoint-dir", str(saved), "--resume", "--schedule", "zbv")
    model = GPT(GPTConfig(context=32, dim=32, layers=4, heads=2))
    checkpoint.load_model(model, saved / "step-3")
    config = TrainConfig(dim=32, layers=4, heads=2, context=32, batch_size=8)
    batches = Batches(sequences(config, config.source)[0], 8, seed=0)
    batches.load_state_dict(decode_state((saved / "step-3" / "data-state.json").read_text()))
    x, y = next(batches)
    with torch.no_grad():
        unsplit = causal_lm(model(x), y).item()
    # The printed losses have 4 decimals; the unsplit model's must round to the same.
    assert on_two == on_four == round(unsplit, 4), (on_two, on_four, unsplit)
    # `conveyor export` writes the unsplit model's state_dict.
    assert main(["export", str(saved / "step-3"), "--out", str(tmp_path / "model.pt")]) == 0
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert exported.keys() == model.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    # A checkpoint of another model names the first tensor that does not fit.
    wider = GPT(GPTConfig(context=32, dim=64, layers=4, heads=2))
    with pytest.raises(ValueError, match=r"holds model\.\S+ of shape \[\d+(, \d+)*\], but this model's is"):
        checkpoint.load_model(wider, saved / "step-3")
    assert json.loads((saved / "step-3" / "conveyor-train.json").read_text())["dim"] == 32
    # A save killed before its rename leaves a partial folder, which is never taken for the latest.
    killed = saved / "step-9.partial"
    killed.mkdir()
    (killed / "__0_0.distcp").write_bytes(b"half")
    assert checkpoint.latest(saved) == saved / "step-4"


def test_checkpoint_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--resume", "--checkpoint-dir", str(tmp_path)])
    assert f"--resume: no complete checkpoint in {tmp_path}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--resume"])
    assert "--resume, --checkpoint-every and --async-checkpoints need --checkpoint-dir" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_a_truncated_shard_is_named_as_what_it_is(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A truncated shard once ended as "process 1 terminated with exit code 1" (DCP's CheckpointException is a
    BaseException, which torch.multiprocessing does not record): now verification names the file before DCP
    reads it, and the launcher reports that error (a BaseException of a rank is recorded too: test_launch)."""
    _train(capfd, "--steps", "2", "--checkpoint-dir", str(tmp_path))
    shard = tmp_path / "step-2" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert main(["train", *SMALL, "--steps", "3", "--checkpoint-dir", str(tmp_path), "--resume"]) == 1
    err = capfd.readouterr().err
    assert "conveyor train failed:" in err and "terminated with the following" in err
    assert "__1_0.distcp" in err and "truncated" in err and "none of which verifies" in err, err[-2000:]
    assert "exit code 1" not in err

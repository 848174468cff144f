"""Runs that last: `conveyor train` is stopped by no deadline while it makes progress, and restarts after a
failure (under its own launcher and under torchrun) end exactly as a run nothing interrupted."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from faults import checkpoint_tensors

from conveyor.cli import main
from conveyor.metrics import MetricsWriter

# Steps of about 20 ms here: the 20 steps after the step-10 checkpoint leave time to kill a rank.
MODEL = ["--dim", "64", "--layers", "2", "--heads", "2", "--context", "64", "--batch-size", "8", "--no-progress"]
RUN = [*MODEL, "--steps", "30", "--checkpoint-every", "10", "--timeout-s", "60"]


def _final_loss(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("loss ")).split()[3]


def _steps_trained(out: str) -> int:
    """How many steps the attempt that finished trained (after the restart: those after its checkpoint)."""
    line = next(line for line in out.splitlines() if line.startswith("loss "))
    return int(line.split(" steps in ")[0].split()[-1])


def _losses(path: Path) -> list[tuple[str, str]]:
    return [(row["step"], row["loss"]) for row in csv.DictReader(path.open())]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """The run without faults: its final loss (as printed), its checkpoints and its metrics."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    metrics = folder / "metrics.csv"
    run = [sys.executable, "-m", "conveyor", "train", *RUN, "--checkpoint-dir", str(folder / "ck")]
    done = subprocess.run([*run, "--metrics", str(metrics)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return _final_loss(done.stdout), folder / "ck", metrics


def _kill_a_rank_after(
    launch: list[str], checkpoint_dir: Path, is_rank: Callable[[str], bool], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Start `launch`, SIGKILL one of its ranks (children whose command line `is_rank`) once the step-10
    checkpoint exists, and wait for it to end."""
    process = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (checkpoint_dir / "step-10").is_dir():
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its step-10 checkpoint"
            time.sleep(0.01)
        ranks = [pid for pid in _children(process.pid) if is_rank(_command_line(pid))]
        assert ranks, "found no rank to kill"
        os.kill(ranks[-1], signal.SIGKILL)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    return subprocess.CompletedProcess(launch, process.returncode, out, err)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _same_checkpoints(one: Path, other: Path) -> None:
    first, second = checkpoint_tensors(one), checkpoint_tensors(other)
    assert first.keys() == second.keys()
    assert any(k.startswith("model.") for k in first) and any(k.startswith("optim.") for k in first)
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs from the uninterrupted run's"


@pytest.mark.timeout(120)
def test_a_run_that_makes_progress_outlives_its_wait_timeout(capfd: pytest.CaptureFixture[str]) -> None:
    """--timeout-s bounds each wait for a peer, not the run (it was a deadline on the whole run)."""
    started = time.monotonic()
    assert main(["train", *MODEL, "--steps", "400", "--timeout-s", "4"]) == 0
    assert time.monotonic() - started > 4, "the run should last longer than --timeout-s for this test to mean much"
    assert "loss " in capfd.readouterr().out


@pytest.mark.timeout(600)
def test_a_killed_rank_restarts_the_run_from_its_latest_checkpoint_and_it_ends_as_an_uninterrupted_one(
    tmp_path: Path, uninterrupted: tuple[str, Path, Path]
) -> None:
    final_loss, whole, whole_metrics = uninterrupted
    metrics = tmp_path / "metrics.csv"
    launch = [sys.executable, "-m", "conveyor", "train", *RUN, "--checkpoint-dir", str(tmp_path / "ck")]
    launch += ["--max-restarts", "2", "--metrics", str(metrics)]
    done = _kill_a_rank_after(launch, tmp_path / "ck", lambda line: "spawn_main" in line)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "restart 1 of 2 after rank" in done.stderr and "was ended by signal SIGKILL" in done.stderr
    assert "conveyor train: restart 1, from step " in done.stdout
    assert _steps_trained(done.stdout) <= 20, "the restart should resume from a checkpoint, not from step 0"
    assert _final_loss(done.stdout) == final_loss
    _same_checkpoints(whole / "step-30", tmp_path / "ck" / "step-30")
    assert _losses(metrics) == _losses(whole_metrics), "every step's loss once, as without the restart"


@pytest.mark.timeout(600)
def test_torchrun_restarts_resume_from_the_latest_checkpoint(
    tmp_path: Path, uninterrupted: tuple[str, Path, Path]
) -> None:
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on the PATH")
    final_loss, whole, _ = uninterrupted
    launch = ["torchrun", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.2"]
    launch += ["-m", "conveyor", "train", *RUN, "--checkpoint-dir", str(tmp_path / "ck")]
    # The last stage's rank (1) prints the losses; its output must reach us whichever rank dies.
    done = _kill_a_rank_after(launch, tmp_path / "ck", lambda line: "conveyor" in line)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "conveyor train: restart 1, from step " in out
    assert _steps_trained(out) <= 20, "the restart should resume from a checkpoint, not from step 0"
    _same_checkpoints(whole / "step-30", tmp_path / "ck" / "step-30")
    assert _final_loss(out) == final_loss


@pytest.mark.timeout(120)
def test_a_restart_after_the_last_checkpoint_has_nothing_left_to_train(
    tmp_path: Path, uninterrupted: tuple[str, Path, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "ck"
    shutil.copytree(uninterrupted[1], folder)
    assert main(["train", *RUN, "--checkpoint-dir", str(folder), "--resume"]) == 0
    assert "the checkpoint of step 30 is the last; nothing left to train" in capfd.readouterr().out


def test_restarts_refuse_a_folder_of_an_earlier_run_and_torchruns_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "step-20").mkdir()  # an earlier run's checkpoint: a restart must not resume from it
    with pytest.raises(SystemExit):
        main(["train", "--checkpoint-dir", str(tmp_path), "--max-restarts", "1"])
    err = capsys.readouterr().err
    assert f"--checkpoint-dir {tmp_path} holds checkpoints of an earlier run (step-20)" in err and "--resume" in err
    with pytest.raises(SystemExit):
        main(["train", "--watchdog-s", "5", "--timeout-s", "10"])
    assert "--watchdog-s must be above --timeout-s (10)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--max-restarts", "-1"])
    assert "--max-restarts must be 0 or more" in capsys.readouterr().err
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        main(["train", "--max-restarts", "2"])
    assert "under torchrun, restarts are torchrun's: give torchrun --max-restarts N" in capsys.readouterr().err


def test_a_resumed_runs_metrics_keep_the_rows_up_to_its_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    first = MetricsWriter(path, ["step", "loss"])
    for step in range(1, 6):  # the failed attempt got to step 5; its checkpoint is step 3
        first.write(step, {"loss": float(step)})
    first.close()
    resumed = MetricsWriter(path, ["step", "loss"], keep_until=3)
    for step in range(4, 7):
        resumed.write(step, {"loss": step + 0.5})
    resumed.close()
    assert _losses(path) == [("1", "1.0"), ("2", "2.0"), ("3", "3.0"), ("4", "4.5"), ("5", "5.5"), ("6", "6.5")]

"""The launcher: a failing rank stops the others and its error comes back; a hang becomes a TimeoutError."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import mlp, mlp_batch

from conveyor import Pipeline, spawn, split_model
from conveyor.launch import default_backend, under_torchrun


def _rank_one_raises(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.recv(torch.zeros(1), src=1)  # would wait forever for rank 1


@pytest.mark.timeout(60)
def test_a_failing_rank_raises_its_error_instead_of_hanging() -> None:
    started = time.monotonic()
    expected = "(?s)Process 1 terminated.*ValueError: boom from rank 1"
    with pytest.raises(mp.ProcessRaisedException, match=expected) as raised:
        spawn(_rank_one_raises, 2, timeout_s=45)
    assert "_rank_one_raises" in str(raised.value), "the rank's traceback should come back"
    assert time.monotonic() - started < 30, "the failing rank should stop the run long before the deadline"


def _loss_fails_on_the_last_rank(rank: int, world: int) -> None:
    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("loss exploded")

    pipe = Pipeline(split_model(mlp(), rank, world), num_stages=world, num_microbatches=2, loss_fn=loss_fn)
    pipe.step(*mlp_batch(4))  # ranks 0 and 1 then wait for gradients that never come


@pytest.mark.timeout(60)
def test_a_rank_failing_mid_step_stops_the_pipeline() -> None:
    with pytest.raises(mp.ProcessRaisedException, match="(?s)Process 2 terminated.*RuntimeError: loss exploded"):
        spawn(_loss_fails_on_the_last_rank, 3, timeout_s=45)


def _rank_one_hangs(rank: int, world: int, pid_file: str) -> None:
    if rank == 1:
        Path(pid_file).write_text(str(os.getpid()))
        time.sleep(600)


@pytest.mark.timeout(60)
def test_a_hanging_rank_gives_a_timeout_error_and_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    # 15 s: rank 0 must have started and finished by then, also where starting a process is slow.
    with pytest.raises(TimeoutError, match=r"ranks \[1\] of 2 were still running after 15 s"):
        spawn(_rank_one_hangs, 2, (str(pid_file),), timeout_s=15)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # the hanging rank was terminated and reaped


def _rank_one_stops(rank: int, world: int) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(600)


@pytest.mark.timeout(60)
def test_the_deadline_names_a_stopped_rank() -> None:
    with pytest.raises(TimeoutError, match=r"still running after 10 s; rank\(s\) \[1\] stopped by a signal"):
        spawn(_rank_one_stops, 2, timeout_s=10)


def _returns(rank: int, world: int, out: str) -> None:
    Path(out, f"{rank}-of-{world}").write_text(str(torch.get_num_threads()))


@pytest.mark.timeout(60)
def test_spawn_runs_every_rank_with_its_arguments(tmp_path: Path) -> None:
    spawn(_returns, 2, (str(tmp_path),), timeout_s=45)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0-of-2", "1-of-2"]
    assert (tmp_path / "0-of-2").read_text() == "1"  # threads_per_rank defaults to 1


def test_under_torchrun_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "0" if name != "MASTER_ADDR" else "localhost")
    assert under_torchrun()
    monkeypatch.delenv("MASTER_PORT")
    assert not under_torchrun()


def test_default_backend_on_cpu_is_gloo() -> None:
    assert default_backend("cpu", 2) == "gloo"
    if not torch.cuda.is_available():
        assert default_backend("cuda", 2) == "gloo"


def _ranks_write_pids_and_wait(rank: int, world: int, out: str) -> None:
    Path(out, f"pid{rank}").write_text(str(os.getpid()))
    time.sleep(600)


LAUNCHER = """
import signal
import sys
# A launcher started from a background job of a non-interactive shell (CI) inherits SIGINT ignored;
# a user's Ctrl-C reaches one that has Python's usual handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {tests!r})
from test_launch import _ranks_write_pids_and_wait
from conveyor import spawn
if __name__ == "__main__":
    spawn(_ranks_write_pids_and_wait, 2, ({out!r},), timeout_s=300)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_launcher_leaves_nothing_behind(tmp_path: Path, how: signal.Signals) -> None:
    scratch, out = tmp_path / "tmp", tmp_path / "out"
    scratch.mkdir()
    out.mkdir()
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER.format(tests=str(Path(__file__).parent), out=str(out)))
    launcher = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "TMPDIR": str(scratch)})
    deadline = time.monotonic() + 60
    while len(list(out.glob("pid*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert any(p.name.startswith("conveyor-") for p in scratch.iterdir()), "the rendezvous folder should exist"
    launcher.send_signal(how)
    assert launcher.wait(30) != 0
    for pid_file in out.glob("pid*"):  # every rank was stopped and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("conveyor-")], "rendezvous folder left behind"


def test_the_launcher_blames_the_rank_at_the_end_of_a_chain_of_waits(tmp_path: Path) -> None:
    from conveyor.failures import _first_failure
    from conveyor.failures import note_failure as _note_failure

    rendezvous = str(tmp_path / "rendezvous")
    waited = "TimeoutError: rank {me}: the message from rank {peer} over ('act', 0, 1) did not arrive within 2 s"
    _note_failure(rendezvous, 2, waited.format(me=2, peer=1))  # rank 2 gave up first, on rank 1 ...
    _note_failure(rendezvous, 1, waited.format(me=1, peer=0))  # ... which was waiting on rank 0, stopped
    assert _first_failure(rendezvous) == (1, waited.format(me=1, peer=0))
    other = str(tmp_path / "other")
    _note_failure(other, 1, "ValueError: boom")  # not a wait: the first failure is the one
    assert _first_failure(other) == (1, "ValueError: boom")

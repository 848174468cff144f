"""The launcher: a failing rank stops the others and the first failure comes back; a watchdog names a rank that
makes no progress; restarts start every rank again."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import mlp, mlp_batch

from conveyor import Pipeline, PipelineSpec, spawn, split_model
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

    pipe = Pipeline(split_model(mlp(), rank, world), PipelineSpec("1f1b", world, 2), loss_fn=loss_fn)
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


def test_the_launcher_reports_a_timed_out_wait_not_the_error_it_caused_in_the_blamed_rank(tmp_path: Path) -> None:
    from conveyor.failures import _first_failure
    from conveyor.failures import note_failure as _note_failure

    rendezvous = str(tmp_path / "rendezvous")
    waited = "TimeoutError: rank 0: the message from rank 1 over ('act', 1, 0) did not arrive within 2 s"
    _note_failure(rendezvous, 0, waited)  # rank 0 gave up on rank 1 ...
    _note_failure(rendezvous, 1, "RuntimeError: Connection closed by peer [127.0.0.1]:1234")  # ... which then lost it
    assert _first_failure(rendezvous) == (0, waited)


def test_a_lost_link_noted_before_the_failure_that_closed_it_is_not_reported(tmp_path: Path) -> None:
    """Rank 1 can note the link rank 0 closed before rank 0's timed-out wait reaches its note (seen under load)."""
    from conveyor.failures import _first_failure
    from conveyor.failures import note_failure as _note_failure

    rendezvous = str(tmp_path / "rendezvous")
    waited = "TimeoutError: rank 0: the message from rank 1 over ('act', 1, 0) did not arrive within 2 s"
    _note_failure(rendezvous, 1, "RuntimeError: Connection closed by peer [127.0.0.1]:1234")
    _note_failure(rendezvous, 0, waited)
    assert _first_failure(rendezvous) == (0, waited)
    # A lost link alone is still reported: nothing else was noted.
    alone = str(tmp_path / "alone")
    _note_failure(alone, 1, "RuntimeError: Connection closed by peer [127.0.0.1]:1234")
    assert _first_failure(alone) == (1, "RuntimeError: Connection closed by peer [127.0.0.1]:1234")


# A bounded wait (conveyor's transport) on rank 0 for a message rank 1 never sends: rank 1 waits in a
# collective for rank 0 instead, and fails with gloo's "Connection closed by peer" once rank 0 gives up.
def _rank_waits_on_a_rank_in_a_collective(rank: int, world: int) -> None:
    from conveyor.runtime.transport import Transport

    transport = Transport.open({("act", 1, 0): (1, 0)}, torch.device("cpu"), timeout_s=2)
    if rank == 0:
        transport.recv((1,), torch.float32, ("act", 1, 0)).wait()
    else:
        dist.barrier()


@pytest.mark.timeout(60)
def test_a_rank_that_timed_out_is_reported_not_the_gloo_error_its_leaving_caused() -> None:
    with pytest.raises(mp.ProcessRaisedException) as raised:
        spawn(_rank_waits_on_a_rank_in_a_collective, 2, timeout_s=45)
    message = str(raised.value)
    assert "Process 0 terminated" in message and "TimeoutError: rank 0: the message from rank 1" in message
    assert "Connection closed" not in message, "a consequence was reported instead of the first failure"


class _Fatal(BaseException):  # as DCP's CheckpointException, not an Exception
    pass


def _rank_one_raises_a_base_exception(rank: int, world: int) -> None:
    if rank == 1:
        raise _Fatal("shard step-2/__1_0.distcp is truncated")
    time.sleep(600)


@pytest.mark.timeout(60)
def test_a_base_exception_of_a_rank_is_reported_with_its_message() -> None:
    expected = r"(?s)Process 1 terminated.*_Fatal: shard step-2/__1_0.distcp is truncated"
    with pytest.raises(mp.ProcessRaisedException, match=expected):
        spawn(_rank_one_raises_a_base_exception, 2, timeout_s=45)


def _rank_one_stops_while_rank_zero_waits(rank: int, world: int) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    dist.barrier()  # rank 0: gloo gives up after the group's timeout, in words that name no rank


@pytest.mark.timeout(60)
def test_a_rank_stopped_by_a_signal_is_named_as_the_cause_of_its_peers_failure() -> None:
    with pytest.raises(mp.ProcessRaisedException) as raised:
        spawn(_rank_one_stops_while_rank_zero_waits, 2, timeout_s=45, wait_timeout_s=3)
    assert "rank 1 was stopped by a signal (SIGSTOP, or a debugger) when rank 0 failed" in str(raised.value)


def _beats_for(rank: int, world: int, seconds: float) -> None:
    from conveyor.launch import heartbeat

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        heartbeat()
        time.sleep(0.1)


@pytest.mark.timeout(60)
def test_a_rank_that_keeps_making_progress_is_never_stopped() -> None:
    started = time.monotonic()
    spawn(_beats_for, 2, (6.0,), watchdog_s=2)  # no deadline: the watchdog alone
    assert time.monotonic() - started > 6


def _starts_slowly_then_beats(rank: int, world: int) -> None:
    time.sleep(5)  # imports, building the stages, loading a checkpoint: no beat yet
    _beats_for(rank, world, 1.0)


@pytest.mark.timeout(60)
def test_a_rank_still_starting_is_given_time_before_its_first_beat() -> None:
    spawn(_starts_slowly_then_beats, 2, watchdog_s=2, timeout_s=45)  # the limit is at least 120 s until then


def _rank_one_goes_silent(rank: int, world: int, how: str) -> None:
    from conveyor.launch import heartbeat

    for _ in range(3):
        heartbeat()
    if rank == 0:
        _beats_for(rank, world, 600)
    elif how == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif how == "helper beats":
        threading.Thread(target=_beats_for, args=(rank, world, 600), daemon=True).start()
        _stuck_in_one_call()
    else:
        _stuck_in_one_call()


def _stuck_in_one_call() -> None:
    time.sleep(600)  # as a kernel that never returns


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["stop", "stuck", "helper beats"])
def test_the_watchdog_names_a_rank_that_makes_no_progress(how: str, capfd: pytest.CaptureFixture[str]) -> None:
    from conveyor.launch import NoProgressError

    started = time.monotonic()
    with pytest.raises(NoProgressError, match=r"rank 1 made no progress for \d+ s \(the watchdog's limit is 3 s") as e:
        spawn(_rank_one_goes_silent, 2, (how,), watchdog_s=3, timeout_s=45)
    assert time.monotonic() - started < 40, "the watchdog, not the deadline, should end the run"
    if how == "stop":
        assert "it is stopped by a signal (SIGSTOP, or a debugger)" in str(e.value)
    else:  # a helper thread's beats do not count: the rank's own thread is stuck
        assert "it is running but stuck in one call" in str(e.value)
        assert "_stuck_in_one_call" in capfd.readouterr().err, "the stuck rank's stack should be printed"


def _fails_in_some_attempts(rank: int, world: int, out: str, failing: dict[int, str]) -> None:
    from conveyor.launch import heartbeat, restart_count

    attempt = restart_count()
    Path(out, f"rank{rank}-attempt{attempt}").touch()
    heartbeat()
    dist.barrier()  # every rank of this attempt has started
    how = failing.get(attempt, "") if rank == 1 else ""
    if how == "raise":
        raise ValueError(f"boom in attempt {attempt}")
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    if how == "sleep":
        time.sleep(600)
    dist.barrier()


@pytest.mark.timeout(120)
def test_spawn_restarts_every_rank_after_a_failure_and_logs_each_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    failing = {0: "raise", 1: "kill", 2: "stop"}
    with caplog.at_level(logging.WARNING, logger="conveyor.launch"):
        spawn(_fails_in_some_attempts, 2, (str(tmp_path), failing), watchdog_s=3, max_restarts=3, timeout_s=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"rank{r}-attempt{a}" for r in (0, 1) for a in range(4)]
    restarts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("restart")]
    assert restarts[0] == "restart 1 of 3 after rank 1 raised ValueError: boom in attempt 0"
    assert restarts[1] == "restart 2 of 3 after rank 1 was ended by signal SIGKILL"
    assert restarts[2].startswith("restart 3 of 3 after rank 1 made no progress for")  # the watchdog found it
    assert restarts[2].endswith("it is stopped by a signal (SIGSTOP, or a debugger)")
    assert len(restarts) == 3


@pytest.mark.timeout(120)
def test_restarts_end_with_the_last_failure_once_used_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    failing = {0: "raise", 1: "raise", 2: "raise"}
    with pytest.raises(mp.ProcessRaisedException, match="ValueError: boom in attempt 2"):
        spawn(_fails_in_some_attempts, 2, (str(tmp_path), failing), max_restarts=2, timeout_s=100)
    assert {p.name for p in tmp_path.iterdir()} >= {"rank1-attempt0", "rank1-attempt1", "rank1-attempt2"}
    assert "the run failed after 2 restarts, the most allowed" in caplog.text


@pytest.mark.timeout(60)
def test_the_deadline_is_never_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 were still running after 10 s"):
        spawn(_fails_in_some_attempts, 2, (str(tmp_path), {0: "sleep"}), max_restarts=2, timeout_s=10)
    assert "restart" not in caplog.text, "the deadline bounds the whole run: no restart after it"


class _Rank:
    """A rank's process as the launcher sees it: `exitcode` None until `join` reaps it."""

    def __init__(self, exitcode_once_reaped: int) -> None:
        self.pid, self.exitcode, self._reaped = -1, None, exitcode_once_reaped

    def join(self, timeout: float | None = None) -> None:
        self.exitcode = self._reaped  # type: ignore[assignment]


def test_a_rank_killed_by_a_signal_is_the_cause_even_when_a_peer_noted_its_failure_first(tmp_path: Path) -> None:
    from conveyor.failures import first_cause, note_failure

    rendezvous = str(tmp_path / "rendezvous")
    # Rank 1 was SIGKILLed: its links closed before it could be reaped, and rank 0 noted the consequence.
    note_failure(rendezvous, 0, "ConnectionError: rank 0: the message from rank 1 over ('act', 1, 0) never came")
    error = first_cause([_Rank(1), _Rank(-signal.SIGKILL)], [0], rendezvous, ["", ""])  # type: ignore[list-item]
    assert isinstance(error, mp.ProcessExitedException)
    assert str(error) == "process 1 terminated with signal SIGKILL"

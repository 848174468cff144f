"""Heartbeats: a beat moves only its rank's count, only from the thread that listens; without a listener it
does nothing; the in-rank watchdog (torchrun's ranks) ends a rank that makes no progress and says where."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import watchdog


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[watchdog.Heartbeats]:
    beats = watchdog.Heartbeats(str(tmp_path / "heartbeats"), 2)
    watchdog.attach(beats.path, 1)
    yield beats
    watchdog._count = watchdog._owner = None  # this test process is no rank: stop beating
    beats.close()


def test_a_beat_without_a_listener_does_nothing() -> None:
    assert watchdog._count is None
    watchdog.heartbeat()


def test_beats_move_their_ranks_count_and_end_its_silence(listening: watchdog.Heartbeats) -> None:
    time.sleep(0.2)
    assert listening.silence(1) >= 0.2 and not listening.has_beaten(1)
    watchdog.heartbeat()
    assert listening.silence(1) < 0.1 and listening.has_beaten(1)
    assert not listening.has_beaten(0), "a beat moves only its own rank's count"


def test_a_helper_threads_beats_do_not_count(listening: watchdog.Heartbeats) -> None:
    helper = threading.Thread(target=lambda: [watchdog.heartbeat() for _ in range(100)])
    helper.start()
    helper.join()
    assert not listening.has_beaten(1), "a helper thread would hide a stuck main thread"


def test_the_limit_leaves_room_for_a_wait_and_a_compute() -> None:
    assert watchdog.default_limit(600) == 1200
    assert watchdog.default_limit(8) == watchdog.MIN_LIMIT_S


STUCK_RANK = """
import time
from conveyor.watchdog import heartbeat, watch_this_rank
def stuck_in_one_call():
    time.sleep(60)
watch_this_rank(3, 2.0)
heartbeat()
stuck_in_one_call()
"""


@pytest.mark.timeout(60)
def test_a_rank_watching_itself_ends_when_it_makes_no_progress() -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", STUCK_RANK], capture_output=True, text=True, timeout=50)
    assert done.returncode == 1
    assert time.monotonic() - started < 30
    assert re.search(r"rank 3 made no progress for \d+ s \(the watchdog's limit is 2 s", done.stderr)
    assert "stuck_in_one_call" in done.stderr, "the stuck thread's stack should be printed"

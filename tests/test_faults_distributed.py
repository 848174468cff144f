"""Randomized faults: a rank killed, stopped or raising at a random action of a random schedule.

Every trial must end (every rank exits, the launcher raises) well within the launcher's deadline, with
an error that names the victim. 20 seeded trials on 2 ranks here (most of each is starting processes);
benchmarks/fault_trials.py runs many more on 2 and 3 ranks, recorded in docs/reliability.md. The same
faults under restarts (3 trials here, 100 in the benchmark) must end as a run without them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from faults import DEADLINE_S, WAIT_S, restart_trial, trial

TRIALS = 20


@pytest.mark.timeout(TRIALS * 40)
def test_every_injected_fault_ends_the_run_and_names_the_victim() -> None:
    slow, unnamed = [], []
    for seed in range(TRIALS):
        outcome = trial(seed, ranks_from=(2,))
        assert outcome.error, f"{outcome.plan.describe()}: the run ended without an error"
        if not outcome.named:
            unnamed.append(f"{outcome.plan.describe()}: {outcome.error[-400:]}")
        # A peer's bounded wait, the launcher stopping the rest, and a margin for starting processes.
        if outcome.seconds > DEADLINE_S - 5:
            slow.append(f"{outcome.plan.describe()}: {outcome.seconds:.1f} s")
    assert not unnamed, "errors that do not name the victim:\n" + "\n".join(unnamed)
    assert not slow, f"runs that took longer than {DEADLINE_S - 5} s to end (waits of {WAIT_S} s):\n" + "\n".join(slow)


# On 2 ranks: stop (gpipe), raise (pipedream), kill then raise (interleaved-1f1b); each fault falls within its attempt.
RESTART_SEEDS = (1, 7, 15)


@pytest.mark.timeout(900)
def test_faults_under_restarts_end_with_the_uninterrupted_runs_last_checkpoint(tmp_path: Path) -> None:
    """Each fault stops every rank, the launcher starts them again from the latest checkpoint, and the run ends
    with every tensor of its last checkpoint equal, bit for bit, to the run's without faults."""
    failed = []
    for seed in RESTART_SEEDS:
        outcome = restart_trial(seed, tmp_path, ranks_from=(2,))
        if not outcome.equal or len(outcome.restarts) != len(outcome.plan.faults):
            failed.append(f"{outcome.plan.describe()}: restarts {outcome.restarts}: {outcome.error[-600:]}")
    assert not failed, "\n".join(failed)

"""Randomized faults: a rank killed, stopped or raising at a random action of a random schedule.

Every trial must end (every rank exits, the launcher raises) well within the launcher's deadline, with
an error that names the victim. 20 seeded trials on 2 ranks here (most of each is starting processes);
benchmarks/fault_trials.py runs many more on 2 and 3 ranks, recorded in docs/reliability.md.
"""

from __future__ import annotations

import pytest
from faults import DEADLINE_S, WAIT_S, trial

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

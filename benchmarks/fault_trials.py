"""Fault injection at scale: many seeded trials of tests/faults.py, their outcomes and the slowest exit.

Each trial kills (SIGKILL), stops (SIGSTOP) or raises in a random rank at a random action of a random
schedule on 2 or 3 spawned ranks, and records how long the run took to end and whether the error named
the victim (docs/reliability.md).

    python benchmarks/fault_trials.py --trials 200 --json benchmarks/results/faults.json

With --restarts, each trial runs `conveyor train`'s ranks (6 steps, a checkpoint every 2) under the
launcher's restarts, with one or two such faults, each in its own attempt at any action of the run, and
records whether the run ended with every tensor of its last checkpoint equal, bit for bit, to the same
run's without faults:

    python benchmarks/fault_trials.py --restarts --trials 100 --json benchmarks/results/restarts.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from faults import DEADLINE_S, MAX_RESTARTS, RESTART_WAIT_S, WAIT_S, WATCHDOG_S, restart_trial, trial  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--first-seed", type=int, default=1000, help="seeds the suite does not use (it takes 0..19)")
    parser.add_argument("--restarts", action="store_true", help="faults under restarts, checked against a run without")
    parser.add_argument("--json", help="write every trial's outcome here")
    args = parser.parse_args()
    if args.restarts:
        _restarts(args)
        return
    outcomes = []
    for seed in range(args.first_seed, args.first_seed + args.trials):
        outcome = trial(seed)
        outcomes.append(outcome)
        print(f"{seed}: {outcome.plan.describe()}: {outcome.seconds:.1f} s, named={outcome.named}", flush=True)
    by_fault = Counter(o.plan.fault for o in outcomes)
    unnamed = [o for o in outcomes if not o.named or not o.error]
    slowest = max(outcomes, key=lambda o: o.seconds)
    print(f"{len(outcomes)} trials ({dict(by_fault)}), pipeline waits of {WAIT_S} s, launcher deadline {DEADLINE_S} s")
    print(f"victim named in {len(outcomes) - len(unnamed)} of {len(outcomes)}")
    print(f"slowest exit {slowest.seconds:.1f} s: {slowest.plan.describe()}")
    if args.json:
        rows = [
            {**o.plan.__dict__, "seconds": round(o.seconds, 2), "named": o.named, "error": o.error[-300:]}
            for o in outcomes
        ]
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


def _restarts(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="conveyor-restarts-") as scratch:
        for seed in range(args.first_seed, args.first_seed + args.trials):
            started = time.strftime("%H:%M:%S")
            load = os.getloadavg()[0]
            outcome = restart_trial(seed, Path(scratch))
            row = {
                "seed": seed,
                "schedule": outcome.plan.schedule,
                "ranks": outcome.plan.ranks,
                "faults": [f.__dict__ for f in outcome.plan.faults],
                "restarts": outcome.restarts,
                "equal": outcome.equal,
                "seconds": round(outcome.seconds, 1),
                "error": outcome.error[-600:],
                "started": started,
                "load_1min": round(load, 2),
            }
            rows.append(row)
            if args.json:  # every trial as it ends: a long run stopped halfway keeps what it did
                Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
            print(
                f"{seed}: {outcome.plan.describe()}: {outcome.seconds:.1f} s, {len(outcome.restarts)} restart(s),"
                f" equal={outcome.equal} {outcome.error[-300:]}",
                flush=True,
            )
    faults = Counter(f["kind"] for row in rows for f in row["faults"])  # type: ignore[attr-defined]
    restarted = Counter(len(row["restarts"]) for row in rows)  # type: ignore[arg-type]
    equal = sum(bool(row["equal"]) for row in rows)
    seconds = [float(row["seconds"]) for row in rows]  # type: ignore[arg-type]
    print(
        f"{len(rows)} trials, faults {dict(faults)}, waits of {RESTART_WAIT_S} s, watchdog {WATCHDOG_S} s,"
        f" at most {MAX_RESTARTS} restarts"
    )
    print(f"restarts per trial (logged): {dict(sorted(restarted.items()))}")
    print(f"ended with the uninterrupted run's last checkpoint, bit for bit: {equal} of {len(rows)}")
    print(f"seconds per trial: median {statistics.median(seconds):.1f}, slowest {max(seconds):.1f}")


if __name__ == "__main__":
    main()

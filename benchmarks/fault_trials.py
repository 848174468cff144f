"""Fault injection at scale: many seeded trials of tests/faults.py, their outcomes and the slowest exit.

Each trial kills (SIGKILL), stops (SIGSTOP) or raises in a random rank at a random action of a random
schedule on 2 or 3 spawned ranks, and records how long the run took to end and whether the error named
the victim (docs/reliability.md).

    python benchmarks/fault_trials.py --trials 200 --json benchmarks/results/faults.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from faults import DEADLINE_S, WAIT_S, trial  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--first-seed", type=int, default=1000, help="seeds the suite does not use (it takes 0..19)")
    parser.add_argument("--json", help="write every trial's outcome here")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()

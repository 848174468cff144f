"""How much does a per-layer profile move from one run to the next? Profile the default GPT several times
back to back and print each profile's predicted step time for a few configurations.

A spread here is a spread in every prediction `conveyor plan` makes from one profile.

    python benchmarks/plan_profile_spread.py
    python benchmarks/plan_profile_spread.py --profiles 5 --repeats 7
    python benchmarks/plan_profile_spread.py --profile-seconds 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from plan_measure import profile_gpt  # benchmarks/ is on the path of a script run from it

from conveyor.plan import make_plan
from conveyor.schedules import PipelineSpec
from conveyor.train import TrainConfig

CONFIGURATIONS = (("dualpipev", 8, "auto"), ("1f1b", 8, "auto"), ("1f1b", 4, "uniform"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7, help="repeats per layer in each profile, at least")
    parser.add_argument(
        "--profile-seconds", type=float, default=0.0, help="each profile's timed rounds last at least this long"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    sizes = TrainConfig()
    parser.add_argument("--dim", type=int, default=sizes.dim, help="model width, as `conveyor train --dim`")
    parser.add_argument("--layers", type=int, default=sizes.layers, help="blocks, as `conveyor train --layers`")
    parser.add_argument("--context", type=int, default=sizes.context, help="tokens per sequence, as `--context`")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = TrainConfig(dim=args.dim, layers=args.layers, context=args.context).source.gpt_config()
    predictions: dict[tuple[str, int, str], list[float]] = {c: [] for c in CONFIGURATIONS}
    for _ in range(args.profiles):
        for m in sorted({m for _, m, _ in CONFIGURATIONS}):
            size = -(-args.batch_size // m)
            tokens = torch.randint(0, 256, (size, config.context + 1), generator=torch.Generator().manual_seed(0))
            profile = profile_gpt(config, tokens, args.repeats, args.profile_seconds)
            for name, count, method in CONFIGURATIONS:
                if count == m:
                    plan = make_plan(profile, PipelineSpec(name, 2, m), method=method)
                    predictions[(name, m, method)].append(plan.step_time)
        print(time.strftime("%H:%M:%S"), f"load {os.getloadavg()[0]:.2f}", flush=True)
    for (name, m, method), times in predictions.items():
        low, high = min(times), max(times)
        shown = " ".join(f"{t * 1e3:.1f}" for t in times)
        print(f"{name} m={m} {method}: {shown} ms; spread {(high - low) / low:.1%}")


if __name__ == "__main__":
    sys.exit(main())

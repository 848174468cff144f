"""`conveyor plan --search` on `conveyor train`'s default GPT (or, with `--model gpt2`, Hugging Face's GPT-2
of the same sizes, traced), checked by training: is the first entry of its ranking as fast as predicted, and
no slower than the default configuration (1f1b, 4 micro-batches, the even split)?

The search profiles every layer at each micro-batch size it tries (16 sequences of 128 bytes cut into 2, 4,
8 or 16 micro-batches), measures what a message of one boundary's activations costs between two gloo ranks,
and ranks every synchronous schedule x micro-batch count x recompute setting on 2 ranks by the simulated
synchronous step of its best split. Then the first entry and the default configuration are trained for
real in the same ranks, a step of one and then a step of the other, over rounds (`plan_measure.py`).

    python benchmarks/plan_search.py
    python benchmarks/plan_search.py --rounds 3 --json out.json
    python benchmarks/plan_search.py --model gpt2     # needs the [hf] extra
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from plan_measure import (
    Measured,
    Workload,
    add_quiet_wait_flag,
    measure_plans,
    now,
    provenance,
    replayed_step,
    unscaled_step,
    wait_until_quiet,
)

from conveyor.observe.profile import LayerProfile
from conveyor.plan import make_plan, profile_model, search, with_measured_transfers
from conveyor.plan.command import ranking_table
from conveyor.schedules import PipelineSpec
from conveyor.train import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gpt", "gpt2"], default="gpt", help="as `conveyor train --model`")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--microbatch-counts", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=8, help="measured steps per run (after 2 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--top", type=int, default=5)
    sizes = TrainConfig()
    parser.add_argument("--dim", type=int, default=sizes.dim, help="model width, as `conveyor train --dim`")
    parser.add_argument("--layers", type=int, default=sizes.layers, help="blocks, as `conveyor train --layers`")
    parser.add_argument("--context", type=int, default=sizes.context, help="tokens per sequence, as `--context`")
    parser.add_argument(
        "--profile-seconds", type=float, default=0.0, help="each profile's timed rounds last at least this long"
    )
    parser.add_argument(
        "--slowdown",
        action="store_true",
        help="scale the predictions by how much slower the layers compute in a pipeline's rank (measured; gpt only)",
    )
    add_quiet_wait_flag(parser)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.slowdown and args.model == "gpt2":
        parser.error("--slowdown is measured for a manual split's layers only (--model gpt)")
    torch.set_num_threads(1)
    # conveyor train's model: 4 blocks, dim 256, 128 bytes of context unless the flags say otherwise
    defaults = TrainConfig(model=args.model, dim=args.dim, layers=args.layers, context=args.context)
    workload = Workload(
        args.model, defaults.source.hf_config() if args.model == "gpt2" else defaults.source.gpt_config()
    )
    started = now()
    profiles: dict[int, LayerProfile] = {}
    foreign: dict[int, float] = {}

    def profile_for(m: int) -> LayerProfile:
        if m not in profiles:
            foreign[m] = wait_until_quiet(
                args.quiet_wait_s
            )  # a profile taken while others compute would inflate every layer
            tokens = workload.tokens(-(-args.batch_size // m))
            p = profile_model(
                workload.builder(),
                tokens[:, :-1],
                tokens[:, 1:],
                workload.loss,
                split=workload.split,
                repeats=7,
                min_seconds=args.profile_seconds,
                slowdown=args.slowdown,
            )
            if p.slowdown is not None:
                print(f"{m} micro-batches: computes {p.slowdown:.3f}x slower in a pipeline's rank than in its profile")
            profiles[m] = with_measured_transfers(p)
        return profiles[m]

    plans, refused = search(profile_for, args.ranks, args.microbatch_counts)
    print(ranking_table(plans[: args.top]))
    print(f"{len(plans)} configurations ranked; {len(refused)} did not apply")
    best = plans[0]
    default = make_plan(profile_for(4), PipelineSpec("1f1b", args.ranks, 4), method="uniform")
    times = {"best": Measured(), "default": Measured()}
    loads = [os.getloadavg()]
    for _ in range(args.rounds):
        measure_plans([best, default], workload, args.steps, [times["best"], times["default"]], args.quiet_wait_s)
        loads.append(os.getloadavg())
    rows = []
    for name, plan in (("best", best), ("default", default)):
        measured = times[name].median
        replayed = replayed_step(plan, profile_for(plan.spec.microbatches), times[name])
        rows.append(
            {
                "which": name,
                "schedule": plan.spec.schedule,
                "virtual": plan.spec.virtual,
                "microbatches": plan.spec.microbatches,
                "recompute": plan.spec.recompute,
                "layers_per_stage": list(plan.layers_per_stage),
                "predicted_s": plan.step_time,
                "measured_s": measured,
                "error": (plan.step_time - measured) / measured,
                "replayed_s": replayed,
                "model_error": (replayed - measured) / measured,
                "each_error": (times[name].replayed_each - measured) / measured,
                "unscaled_error": (unscaled_step(plan, profile_for(plan.spec.microbatches)) - measured) / measured,
                **times[name].to_json(),
            }
        )
        print(
            f"{name:<8} {plan.spec.schedule} v={plan.spec.virtual} m={plan.spec.microbatches}"
            f" recompute {plan.spec.recompute}"
            f" blocks {list(plan.layers_per_stage)}: predicted {plan.step_time * 1e3:.1f} ms, measured"
            f" {measured * 1e3:.1f} ms ({(plan.step_time - measured) / measured:+.1%});"
            f" {len(times[name].undisturbed)}/{len(times[name].times)} undisturbed steps; with the runs' per-kind"
            f" action times {replayed * 1e3:.1f} ms ({(replayed - measured) / measured:+.1%}), with each step's own"
            f" {times[name].replayed_each * 1e3:.1f} ms ({(times[name].replayed_each - measured) / measured:+.1%})"
            + (f"; unscaled {float(rows[-1]['unscaled_error']):+.1%}" if args.slowdown else "")  # type: ignore[arg-type]
        )
    print(f"best / default measured: {rows[0]['measured_s'] / rows[1]['measured_s']:.3f}")  # type: ignore[operator]
    print(f"load averages before and after each run: {[tuple(round(x, 2) for x in load) for load in loads]}")
    if args.json:
        report = {
            **provenance(started),
            "load_averages_1_5_15": loads,
            "foreign_cores_before_profiles": foreign,
            "transfers_s": {m: vars(p.transfers) if p.transfers else None for m, p in profiles.items()},
            "slowdown": {m: p.slowdown for m, p in profiles.items()},
            "model": args.model,
            "ranking": [
                {
                    "schedule": p.spec.schedule,
                    "virtual": p.spec.virtual,
                    "microbatches": p.spec.microbatches,
                    "recompute": p.spec.recompute,
                    "layers_per_stage": list(p.layers_per_stage),
                    "predicted_s": p.step_time,
                    "period_s": p.period,
                    "bubble": p.bubble,
                    "peak_bytes": list(p.peak_bytes),
                }
                for p in plans
            ],
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""Does `conveyor plan` pay? A GPT whose embedding and LM head cost as much as several blocks, on 2 ranks.

The GPT has a large vocabulary (12288 by default, against 8 blocks of width 128; micro-batches of 4 x 64
tokens), so its head and loss compute as much as about six blocks. For each schedule, the planner's `auto`
split and the even split by layer count (`uniform`, what `manual_split` does unasked) are predicted from a
per-layer profile taken right before they are trained for real on 2 spawned ranks (`plan_measure.py`:
gloo, one thread each, AdamW; a step timed on rank 0 between two barriers, the way the simulator's
synchronous step is defined).
The two splits of a schedule run in the same ranks, a step of one and then a step of the other
(`measure_plans`), so drift of a shared machine hits both alike.

    python benchmarks/plan_large_vocab.py
    python benchmarks/plan_large_vocab.py --schedules 1f1b zbv --rounds 2 --json out.json
    python benchmarks/plan_large_vocab.py --predict-only --microbatch-size 2 --vocab 8192   # choose a workload
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
    profile_gpt,
    provenance,
    replayed_step,
    unscaled_step,
    wait_until_quiet,
)

from conveyor.models import GPTConfig
from conveyor.observe.profile import LayerProfile
from conveyor.plan import Plan, make_plan, with_measured_transfers
from conveyor.schedules import PipelineSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe", "zb-h1", "zbv"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--microbatch-size", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=12288)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per run (after 2 warm-up steps)")
    parser.add_argument(
        "--slowdown",
        action="store_true",
        help="scale the predictions by how much slower the layers compute in a pipeline's rank (measured)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs of each schedule (its two splits in turn)")
    parser.add_argument("--repeats", type=int, default=7, help="profiling repeats per layer, at least")
    parser.add_argument(
        "--profile-seconds", type=float, default=0.0, help="each profile's timed rounds last at least this long"
    )
    add_quiet_wait_flag(parser)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--predict-only", action="store_true", help="profile and print the predicted speedups; train nothing"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = GPTConfig(vocab_size=args.vocab, context=args.context, dim=args.dim, layers=args.layers, heads=4)
    started = now()
    if args.predict_only:
        profile = measure_profile(config, args)
        _print_predictions({key: _plan(profile, key, args) for key in _keys(args)}, args)
        return
    # Each schedule is profiled right before its two splits are trained: on a machine whose speed drifts
    # from one minute to the next, a profile taken minutes earlier mispredicts by the drift alone.
    profiles: dict[str, LayerProfile] = {}
    quiet_before_profiles: dict[str, float] = {}
    plans: dict[tuple[str, str], Plan] = {}
    times = {key: Measured() for key in _keys(args)}
    loads: list[tuple[float, float, float]] = [os.getloadavg()]
    for name in args.schedules:
        quiet_before_profiles[name] = wait_until_quiet(
            args.quiet_wait_s
        )  # a profile taken while others compute inflates it
        profiles[name] = measure_profile(config, args)
        if profiles[name].slowdown is not None:
            print(f"{name}: computes {profiles[name].slowdown:.3f}x slower in a pipeline's rank than in its profile")
        pair = [(name, "auto"), (name, "uniform")]
        for key in pair:
            plans[key] = _plan(profiles[name], key, args)
        for _ in range(args.rounds):
            workload, into = Workload("gpt", config), [times[k] for k in pair]
            measure_plans([plans[k] for k in pair], workload, args.steps, into, args.quiet_wait_s)
            loads.append(os.getloadavg())
    rows = []
    for (name, method), plan in plans.items():
        measured = times[(name, method)].median
        replayed = replayed_step(plan, profiles[name], times[(name, method)])
        rows.append(
            {
                "schedule": name,
                "method": method,
                "layers_per_stage": list(plan.layers_per_stage),
                "predicted_s": plan.step_time,
                "measured_s": measured,
                "error": (plan.step_time - measured) / measured,
                "replayed_s": replayed,
                "model_error": (replayed - measured) / measured,
                "each_error": (times[(name, method)].replayed_each - measured) / measured,
                "unscaled_error": (unscaled_step(plan, profiles[name]) - measured) / measured,
                **times[(name, method)].to_json(),
            }
        )
    report = {
        **provenance(started),
        "load_averages_1_5_15": loads,
        "config": vars(args),
        "profiles": {
            name: {
                "foreign_cores_before": quiet_before_profiles[name],
                "layers": [vars(layer) for layer in profile.layers],
                "transfers_s": vars(profile.transfers) if profile.transfers else None,
                "slowdown": profile.slowdown,
            }
            for name, profile in profiles.items()
        },
        "rows": rows,
    }
    _print(rows, args)
    shown = [tuple(round(x, 2) for x in load) for load in loads]
    print(f"load averages (1, 5, 15 min) before and after each run: {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def _keys(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(schedule, split method) of every plan the benchmark compares."""
    return [(name, method) for name in args.schedules for method in ("auto", "uniform")]


def _plan(profile: LayerProfile, key: tuple[str, str], args: argparse.Namespace) -> Plan:
    name, method = key
    return make_plan(profile, PipelineSpec(name, args.ranks, args.microbatches), method=method)


def measure_profile(config: GPTConfig, args: argparse.Namespace) -> LayerProfile:
    tokens = torch.randint(
        0, config.vocab_size, (args.microbatch_size, args.context + 1), generator=torch.Generator().manual_seed(0)
    )
    profile = profile_gpt(config, tokens, args.repeats, args.profile_seconds, slowdown=args.slowdown)
    return with_measured_transfers(profile)


def _print_predictions(plans: dict[tuple[str, str], Plan], args: argparse.Namespace) -> None:
    """What the planner expects of this workload, before anything is trained (to choose a workload by)."""
    print(f"GPT {args.layers} blocks, dim {args.dim}, vocab {args.vocab}; {args.microbatches} x {args.microbatch_size}")
    for name in args.schedules:
        auto, even = plans[(name, "auto")], plans[(name, "uniform")]
        print(
            f"{name}: auto {list(auto.layers_per_stage)} {auto.step_time * 1e3:.1f} ms, even"
            f" {list(even.layers_per_stage)} {even.step_time * 1e3:.1f} ms: {even.step_time / auto.step_time:.3f}x"
        )


def _print(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    print(
        f"{args.ranks} ranks, {args.microbatches} micro-batches of {args.microbatch_size} x {args.context} tokens;"
        f" GPT {args.layers} blocks, dim {args.dim}, vocab {args.vocab}"
    )
    print(
        f"{'schedule':<10} {'split':<8} {'blocks/stage':<14} {'predicted':>10} {'measured':>10} {'error':>8}"
        f" {'replayed':>10} {'error':>8} {'each':>10} {'error':>8}"
    )
    print("  (replayed: simulated with the runs' per-kind action times; each: every step with its own actions' times)")
    if args.slowdown:
        print("  (unscaled: the prediction's error without the measured slowdown in a pipeline's rank)")
    by_key = {(r["schedule"], r["method"]): r for r in rows}
    for row in rows:
        predicted, measured = float(row["predicted_s"]) * 1e3, float(row["measured_s"]) * 1e3  # type: ignore[arg-type]
        split = ",".join(map(str, row["layers_per_stage"]))  # type: ignore[call-overload]
        print(
            f"{row['schedule']:<10} {row['method']:<8} {split:<14} {predicted:>8.1f}ms {measured:>8.1f}ms"
            f" {float(row['error']):>+8.1%} {float(row['replayed_s']) * 1e3:>8.1f}ms {float(row['model_error']):>+8.1%}"  # type: ignore[arg-type]
            f" {float(row['replayed_each_s']) * 1e3:>8.1f}ms {float(row['each_error']):>+8.1%}"  # type: ignore[arg-type]
            f"  {row['undisturbed_steps']}/{len(row['steps_s'])} undisturbed steps"
            + (f", {float(row['unscaled_error']):+.1%} unscaled" if args.slowdown else "")  # type: ignore[arg-type]
        )
    for name in dict.fromkeys(r["schedule"] for r in rows):
        auto, even = by_key[(name, "auto")], by_key[(name, "uniform")]
        speedup = float(even["measured_s"]) / float(auto["measured_s"])  # type: ignore[arg-type]
        predicted = float(even["predicted_s"]) / float(auto["predicted_s"])  # type: ignore[arg-type]
        print(f"{name}: auto is {speedup:.3f}x faster than the even split (predicted {predicted:.3f}x)")


if __name__ == "__main__":
    sys.exit(main())

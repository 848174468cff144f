"""Does the simulator predict real runs? Profile costs, simulate, then measure the same setup.

For each schedule: the small GPT of `conveyor train` is split into stages,
each stage's F, B and W times are profiled in one process (one thread, as a
rank has), what a message of one activation costs is measured between two
processes (`measure_transfers`: its latency, and the time a send and a
receive's post take), and `conveyor.observe.simulate` predicts the step time. Then
the same model, schedule and micro-batches run for real on spawned ranks and
the median step time is measured. Prints the table (or `--json`).

    python benchmarks/predict_step_time.py
    python benchmarks/predict_step_time.py --schedules gpipe 1f1b zb-h1 --microbatches 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from conveyor import Pipeline, spawn, split_model
from conveyor.models import GPT, GPTConfig, lm_loss
from conveyor.observe.profile import profile_stages
from conveyor.observe.simulate import CostModel, simulate
from conveyor.observe.transfers import measure_transfers, with_transfers
from conveyor.schedules import PipelineSpec, build_schedule, schedule_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "zb-h1"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per schedule (after 2 warm-up steps)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = GPTConfig(context=args.context, dim=args.dim, layers=args.layers)
    rows = []
    for name in args.schedules:
        stages = args.ranks * schedule_info(name).default_virtual
        costs = profile(config, stages, args)
        program = build_schedule(PipelineSpec(name, args.ranks, args.microbatches))
        predicted = simulate(program, costs).step_time
        measured = measure(name, config, stages, args)
        rows.append(
            {
                "schedule": name,
                "predicted_s": predicted,
                "measured_s": measured,
                "error": (predicted - measured) / measured,
                "costs": [vars(stage) for stage in costs.stages],
                "latency_s": costs.latency,
                "send_s": costs.send,
                "recv_s": costs.recv,
            }
        )
    if args.json:
        print(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=2))
        return
    micro = args.batch_size // args.microbatches
    print(f"{args.ranks} ranks, {args.microbatches} micro-batches of {micro} x {args.context} tokens")
    print(f"{'schedule':<12} {'predicted':>10} {'measured':>10} {'error':>8}")
    for row in rows:
        predicted, measured = row["predicted_s"] * 1e3, row["measured_s"] * 1e3
        print(f"{row['schedule']:<12} {predicted:>8.1f}ms {measured:>8.1f}ms {row['error']:>+8.1%}")


def profile(config: GPTConfig, stages: int, args: argparse.Namespace) -> CostModel:
    modules = [split_model(lambda: GPT(config), s, stages) for s in range(stages)]
    micro = args.batch_size // args.microbatches
    tokens = torch.randint(0, config.vocab_size, (micro, args.context + 1), generator=torch.Generator().manual_seed(0))
    costs = profile_stages(modules, tokens[:, :-1], tokens[:, 1:], lm_loss)
    activation = micro * args.context * config.dim * 4
    return with_transfers(costs, measure_transfers(activation))


def measure(name: str, config: GPTConfig, stages: int, args: argparse.Namespace) -> float:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        spawn(_measure_rank, args.ranks, (name, config, stages, args, out.name), timeout_s=600)
        return float(json.loads(Path(out.name).read_text())["median_s"])


def _measure_rank(
    rank: int, world: int, name: str, config: GPTConfig, stages: int, args: argparse.Namespace, out: str
) -> None:
    pipe = Pipeline.from_model(lambda: GPT(config), PipelineSpec(name, world, args.microbatches), loss_fn=lm_loss)
    tokens = torch.randint(
        0, config.vocab_size, (args.batch_size, args.context + 1), generator=torch.Generator().manual_seed(0)
    )
    times = []
    for step in range(args.steps + 2):
        dist.barrier()
        start = time.perf_counter()
        pipe.step(tokens[:, :-1], tokens[:, 1:])
        pipe.zero_grad()
        dist.barrier()
        if step >= 2:
            times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps({"median_s": statistics.median(times)}))


if __name__ == "__main__":
    sys.exit(main())

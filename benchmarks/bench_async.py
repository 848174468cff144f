"""Samples per second of PipeDream's asynchronous schedules against 1F1B, and the bytes their weight versions hold.

The same model (conveyor's GPT, 8 blocks of width 256 by default), the same
micro-batches (2 samples of 128 tokens, 8 per mini-batch) on 2 spawned ranks
(gloo, one torch thread each), AdamW everywhere. 1F1B steps once per
mini-batch and flushes between them; pipedream and pipedream-2bw stream all
measured mini-batches as one program that drains once, at its end, and the
drain is timed with them. Runs are interleaved (1f1b, pipedream, 2bw, 1f1b,
...) so that drift of the machine hits all alike. Each rank also reports the
weight versions its stage held at most and the bytes of their copies, against
the bound (its in-flight micro-batches + 1 versions of its weights).

    python benchmarks/bench_async.py                         # 3 rounds of 16 mini-batches
    python benchmarks/bench_async.py --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from conveyor import Pipeline, PipelineSpec, manual_split, spawn
from conveyor.models import GPT, GPTConfig, lm_loss

SCHEDULES = ("1f1b", "pipedream", "pipedream-2bw")


def _batches(count: int, m: int, size: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(256, (m * size, seq + 1), generator=g) for _ in range(count)]
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def _rank(rank: int, world: int, schedule: str, options: dict[str, int], out: str) -> None:
    torch.set_num_threads(1)
    m, size, seq, count = options["microbatches"], options["size"], options["seq"], options["batches"]
    config = GPTConfig(context=seq, dim=options["dim"], layers=options["layers"], heads=4)
    pipe = Pipeline(
        manual_split(lambda: GPT(config), world),
        PipelineSpec(schedule, world, m),
        loss_fn=lm_loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),
    )
    warmup, measured = _batches(2, m, size, seq), _batches(count, m, size, seq)
    for _ in pipe.stream(warmup, len(warmup)):  # shapes learned, allocator warm
        pass
    dist.barrier()
    start = time.perf_counter()
    for _ in pipe.stream(measured, count):
        pass
    seconds = time.perf_counter() - start
    stage = pipe.stages[rank]
    params = sum(p.nbytes for p in stage.module.parameters())
    versions = stage.versions
    result = {
        "seconds": seconds,
        "samples_per_s": count * m * size / seconds,
        "versions": versions.peak_versions if versions else 1,
        "copy_bytes": versions.peak_bytes if versions else 0,
        "weight_bytes": params,
        "bound_versions": min(world - rank, m * count) + 1,
    }
    pipe.close()
    with open(f"{out}.{rank}.json", "w") as file:
        json.dump(result, file)


def run(options: dict[str, int], rounds: int) -> dict[str, Any]:
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in SCHEDULES}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(rounds):
            for name in SCHEDULES:
                out = f"{scratch}/{name}-{round_}"
                spawn(_rank, 2, (name, options, out), timeout_s=900)
                runs[name].append([json.load(open(f"{out}.{rank}.json")) for rank in range(2)])
                print(f"round {round_}: {name} {runs[name][-1][0]['samples_per_s']:.1f} samples/s", flush=True)
    summary: dict[str, Any] = {}
    for name, per_round in runs.items():
        rates = [ranks[0]["samples_per_s"] for ranks in per_round]  # every rank timed the same stream
        summary[name] = {
            "samples_per_s": statistics.median(rates),
            "rounds": rates,
            "per_rank": per_round[-1],
        }
    for name in SCHEDULES[1:]:
        summary[name]["vs_1f1b"] = summary[name]["samples_per_s"] / summary["1f1b"]["samples_per_s"]
        summary[name]["faster_rounds"] = sum(
            a["samples_per_s"] > b["samples_per_s"]
            for a, b in zip((r[0] for r in runs[name]), (r[0] for r in runs["1f1b"]), strict=True)
        )
    return {"options": options, "rounds": rounds, "machine": f"{platform.processor() or platform.machine()}", **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=16, help="measured mini-batches per run")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--size", type=int, default=2, help="samples per micro-batch")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    options = {k: getattr(args, k) for k in ("batches", "microbatches", "size", "seq", "dim", "layers")}
    summary = run(options, args.rounds)
    for name in SCHEDULES:
        line = f"{name:14s} {summary[name]['samples_per_s']:7.1f} samples/s"
        if name != "1f1b":
            line += f"  x{summary[name]['vs_1f1b']:.3f} of 1f1b (faster in {summary[name]['faster_rounds']} rounds)"
        print(line)
        for rank, r in enumerate(summary[name]["per_rank"]):
            print(
                f"    rank {rank}: {r['versions']} versions held (bound {r['bound_versions']}),"
                f" {r['copy_bytes'] / 2**20:.1f} MiB of copies, {r['weight_bytes'] / 2**20:.1f} MiB of weights"
            )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(summary, file, indent=2)


if __name__ == "__main__":
    main()

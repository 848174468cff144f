"""Peak memory held for backward, measured and predicted: 1f1b, zbv, v-half, v-min, with offload and recompute.

One model whose activations dominate its weights (residual MLP blocks, 4x wide, many rows per micro-batch) is
cut into P stages (1f1b) or 2P half-size stages (the V schedules) and trained on P spawned ranks (gloo) under
each schedule and each memory option:

  plain       everything kept for backward
  offload     every stage offloads (`PipelineSpec(offload="all")`; on CPU a copy into a separate buffer)
  recompute   every stage recomputes its forward (`recompute="full"`)
  mixed       every stage but the last recomputes, and the last offloads

Measured: the most bytes a rank's stages hold for backward at once (`track_memory`, the executor's
`peak_held_bytes`), the busiest rank's; the step time (median and fastest over rounds x steps; a step is a
barrier, the pipeline step and an SGD step, timed on the slowest rank); and the CPU time of the busiest
rank's process per step (median), which other work on a shared machine does not stretch as it stretches
the wall time: on a CPU it is what a schedule's work, its split backwards and its copies cost. Predicted: the
simulator's peak bytes per rank for the same lowered program, with each stage's bytes per micro-batch (and
the bytes an offload moves) measured by running one micro-batch through a fresh copy of that stage; copies
keep the rank busy, as on CPU.
Ratios are to 1f1b's plain run. Configurations run round-robin, so a drifting machine hits them alike.

    python benchmarks/memory_schedules.py                       # 2 ranks
    python benchmarks/memory_schedules.py --ranks 4 --steps 1   # bytes mostly (4 ranks on 2 cores)
    python benchmarks/memory_schedules.py --device cuda         # the GPU check: pinned memory, a side stream
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from conveyor import Pipeline, spawn
from conveyor.observe.simulate import CostModel, StageCosts, simulate
from conveyor.runtime.stage import Stage
from conveyor.schedules import SCHEDULES, PipelineSpec, offloaded

SCHEDULE_NAMES = ("1f1b", "zbv", "v-half", "v-min")
OPTIONS = {  # name -> (recompute, offload)
    "plain": ("none", "none"),
    "offload": ("none", "all"),
    "recompute": ("full", "none"),
    "mixed": ("all-but-last-stage", "last"),
}


@dataclass(frozen=True)
class Config:
    ranks: int = 2
    microbatches: int = 8
    blocks: int = 0
    """Residual MLP blocks in the whole model; 0: 4 per rank (2 per stage under a V)."""
    dim: int = 64
    rows: int = 256
    """Rows of one micro-batch: with dim 64 a block keeps about 5x its weights' bytes per micro-batch."""
    steps: int = 4
    warmup: int = 1
    rounds: int = 3
    device: str = "cpu"
    schedules: str = ",".join(SCHEDULE_NAMES)
    """The schedules to run, by name, comma-separated (1f1b always: the ratios are to it)."""
    options: str = ",".join(OPTIONS)
    """The memory options to run (plain always)."""

    @property
    def schedule_names(self) -> list[str]:
        return list(dict.fromkeys(["1f1b", *self.schedules.split(",")]))

    @property
    def option_names(self) -> list[str]:
        return list(dict.fromkeys(["plain", *self.options.split(",")]))

    @property
    def num_blocks(self) -> int:
        return self.blocks or 4 * self.ranks


class Block(nn.Module):
    """x + W2 gelu(W1 x): keeps its input, the 4x wide hidden and its GELU for backward."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


def build(config: Config) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(config.dim) for _ in range(config.num_blocks)])


def _options(name: str, option: str, stages: int) -> dict[str, str]:
    recompute, offload = OPTIONS[option]
    return {"recompute": recompute, "offload": str(stages - 1) if offload == "last" else offload}


def _per_microbatch(pipe: Pipeline, rows: int, dim: int, device: torch.device) -> dict[int, tuple[int, int]]:
    """Per stage of this rank: bytes one micro-batch holds for backward, and the bytes its offload moves."""
    found = {}
    for index, stage in pipe.stages.items():
        probe = Stage(
            stage.module, index, stage.num_stages, stage.loss_fn, recompute=stage.recompute, track_memory=True
        )
        x = torch.randn(rows, dim, device=device, requires_grad=index > 0)
        target = torch.zeros(rows, dim, device=device)
        probe.forward(0, x if index == 0 else [x], target, offload=not stage.recompute)
        held = probe.held_bytes
        moved = 0
        if not stage.recompute:
            probe.offload(0)
            moved = held - probe.held_bytes
        found[index] = (held, moved)
    return found


def _rank(rank: int, world: int, config: Config, out: str) -> None:
    device = torch.device("cuda", 0) if config.device == "cuda" else torch.device("cpu")
    batch = config.microbatches * config.rows
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.dim, generator=g).to(device)
    y = torch.randn(batch, config.dim, generator=g).to(device)
    runs: dict[str, dict[str, Any]] = {}
    for _ in range(config.rounds):
        for name in config.schedule_names:
            stages = world * SCHEDULES[name].default_virtual
            for option in config.option_names:
                key = f"{name}/{option}"
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                spec = PipelineSpec(name, world, config.microbatches, **_options(name, option, stages))
                pipe = Pipeline.from_model(
                    build(config),
                    spec,
                    loss_fn=F.mse_loss,
                    optimizer=lambda params: torch.optim.SGD(params, lr=1e-3),
                    device=device,
                )
                pipe.track_memory = True
                times, cpu = [], []
                for step in range(config.warmup + config.steps):
                    dist.barrier()
                    start, start_cpu = time.perf_counter(), time.process_time()
                    pipe.step(x, y)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    # Wall time of the slowest rank, and the CPU time of the busiest: what the step's work
                    # costs, which other processes on a shared machine do not stretch.
                    elapsed = torch.tensor([time.perf_counter() - start, time.process_time() - start_cpu])
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                    if step >= config.warmup:
                        times.append(float(elapsed[0]))
                        cpu.append(float(elapsed[1]))
                run = runs.setdefault(key, {"times": [], "cpu": [], "peak": 0})
                run["times"] += times
                run["cpu"] += cpu
                run["peak"] = max(run["peak"], pipe.executor.peak_held_bytes)
                if device.type == "cuda":
                    run["allocated"] = torch.cuda.max_memory_allocated(device)
                if "per_microbatch" not in run:
                    run["per_microbatch"] = _per_microbatch(pipe, config.rows, config.dim, device)
                    run["offloaded"] = len([1 for s, _ in offloaded(pipe.program) if s in pipe.stages])
                pipe.close()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, runs)
    if rank == 0:
        with open(out, "w") as file:
            json.dump(gathered, file)


def predict(config: Config, name: str, option: str, per_microbatch: dict[int, tuple[int, int]]) -> list[float]:
    """The simulator's peak bytes per rank for this configuration's program (copies keep the rank busy)."""
    from conveyor.schedules import build_schedule, offload_stages

    stages = config.ranks * SCHEDULES[name].default_virtual
    offload = offload_stages(_options(name, option, stages)["offload"], stages)
    program = build_schedule(PipelineSpec(name, config.ranks, config.microbatches, offload=offload))
    costs = CostModel(
        tuple(
            StageCosts(activation_bytes=float(per_microbatch[s][0]), offload_bytes=float(per_microbatch[s][1]))
            for s in range(stages)
        ),
        copy_stream=False,
    )
    peaks = simulate(program, costs).peak_activation_bytes
    assert peaks is not None
    return peaks


def run(config: Config) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "runs.json")
        spawn(_rank, config.ranks, (config, out), timeout_s=3600)
        with open(out) as file:
            per_rank = json.load(file)
    results: dict[str, Any] = {}
    for key in per_rank[0]:
        name, option = key.split("/")
        per_microbatch = {int(s): tuple(v) for r in per_rank for s, v in r[key]["per_microbatch"].items()}
        measured = [r[key]["peak"] for r in per_rank]
        predicted = predict(config, name, option, per_microbatch)  # type: ignore[arg-type]
        results[key] = {
            "measured_bytes": measured,
            "predicted_bytes": predicted,
            "step_ms": 1e3 * statistics.median(per_rank[0][key]["times"]),
            "step_ms_min": 1e3 * min(per_rank[0][key]["times"]),
            "cpu_ms": 1e3 * statistics.median(per_rank[0][key]["cpu"]),
            "step_ms_all": [1e3 * t for t in per_rank[0][key]["times"]],
            "offloaded_microbatches": sum(r[key]["offloaded"] for r in per_rank),
            "per_microbatch": per_microbatch,
        }
        if "allocated" in per_rank[0][key]:
            results[key]["cuda_max_allocated"] = [r[key]["allocated"] for r in per_rank]
    base = results["1f1b/plain"]
    for result in results.values():
        result["measured_ratio"] = max(result["measured_bytes"]) / max(base["measured_bytes"])
        result["predicted_ratio"] = max(result["predicted_bytes"]) / max(base["predicted_bytes"])
        result["ratio_error"] = result["measured_ratio"] / result["predicted_ratio"] - 1
        result["step_vs_1f1b"] = result["step_ms"] / base["step_ms"]
        result["min_step_vs_1f1b"] = result["step_ms_min"] / base["step_ms_min"]
        result["cpu_vs_1f1b"] = result["cpu_ms"] / base["cpu_ms"]
    return results


def _environment(config: Config) -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "conveyor", "benchmarks"],
        capture_output=True,
        text=True,
    )
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "commit": commit.stdout.strip() + (" (modified)" if dirty.stdout.strip() else ""),
        "config": config.__dict__,
        "load_average": os.getloadavg(),  # at the end of the run: other work on the machine skews the step times
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Config()
    for field, value in defaults.__dict__.items():
        parser.add_argument(f"--{field}", type=type(value), default=value)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    config = Config(**{k: getattr(args, k) for k in defaults.__dict__})
    load_before = os.getloadavg()
    results = run(config)
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} (1 min)")
    print(
        f"{config.ranks} ranks, {config.microbatches} micro-batches of {config.rows} x {config.dim},"
        f" {config.num_blocks} blocks, {config.device}"
    )
    print(
        "| schedule | option | measured MiB (busiest rank) | predicted MiB | ratio to 1f1b measured | predicted"
        " | ratio error | ms/step median (min) | vs 1f1b median (min) | CPU ms/step | vs 1f1b |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        name, option = key.split("/")
        print(
            f"| {name} | {option} | {max(r['measured_bytes']) / 2**20:.2f} | {max(r['predicted_bytes']) / 2**20:.2f}"
            f" | {r['measured_ratio']:.3f} | {r['predicted_ratio']:.3f} | {r['ratio_error']:+.1%}"
            f" | {r['step_ms']:.1f} ({r['step_ms_min']:.1f}) | {r['step_vs_1f1b']:.3f} ({r['min_step_vs_1f1b']:.3f})"
            f" | {r['cpu_ms']:.1f} | {r['cpu_vs_1f1b']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as file:
            environment = {**_environment(config), "load_average_before": load_before}
            json.dump({"environment": environment, "results": results}, file, indent=2)


if __name__ == "__main__":
    main()

"""Train a plan for real and time its steps: what the plan benchmarks compare predictions with.

Ranks are spawned by `conveyor.spawn` (gloo, one torch thread each); the pipeline is built from the plan
(`split_with_plan`, its schedule, stages per rank, micro-batches and recompute) with AdamW, and each step
is timed on rank 0 between two barriers, as the simulator's synchronous step is defined.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from conveyor import Pipeline, spawn
from conveyor.models import GPT, GPTConfig, lm_loss
from conveyor.plan import Plan, split_with_plan

WARMUP = 2


def measure_plan(plan: Plan, config: GPTConfig, steps: int, timeout_s: float = 600) -> list[float]:
    """Seconds of each of `steps` steps (after WARMUP more) of `plan` on `config`'s GPT."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        spawn(_rank, plan.ranks, (plan, config, steps, out.name), timeout_s=timeout_s)
        return [float(t) for t in json.loads(Path(out.name).read_text())]


def _rank(rank: int, world: int, plan: Plan, config: GPTConfig, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    pipe = Pipeline(
        split_with_plan(lambda: GPT(config), plan),
        num_microbatches=plan.microbatches,
        loss_fn=lm_loss,
        schedule=plan.schedule,
        recompute=plan.recompute,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),
    )
    batch = plan.microbatches * plan.microbatch_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, config.context + 1), generator=generator)
    times = []
    for step in range(steps + WARMUP):
        dist.barrier()
        start = time.perf_counter()
        pipe.step(tokens[:, :-1], tokens[:, 1:])
        dist.barrier()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
    pipe.close()
    if rank == 0:
        Path(out).write_text(json.dumps(times))


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""

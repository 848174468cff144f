"""The runtime's own cost counted, not timed: instructions (and simulated cache misses) per step under valgrind.

`bench_overhead.py` times conveyor against a plain loop, the same actions by hand and torch's pipelining. On
the shared VMs this project runs on, a step's time moves by tens of percent from one second to the next, so a
difference of a few percent needs many alternating rounds and still spreads over runs. Counting does not
spread: each method runs in a process of its own under `valgrind --tool=callgrind`, instrumented (switched
on by `callgrind_control`) only around the counted steps, after warm-up steps, and the same code counts the
same instructions on every run. The methods, model and batch are `bench_overhead.py`'s (plain, by hand,
conveyor, torch: see there), on one torch thread.

With `--cache-sim`, callgrind also simulates the caches: misses of the first level (I1 for instructions, D1
for data) and of the last level (LL), for this machine's sizes as valgrind reads them. Its caches start empty
when counting starts, so an LL miss counts a line of memory a step touched first: the memory the counted steps
run through. Instructions are not time: the same instructions run slower where they miss the caches, which
is what separates the counts from `bench_overhead.py`'s clock.

    python benchmarks/count_overhead.py                              # the small model: the three cases
    python benchmarks/count_overhead.py --cases interleaved-1f1b:4 --cache-sim --json

Needs valgrind (`apt install valgrind`, which brings callgrind_control); each method takes a few minutes,
most of it importing torch under valgrind, and `--jobs` run at once (the counts do not depend on the load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# benchmarks/ is on the path of a script run from it
from bench_overhead import Config, Step, by_hand_step, conveyor_step, plain_step, torch_step
from bench_schedules import cpu_model

from conveyor.schedules import build_schedule

METHODS = ("plain", "by hand", "conveyor", "torch")
FIELDS = ("dim", "layers", "heads", "seq", "vocab", "microbatches", "microbatch_size", "cases", "steps", "warmup")
"""The fields of bench_overhead's Config this script takes as flags (and hands to its child processes)."""
CHILD_TIMEOUT_S = 3600
SIMULATED = {"I1mr": "I1 misses", "D1mr": "D1 read misses", "D1mw": "D1 write misses", "DLmr": "LL read misses",
             "DLmw": "LL write misses", "ILmr": "LL instruction misses"}  # fmt: skip


@dataclass(frozen=True)
class Counted:
    """One method's counts over its counted steps: callgrind's events by name (Ir: instructions)."""

    method: str
    steps: int
    events: dict[str, int]

    def per_step(self, event: str) -> float:
        return self.events[event] / self.steps


def parse_callgrind(text: str) -> dict[str, int]:
    """The totals of a callgrind output file, by event name (its `events:` line, then `summary:` or `totals:`)."""
    names: list[str] = []
    totals: list[int] | None = None
    for line in text.splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            totals = [int(n) for n in line.split()[1:]]
    if not names or totals is None:
        raise ValueError("not a callgrind output file: no events: line, or no summary: or totals: line")
    return dict(zip(names, totals + [0] * (len(names) - len(totals)), strict=True))


def method_step(cfg: Config, method: str, schedule: str, stages: int) -> Step | None:
    if method == "plain":
        return plain_step(cfg)
    if method == "by hand":
        return by_hand_step(cfg, schedule, stages)
    if method == "conveyor":
        return conveyor_step(cfg, schedule, stages)
    return torch_step(cfg, schedule, stages)


def run_child(cfg: Config, method: str, schedule: str, stages: int, toggle: bool) -> None:
    """In the counted process: build `method`, warm it up, then run the counted steps with counting on."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="count-overhead-") as scratch:
        rendezvous = os.path.join(scratch, "rendezvous")  # the store deletes it when the group ends
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
        try:
            step = method_step(cfg, method, schedule, stages)
            if step is None:
                print(f"{method}: no such schedule ({schedule}, {stages} stages)")
                return
            for _ in range(cfg.warmup):
                step()
            if toggle:
                _instrument("on")
            for _ in range(cfg.steps):
                step()
            if toggle:
                _instrument("off")
            print(f"{method}: counted {cfg.steps} steps of {schedule}:{stages}")
        finally:
            dist.destroy_process_group()


def _instrument(state: str) -> None:
    subprocess.run(["callgrind_control", "--instr=" + state, str(os.getpid())], check=True, capture_output=True)


def count(cfg: Config, method: str, schedule: str, stages: int, cache_sim: bool, scratch: str) -> Counted | None:
    """Run `method` in a child process under callgrind; its counts, or None where the method cannot run the case."""
    out = os.path.join(scratch, f"{method.replace(' ', '-')}-{schedule}-{stages}.out")
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    if cache_sim:
        command.append("--cache-sim=yes")
    command += [sys.executable, __file__, *config_flags(cfg), "--child", method, "--cases", f"{schedule}:{stages}"]
    try:  # a few minutes is usual (importing torch under valgrind); an hour means the child is stuck
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{method} on {schedule}:{stages} ran over {CHILD_TIMEOUT_S} s under valgrind") from None
    if done.returncode:
        raise RuntimeError(f"{method} on {schedule}:{stages} failed under valgrind:\n{done.stderr[-3000:]}")
    if "counted" not in done.stdout:
        return None
    with open(out) as f:
        return Counted(method, cfg.steps, parse_callgrind(f.read()))


def config_flags(cfg: Config) -> list[str]:
    """The flags that give a child process this configuration."""
    return [f"--{name.replace('_', '-')}={getattr(cfg, name)}" for name in FIELDS if name != "cases"]


def summarize(cfg: Config, counted: dict[tuple[str, int], list[Counted]]) -> list[dict[str, Any]]:
    cases = []
    for (schedule, stages), results in counted.items():
        by_method = {c.method: c for c in results}
        plain = by_method["plain"].per_step("Ir")
        actions = len(build_schedule(cfg.spec(schedule, stages)).actions[0])
        case: dict[str, Any] = {
            "schedule": schedule,
            "stages": stages,
            "actions": actions,
            "per_step": {c.method: {e: c.per_step(e) for e in c.events} for c in results},
            "instructions_over_plain": {c.method: c.per_step("Ir") / plain for c in results},
        }
        if "conveyor" in by_method and "by hand" in by_method:
            extra = by_method["conveyor"].per_step("Ir") - by_method["by hand"].per_step("Ir")
            case["conveyor_minus_by_hand_instructions_per_action"] = extra / actions
        cases.append(case)
    return cases


def format_report(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    lines = [
        f"one process, 1 thread; GPT {cfg['layers']} layers, dim {cfg['dim']}, {cfg['microbatches']} micro-batches of"
        f" {cfg['microbatch_size']}x{cfg['seq']} tokens, SGD; {cfg['steps']} counted steps per method after"
        f" {cfg['warmup']} warm-up steps; callgrind, per step",
    ]
    for case in summary["cases"]:
        events = [e for e in SIMULATED if all(e in counts for counts in case["per_step"].values())]
        lines += ["", f"{case['schedule']}, {case['stages']} stage(s), {case['actions']} actions:"]
        lines.append("  method       instructions  / plain" + "".join(f"  {SIMULATED[e]:>22s}" for e in events))
        for method, counts in case["per_step"].items():
            ratio = case["instructions_over_plain"][method]
            row = f"  {method:10s} {counts['Ir']:14,.0f}  {ratio:7.4f}"
            lines.append(row + "".join(f"  {counts[e]:22,.0f}" for e in events))
        extra = case.get("conveyor_minus_by_hand_instructions_per_action")
        if extra is not None:
            lines.append(f"  conveyor over the same actions by hand: {extra:+,.0f} instructions per action")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config(steps=2)
    for name in FIELDS:
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=f"({default})")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    parser.add_argument("--cache-sim", action="store_true", help="also simulate the caches (slower)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="methods counted at once")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)  # the counted process
    parser.add_argument("--no-toggle", action="store_true", help=argparse.SUPPRESS)  # a child not under valgrind
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = Config(**{name: getattr(args, name) for name in FIELDS})
    if args.child:
        [(schedule, stages)] = cfg.parsed_cases
        run_child(cfg, args.child, schedule, stages, toggle=not args.no_toggle)
        return
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"count_overhead.py counts under callgrind: {', '.join(missing)} not found (apt install valgrind)")
    methods = [m.strip() for m in args.methods.split(",")]
    if "plain" not in methods or not set(methods) <= set(METHODS):
        sys.exit(f"--methods: plain (the baseline) and any of {', '.join(METHODS[1:])}; got {args.methods!r}")
    jobs = [(schedule, stages, method) for schedule, stages in cfg.parsed_cases for method in methods]
    with tempfile.TemporaryDirectory(prefix="count-overhead-") as scratch, ThreadPoolExecutor(args.jobs) as pool:
        futures = [(s, n, pool.submit(count, cfg, m, s, n, args.cache_sim, scratch)) for s, n, m in jobs]
        counted: dict[tuple[str, int], list[Counted]] = {}
        for schedule, stages, future in futures:
            result = future.result()
            if result is not None:
                counted.setdefault((schedule, stages), []).append(result)
    summary = {
        "config": {name: getattr(cfg, name) for name in FIELDS} | {"cache_sim": args.cache_sim},
        "machine": {
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "valgrind": subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip(),
        },
        "cases": summarize(cfg, counted),
    }
    print(json.dumps(summary, indent=2) if args.json else format_report(summary))


if __name__ == "__main__":
    main()

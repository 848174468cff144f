"""Does keeping freed host memory pay? The same pipeline run with it (conveyor's default) and without
(CONVEYOR_KEEP_HOST_MEMORY=0: glibc's own policy, which hands a step's freed memory back to the system).

`conveyor train`'s default GPT (1F1B, 4 micro-batches, the even split) and Hugging Face's GPT-2 at the same
sizes (1F1B and DualPipeV), on 2 spawned gloo ranks with one thread each and AdamW; a step is timed on rank 0
between two barriers (`plan_measure.py`, which also sets aside steps in which a rank queued for a CPU). The
two settings alternate run by run, so drift of the machine hits both.

    python benchmarks/host_memory.py
    python benchmarks/host_memory.py --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from plan_measure import Measured, Workload, add_quiet_wait_flag, measure_plans, now, provenance

from conveyor.observe.profile import LayerProfile
from conveyor.plan import make_plan, profile_model
from conveyor.schedules import PipelineSpec
from conveyor.train import TrainConfig

OFF = "CONVEYOR_KEEP_HOST_MEMORY"
CASES = (("gpt", "1f1b", "uniform"), ("gpt2", "1f1b", "uniform"), ("gpt2", "dualpipev", "auto"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run (after 2 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=3)
    sizes = TrainConfig()
    parser.add_argument("--dim", type=int, default=sizes.dim, help="model width, as `conveyor train --dim`")
    parser.add_argument("--layers", type=int, default=sizes.layers, help="blocks, as `conveyor train --layers`")
    parser.add_argument("--context", type=int, default=sizes.context, help="tokens per sequence, as `--context`")
    labels = [":".join(case) for case in CASES]
    parser.add_argument(
        "--cases", nargs="+", choices=labels, default=labels, help="which of the pipelines to run (all three)"
    )
    add_quiet_wait_flag(parser)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = now()
    cases = [case for case in CASES if ":".join(case) in args.cases]
    sized = {"dim": args.dim, "layers": args.layers, "context": args.context}
    profiles = {model: _profile(TrainConfig(model=model, **sized)) for model in dict.fromkeys(m for m, _, _ in cases)}
    plans = {
        (model, schedule, method): (
            profiles[model][0],
            make_plan(profiles[model][1], PipelineSpec(schedule, 2, 4), method=method),
        )
        for model, schedule, method in cases
    }
    times = {(case, kept): Measured() for case in cases for kept in (True, False)}
    for _ in range(args.rounds):
        for case, (workload, plan) in plans.items():
            for kept in (True, False):
                if kept:
                    os.environ.pop(OFF, None)
                else:
                    os.environ[OFF] = "0"  # the spawned ranks inherit it
                # A process setting: the two run apart.
                measure_plans([plan], workload, args.steps, [times[(case, kept)]], args.quiet_wait_s)
    os.environ.pop(OFF, None)
    rows = []
    for case, (_, plan) in plans.items():
        kept, freed = times[(case, True)], times[(case, False)]
        rows.append(
            {
                "model": case[0],
                "schedule": plan.spec.schedule,
                "layers_per_stage": list(plan.layers_per_stage),
                "kept_s": kept.median,
                "default_s": freed.median,
                "ratio": kept.median / freed.median,
                "kept": kept.to_json(),
                "default": freed.to_json(),
            }
        )
        print(
            f"{case[0]:<5} {plan.spec.schedule:<10} {list(plan.layers_per_stage)}: kept {kept.median * 1e3:.1f} ms,"
            f" glibc's default {freed.median * 1e3:.1f} ms, ratio {kept.median / freed.median:.3f}"
            f" ({len(kept.undisturbed)}/{len(kept.times)} and {len(freed.undisturbed)}/{len(freed.times)}"
            " undisturbed steps)"
        )
    if args.json:
        report = {
            **provenance(started),
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def _profile(sizes: TrainConfig) -> tuple[Workload, LayerProfile]:
    """`conveyor train`'s model at `sizes` and its profile at 4 sequences per micro-batch, what the cases' plans
    cut by (2 ranks, 4 micro-batches)."""
    model = sizes.model
    workload = Workload(model, sizes.source.hf_config() if model == "gpt2" else sizes.source.gpt_config())
    tokens = workload.tokens(4)
    return workload, profile_model(
        workload.builder(), tokens[:, :-1], tokens[:, 1:], workload.loss, split=workload.split
    )


if __name__ == "__main__":
    sys.exit(main())

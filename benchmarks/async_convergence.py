"""Loss after the same samples: `conveyor train` under 1f1b, pipedream and pipedream-2bw, and 2BW's rule on one process.

Each schedule trains `conveyor train`'s default task (its GPT on the standard
library's source, AdamW, lr 1e-3 unless --lr, 16 x 128 tokens a step) for the same steps,
so every schedule sees the same samples in the same order. One process then
trains the same model two ways without any pipeline: plainly (what 1f1b must
equal) and with 2BW's one-step-delayed gradient, W(t+1) = W(t) - step(grad
f(W(t-1))) (what pipedream-2bw must equal). The losses compared are the mean
of each run's last 5 steps.

    python benchmarks/async_convergence.py --steps 100 --json out.json
    python benchmarks/async_convergence.py --steps 300 --lr 3e-4 --schedules 1f1b,pipedream-2bw --no-one-process
    python benchmarks/async_convergence.py --steps 300 --warmup-steps 50 --lr-decay cosine
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys

import torch

from conveyor.data import Batches
from conveyor.losses import causal_lm
from conveyor.models import GPT
from conveyor.train import TrainConfig, sequences

SCHEDULES = ("1f1b", "pipedream", "pipedream-2bw")


def pipeline_loss(schedule: str, config: TrainConfig) -> float:
    """The mean of the last 5 steps' losses that `conveyor train` prints."""
    command = [sys.executable, "-m", "conveyor", "train", "--schedule", schedule, "--steps", str(config.steps)]
    command += ["--lr", str(config.lr), "--warmup-steps", str(config.warmup_steps), "--lr-decay", config.lr_decay]
    command += ["--dim", str(config.dim), "--layers", str(config.layers), "--context", str(config.context)]
    command += ["--batch-size", str(config.batch_size)]
    command.append("--no-progress")
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("loss "))
    return float(line.split("mean of the last 5 steps ")[1].split(")")[0])


def one_process_loss(config: TrainConfig, delayed: bool) -> float:
    """`conveyor train`'s model, data, optimizer and learning rates on one process; with `delayed`, 2BW's
    update rule."""
    torch.set_num_threads(2)
    torch.manual_seed(0)  # the weights conveyor train's seed 0 gives every stage
    model = GPT(config.source.gpt_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    data = Batches(sequences(config, config.source)[0], config.batch_size, seed=0)  # conveyor train's batches
    previous = copy.deepcopy(model)  # W(t - 1)
    losses = []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate(step)
        x, y = next(data)
        used = previous if delayed else model
        used.zero_grad(set_to_none=True)
        loss = causal_lm(used(x), y)
        loss.backward()
        if delayed:
            kept = copy.deepcopy(model)
            for param, grad_of in zip(model.parameters(), previous.parameters(), strict=True):
                param.grad = grad_of.grad
            previous = kept
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return sum(losses[-5:]) / 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW's (peak) learning rate, for every run")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, as conveyor train's")
    parser.add_argument("--lr-decay", default="none", choices=("none", "cosine"), help="as conveyor train's")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="which pipelines to train (1f1b first)")
    sizes = TrainConfig()
    parser.add_argument("--dim", type=int, default=sizes.dim, help="model width, as conveyor train's")
    parser.add_argument("--layers", type=int, default=sizes.layers, help="blocks, as conveyor train's")
    parser.add_argument("--context", type=int, default=sizes.context, help="bytes per sequence, as conveyor train's")
    parser.add_argument(
        "--batch-size", type=int, default=sizes.batch_size, help="sequences a step, as conveyor train's"
    )
    parser.add_argument("--no-one-process", action="store_true", help="skip the two single-process references")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    config = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        lr_decay=args.lr_decay,
        dim=args.dim,
        layers=args.layers,
        context=args.context,
        batch_size=args.batch_size,
    )
    results: dict[str, float] = {name: pipeline_loss(name, config) for name in args.schedules.split(",")}
    if not args.no_one_process:
        results["one process"] = one_process_loss(config, False)
        results["one process, 2BW's rule"] = one_process_loss(config, True)
    base = results["1f1b"]
    for name, loss in results.items():
        print(f"{name:24s} {loss:.4f}  ({100 * (loss / base - 1):+.1f} % against 1f1b)")
    if args.json:
        with open(args.json, "w") as file:
            run = {"steps": args.steps, "lr": args.lr, "warmup_steps": args.warmup_steps, "lr_decay": args.lr_decay}
            run.update({"dim": args.dim, "layers": args.layers, "context": args.context, "batch_size": args.batch_size})
            run.update({"python": sys.version.split()[0], "losses": results})
            json.dump(run, file, indent=2)


if __name__ == "__main__":
    main()

"""The `conveyor` command line (also `python -m conveyor`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from .schedules import SCHEDULES, build_schedule, render_steps, render_timeline, validate
from .train import TrainConfig, train

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conveyor", description="Pipeline-parallel training for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser("train", help="train a small GPT on the Python standard library's source")
    defaults = TrainConfig()
    for field in fields(TrainConfig):
        if field.name == "progress":
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = type(getattr(defaults, field.name))
        help_text = f"{field.metadata['help']} (default: {getattr(defaults, field.name)})"
        if field.name == "schedule":
            train_parser.add_argument(flag, choices=list(SCHEDULES), default=defaults.schedule, help=help_text)
        else:
            train_parser.add_argument(flag, type=kind, default=getattr(defaults, field.name), help=help_text)
    train_parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    show = commands.add_parser("show", help="print a schedule's per-rank actions and its timeline on a unit clock")
    show.add_argument("schedule", choices=list(SCHEDULES))
    show.add_argument("--stages", type=int, default=4)
    show.add_argument("--microbatches", type=int, default=8)

    args = parser.parse_args(argv)
    if args.command == "train":
        values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "progress"}
        try:
            config = TrainConfig(**values, progress=not args.no_progress)
        except ValueError as error:
            parser.error(str(error))
        try:
            train(config)
        except (ProcessRaisedException, ProcessExitedException, TimeoutError) as error:
            # The failing rank's own traceback is in the message; ours would only add noise.
            print(f"conveyor train failed: {error}", file=sys.stderr)
            return 1
    elif args.command == "show":
        program = build_schedule(args.schedule, args.stages, args.microbatches)
        print(render_steps(program))
        print()
        print(render_timeline(program, validate(program)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `conveyor` command line (also `python -m conveyor`)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import fields

import torch
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from .export import FORMATS, export_checkpoint
from .launch import exit_rank, under_torchrun
from .models import GPT, lm_loss
from .observe.profile import profile_stages
from .observe.simulate import load_costs, save_costs, simulate
from .observe.timeline import draw_timeline, spans_from_timing
from .observe.transfers import measure_transfers, with_transfers
from .plan.command import add_plan_parser, run_plan
from .schedules import (
    RECOMPUTE,
    SCHEDULES,
    PipelineSpec,
    Program,
    build_schedule,
    render_steps,
    render_timeline,
    validate,
)
from .split import manual_split
from .train import TrainConfig, read_config, train

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conveyor", description="Pipeline-parallel training for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser(
        "train", help="train a model (a small GPT on the Python standard library's source by default) in a pipeline"
    )
    train_parser.add_argument(
        "--config",
        help="a TOML file of these settings (or a preset: gpt-small, gpt2-124m); the flags given override it",
    )
    defaults = TrainConfig()
    for field in fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = type(getattr(defaults, field.name))
        help_text = f"{field.metadata['help']} (default: {getattr(defaults, field.name)})"
        if kind is bool:  # a switch: --name turns on what is off by default, --no-name turns off what is on
            on = getattr(defaults, field.name)
            switch = "--no-" + field.name.replace("_", "-") if on else flag
            train_parser.add_argument(
                switch, dest=field.name, action="store_false" if on else "store_true", help=field.metadata["help"]
            )
        elif field.name == "recompute":
            train_parser.add_argument(flag, choices=list(RECOMPUTE), default=defaults.recompute, help=help_text)
        elif field.name == "schedule":
            train_parser.add_argument(flag, choices=list(SCHEDULES), default=defaults.schedule, help=help_text)
        else:
            train_parser.add_argument(flag, type=kind, default=getattr(defaults, field.name), help=help_text)

    commands.add_parser("schedules", help="list every schedule with its constraints, memory and bubble")

    export = commands.add_parser(
        "export",
        help="write a checkpoint of `conveyor train` as the unsplit model: a state_dict (.pt, .safetensors) or a"
        " Hugging Face folder",
    )
    export.add_argument("checkpoint", help="a checkpoint folder (step-<n>), or a --checkpoint-dir for its latest")
    export.add_argument(
        "--out", required=True, help="model.pt, model.safetensors, or a folder for --format hf (from_pretrained)"
    )
    export.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="hf: a folder transformers loads with from_pretrained (config, safetensors, tokenizer); auto:"
        " safetensors for a .safetensors name, else torch.save (default: %(default)s)",
    )

    prof = commands.add_parser(
        "profile", help="measure F, B, W per stage and activation bytes of `conveyor train`'s model, for simulate"
    )
    for name in ("ranks", "virtual", "microbatches", "batch_size", "context", "dim", "layers", "heads", "threads"):
        prof.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    prof.add_argument("--schedule", choices=list(SCHEDULES), default=defaults.schedule, help="fixes stages per rank")
    prof.add_argument(
        "--no-transfers",
        dest="transfers",
        action="store_false",
        help="give messages between ranks no time (default: measure them, 2 ranks on this machine, a few seconds)",
    )
    prof.add_argument(
        "--out", default="costs.json", help="cost file for `conveyor simulate --costs` (default: %(default)s)"
    )

    show = commands.add_parser("show", help="print a schedule's per-rank actions and its timeline on a unit clock")
    show.add_argument("schedule", choices=list(SCHEDULES))
    show.add_argument("--ranks", type=int, default=4, help="pipeline ranks P (default: 4)")
    show.add_argument("--microbatches", type=int, default=8)
    show.add_argument("--virtual", type=int, help="stages per rank (default: the schedule's)")
    _stream_flags(show, default=2)
    show.add_argument("--offload", default="none", help="stages that offload activations: none, all or 0,1")

    plan_parser = add_plan_parser(commands, defaults)

    sim = commands.add_parser("simulate", help="predict a schedule's step time, bubble and memory from a cost model")
    sim.add_argument("--schedule", required=True, choices=list(SCHEDULES))
    sim.add_argument("--ranks", type=int, required=True, help="pipeline ranks P")
    sim.add_argument("--microbatches", type=int, required=True)
    sim.add_argument("--virtual", type=int, help="stages per rank (default: the schedule's)")
    _stream_flags(sim, default=4)
    sim.add_argument("--offload", default="none", help="stages that offload activations: none, all or 0,1")
    sim.add_argument(
        "--costs",
        default="f=1,b=1,w=1,comm=0",
        help="per-stage durations: 'f=1,b=2,w=1,comm=0.1,bytes=1e6' for all stages (whole=X: a backward"
        " run whole, default b+w; send, recv and late: how long a send, a receive's post, and a post after"
        " its message arrived keep their rank busy), ';' between stages for one set each, or a profile JSON"
        " file written by `conveyor profile` (default: %(default)s)",
    )
    sim.add_argument("--json", action="store_true", help="print JSON instead of text")
    sim.add_argument("--plot", metavar="PNG", help="also draw the timeline to this image")

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        _config_defaults(train_parser, parser, argv[1:])
    args = parser.parse_args(argv)
    if args.command == "train":
        values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
        try:
            config = TrainConfig(**values)
        except ValueError as error:
            parser.error(str(error))
        try:
            train(config)
        except (ProcessRaisedException, ProcessExitedException, TimeoutError) as error:
            # The failing rank's own traceback is in the message; ours would only add noise.
            print(f"conveyor train failed: {error}", file=sys.stderr)
            return 1
        if under_torchrun():
            exit_rank()  # this process is a rank that is done: end it as spawned ranks end
    elif args.command == "profile":
        return _profile(args, parser)
    elif args.command == "schedules":
        _list_schedules()
    elif args.command == "export":
        try:
            print(f"wrote {export_checkpoint(args.checkpoint, args.out, args.format)}")
        except (ValueError, OSError) as error:
            parser.error(str(error))
    elif args.command == "plan":
        return run_plan(args, plan_parser)
    elif args.command == "simulate":
        return _simulate(args, parser)
    elif args.command == "show":
        try:
            program = _program(args)
        except ValueError as error:
            parser.error(str(error))
        print(render_steps(program))
        print()
        print(render_timeline(program, validate(program)))
    return 0


def _profile(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    values = {k: getattr(args, k) for k in ("ranks", "schedule", "virtual", "microbatches", "batch_size", "context")}
    try:
        config = TrainConfig(**values, dim=args.dim, layers=args.layers, heads=args.heads, threads=args.threads)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(config.threads)
    stages = config.spec.num_stages
    gpt = config.source.gpt_config()
    split = manual_split(lambda: GPT(gpt), stages)
    modules = [split.build_stage(s) for s in range(stages)]
    micro = -(-config.batch_size // config.microbatches)  # the largest micro-batch
    tokens = torch.randint(0, gpt.vocab_size, (micro, config.context + 1))
    costs = profile_stages(modules, tokens[:, :-1], tokens[:, 1:], lm_loss)
    if args.transfers:
        costs = with_transfers(costs, measure_transfers(micro * config.context * config.dim * 4))
    save_costs(costs, args.out)
    for index, stage in enumerate(costs.stages):
        print(
            f"stage {index}: F {stage.forward * 1e3:.2f} ms, B {stage.backward * 1e3:.2f} ms,"
            f" W {stage.weight * 1e3:.2f} ms, whole backward {stage.whole_backward * 1e3:.2f} ms,"
            f" {(stage.activation_bytes or 0) / 2**20:.1f} MiB held per micro-batch"
        )
    print(
        f"each message: send {costs.send * 1e3:.3f} ms, receive's post {costs.recv * 1e3:.3f} ms"
        f" ({(costs.late_recv or costs.recv) * 1e3:.3f} ms after its message arrived), latency"
        f" {costs.latency * 1e3:.3f} ms; written to {args.out}"
    )
    return 0


def _stream_flags(command: argparse.ArgumentParser, default: int) -> None:
    command.add_argument(
        "--minibatches",
        type=int,
        default=default,
        help=f"asynchronous schedules: mini-batches the program streams before it drains (default: {default})",
    )
    command.add_argument("--vertical-sync", action="store_true", help="pipedream: every stage uses one version")
    command.add_argument(
        "--replicas",
        type=_replica_counts,
        help="1F1B-RR: ranks per stage, e.g. 2,1 (gpipe, 1f1b, pipedream, pipedream-2bw; --ranks counts them all)",
    )


def _config_defaults(train_parser: argparse.ArgumentParser, parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """With --config, the file's values become the defaults, so that the flags given still win."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config")
    known, _ = early.parse_known_args(argv)
    if known.config:
        try:
            train_parser.set_defaults(**read_config(known.config))
        except (ValueError, OSError) as error:
            parser.error(str(error))


def _replica_counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(word) for word in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"ranks per stage, e.g. 2,1; got {text!r}") from None


def _program(args: argparse.Namespace) -> Program:
    """The program `show` and `simulate` look at: a stream of mini-batches for an asynchronous schedule."""
    spec = PipelineSpec(
        args.schedule,
        args.ranks,
        args.microbatches,
        args.virtual or 0,
        replicas=args.replicas,
        vertical_sync=args.vertical_sync,
        offload=args.offload,
    )
    return build_schedule(spec, mini_batches=args.minibatches if spec.asynchronous else 1)


def _list_schedules() -> None:
    columns = ("name", "stages per rank", "micro-batches", "peak activations", "bubble (equal F, B, W)", "staleness")
    rows = [(i.name, i.stages_per_rank, i.microbatches, i.memory, i.bubble, i.staleness) for i in SCHEDULES.values()]
    widths = [max(len(str(row[k])) for row in [columns, *rows]) for k in range(len(columns))]
    for row in [columns, tuple("-" * w for w in widths), *rows]:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=True)).rstrip())
    print(
        "\nP: ranks, m: micro-batches, v: stages per rank, r: a rank. Activations in micro-batches of one stage,"
        " busiest rank. Staleness: updates between the weights a gradient was computed with and those it"
        " updates. The async schedules (PipeDream) never flush between mini-batches; their backwards use"
        " stashed weight versions."
    )


def _simulate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        if args.plot and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot draws with matplotlib: pip install 'conveyor[plot]'")
        program = _program(args)
        costs = load_costs(args.costs)
        result = simulate(program, costs)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        if program.replicated:
            counts = ",".join(str(len(program.replicas_of(s))) for s in range(program.num_stages))
            placed = f"{args.ranks} ranks holding {program.num_stages} stages (replicas {counts})"
        else:
            placed = f"{args.ranks} ranks x {program.num_stages // program.num_ranks} stage(s)"
        print(f"{args.schedule}: {placed}, {args.microbatches} micro-batches")
        print(f"step time        {result.step_time:.6g} (synchronous: first start to last end over all ranks)")
        print(f"bubble fraction  {result.bubble_fraction:.4f} (of the synchronous step)")
        if not program.asynchronous:
            print(f"period           {result.period:.6g} (steady state: steps back to back, nothing global between)")
            print(f"period bubble    {result.period_bubble_fraction:.4f} (of the period)")
        print(f"peak activations {result.peak_activations} (micro-batches, per rank)")
        print(f"peak, full-size  {result.peak_full_stages:.4g} (busiest rank, in micro-batches of a 1/P share)")
        if result.peak_activation_bytes is not None:
            print(f"peak bytes       {[f'{b:.4g}' for b in result.peak_activation_bytes]}")
        if program.asynchronous:
            print(f"streamed         {args.minibatches} mini-batches, {program.num_microbatches} micro-batches")
            print(f"throughput       {result.throughput:.4g} micro-batches per time unit")
            print(f"weight versions  {result.weight_versions} (held at most, per stage)")
            print(f"staleness        {result.staleness} (updates, per stage)")
            if result.peak_weight_bytes is not None:
                print(f"weight bytes     {[f'{b:.4g}' for b in result.peak_weight_bytes]}")
    if args.plot:
        title = f"{args.schedule}, {args.ranks} ranks, {args.microbatches} micro-batches (simulated)"
        path = draw_timeline(spans_from_timing(program, result.timing), args.plot, title)
        print(f"timeline written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

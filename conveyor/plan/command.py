"""`conveyor plan`: profile `conveyor train`'s model (its GPT, or GPT-2 traced) per layer, choose a split (or,
with --search, the whole configuration), print it and write the plan file that `conveyor train --plan` reads."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..models import GPT, GPTConfig, lm_loss
from ..models.gpt2 import gpt2_lm, logits_loss, sized_gpt2_config
from ..observe.host_copy import measure_host_copy
from ..observe.profile import OPTIMIZER_STATES, LayerProfile
from ..observe.transfers import TransferCosts
from ..schedules import RECOMPUTE, SCHEDULES, PipelineSpec, build_schedule
from .cost import OFFLOAD_SETTINGS, offload_for
from .layers import fingerprint, layer_split, profile_model, traced_fingerprint, with_measured_transfers
from .partition import EXACT_LIMIT, METHODS, PlanError
from .plan_file import Plan
from .profiles import cached_profile, store_profile
from .search import make_plan, search, trade

__all__ = ["add_plan_parser", "parse_bytes", "ranking_table", "run_plan", "train_command"]

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str) -> float:
    """`512MiB`, `2GiB`, `1.5e9` (bytes) -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"a memory size such as 512MiB, 2GiB or 1e9 (bytes); got {text!r}")
    try:
        return float(match.group(1)) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a memory size such as 512MiB, 2GiB or 1e9; got {text!r}") from None


def _counts(text: str) -> list[int]:
    try:
        counts = [int(word) for word in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"micro-batch counts, e.g. 2,4,8; got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"micro-batch counts must be at least 1; got {text!r}")
    return counts


def add_plan_parser(commands: Any, defaults: Any) -> argparse.ArgumentParser:
    """The `plan` subcommand; `defaults` is a TrainConfig, whose model sizes it plans for."""
    plan = commands.add_parser(
        "plan",
        help="profile `conveyor train`'s model per layer and choose its split (--search: and the schedule,"
        " micro-batches, recompute and offload) that train fastest within memory; writes a plan for `train --plan`",
    )
    plan.add_argument("--model", choices=["gpt", "gpt2"], default=defaults.model, help="as `conveyor train --model`")
    plan.add_argument("--model-config", default="", help="--model gpt2: GPT-2 config fields, as `conveyor train`")
    for name in ("ranks", "microbatches", "batch_size", "context", "dim", "layers", "heads", "threads", "seed"):
        plan.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    plan.add_argument("--schedule", choices=list(SCHEDULES), default=defaults.schedule)
    plan.add_argument("--virtual", type=int, default=0, help="stages per rank (default: the schedule's)")
    plan.add_argument("--recompute", choices=list(RECOMPUTE), default="none")
    plan.add_argument(
        "--offload",
        choices=list(OFFLOAD_SETTINGS),
        default="none",
        help="all: every stage that does not recompute offloads activations to host memory (--search tries both)",
    )
    plan.add_argument("--method", choices=list(METHODS), default="auto", help="auto: time within --memory")
    plan.add_argument("--memory", type=parse_bytes, help="per-rank memory cap, e.g. 512MiB or 2GiB (default: none)")
    plan.add_argument(
        "--optimizer", choices=list(OPTIMIZER_STATES), default="adamw", help="whose state counts (train: adamw)"
    )
    plan.add_argument("--search", action="store_true", help="rank schedules x micro-batches x recompute x offload too")
    plan.add_argument("--microbatch-counts", type=_counts, help="--search: micro-batch counts to try")
    plan.add_argument("--top", type=int, default=5, help="--search: how many configurations to show")
    plan.add_argument(
        "--repeats", type=int, default=7, help="timed runs of each layer at least (median); see --profile-seconds"
    )
    plan.add_argument(
        "--profile-seconds",
        type=float,
        default=0.0,
        help="time the layers, round after round, for at least this long (default: --repeats rounds, however"
        " long): a few seconds' profile samples a shared machine's speed over a few seconds (docs/planning.md)",
    )
    plan.add_argument(
        "--no-transfers",
        dest="transfers",
        action="store_false",
        help="give messages between ranks no time (default: measure their latency and the time a send and a"
        " receive's post take, 2 ranks on this machine, a few seconds, kept with the profile)",
    )
    plan.add_argument(
        "--slowdown",
        action="store_true",
        help="also measure how much slower the layers compute in a pipeline's rank than alone (a spawned partner"
        " computing the model's layers, about 20-30 s for the default GPT; --model gpt only), and scale the"
        " predictions by it, kept with the profile (docs/planning.md)",
    )
    plan.add_argument("--exact-limit", type=int, default=EXACT_LIMIT, help="most splits searched exhaustively")
    plan.add_argument(
        "--profile", default="conveyor-profile.json", help="profile file, read and extended (default: %(default)s)"
    )
    plan.add_argument("--out", default="plan.json", help="the plan file (default: %(default)s)")
    return plan


def run_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.profile_seconds < 0:
        parser.error(f"--profile-seconds must be at least 0; got {args.profile_seconds}")
    if min(args.layers, args.batch_size, args.ranks, args.repeats, args.heads) < 1 or args.dim % args.heads:
        parser.error(
            "--layers, --batch-size, --ranks, --repeats and --heads must be at least 1, and --dim a multiple of --heads"
        )
    if args.slowdown and args.model == "gpt2":
        parser.error("--slowdown is measured for a manual split's layers only (--model gpt)")
    if args.model_config and args.model != "gpt2":
        parser.error("--model-config sets GPT-2 fields: use it with --model gpt2")
    torch.set_num_threads(args.threads)
    try:
        model = _model(args)
    except (ImportError, ValueError) as error:
        parser.error(str(error))

    def profile_for(m: int) -> LayerProfile:
        size = -(-args.batch_size // m)  # the largest micro-batch

        def measure() -> LayerProfile:
            tokens = torch.randint(
                0, model.vocab_size, (size, args.context + 1), generator=torch.Generator().manual_seed(0)
            )
            found = profile_model(
                model.build,
                tokens[:, :-1],
                tokens[:, 1:],
                model.loss,
                split=model.split,
                optimizer=args.optimizer,
                seed=args.seed,
                repeats=args.repeats,
                min_seconds=args.profile_seconds,
                slowdown=args.slowdown,
            )
            return with_measured_transfers(found) if args.transfers else found

        profile, measured = cached_profile(args.profile, model.fingerprint, size, args.optimizer, measure)
        if args.slowdown and profile.slowdown is None:  # kept by a profile that did not measure it
            profile, measured = measure(), True
            store_profile(args.profile, profile)
        how = "measured" if measured else "reused"
        print(f"profile of micro-batches of {size} x {args.context} tokens: {how} ({args.profile})")
        # A profile kept by an earlier `--no-transfers`, or from before late posts were measured.
        if args.transfers and (profile.transfers is None or profile.transfers.late_recv is None):
            profile = with_measured_transfers(profile)
            store_profile(args.profile, profile)
        if args.slowdown:
            print(f"computes {profile.slowdown:.3f}x slower in a pipeline's rank than alone (predictions scaled)")
        # Predict as asked; what the file keeps stays there for the next run that asks for it.
        return dataclasses.replace(
            profile,
            transfers=profile.transfers if args.transfers else None,
            slowdown=profile.slowdown if args.slowdown else None,
        )

    try:
        if args.search:
            return _search(args, profile_for)
        if args.microbatches > args.batch_size:
            raise ValueError(f"{args.microbatches} micro-batches need a batch size of at least that")
        spec = PipelineSpec(args.schedule, args.ranks, args.microbatches, args.virtual, recompute=args.recompute)
        spec = replace(spec, offload=offload_for(args.offload, args.recompute, spec.num_stages))
        plan = make_plan(
            profile_for(args.microbatches),
            spec,
            method=args.method,
            memory_cap=args.memory,
            host_copy=_host_copy() if args.offload != "none" else None,
            exact_limit=args.exact_limit,
        )
    except (PlanError, ValueError) as error:
        parser.error(str(error).splitlines()[0] if not isinstance(error, PlanError) else str(error))
    _print_plan(plan)
    plan.save(args.out)
    print(f"plan written to {args.out}; train with it:\n  {train_command(plan, args)}")
    return 0


@dataclasses.dataclass(frozen=True)
class _Model:
    """What `conveyor train --model` trains, as the planner needs it."""

    build: Callable[[], Any]
    loss: Callable[[Any, Any], Any]
    split: str
    vocab_size: int
    fingerprint: str


def _model(args: argparse.Namespace) -> _Model:
    if args.model == "gpt2":
        config = sized_gpt2_config(args.dim, args.layers, args.heads, args.context, args.model_config)
        build = gpt2_lm(config)
        return _Model(build, logits_loss, "traced", config.vocab_size, traced_fingerprint(build))
    gpt = GPTConfig(context=args.context, dim=args.dim, layers=args.layers, heads=args.heads)

    def build_gpt() -> Any:
        return GPT(gpt)

    return _Model(build_gpt, lm_loss, "manual", gpt.vocab_size, fingerprint(layer_split(build_gpt, seed=args.seed)))


def _host_copy() -> Any:
    """What an offload's copies cost here (the planner profiles on the CPU), measured in a fraction of a second."""
    copy = measure_host_copy("cpu")
    print(f"host copies: {1 / copy.seconds_per_byte / 2**30:.1f} GiB/s each way (measured at {copy.nbytes >> 20} MiB)")
    return copy


def _search(args: argparse.Namespace, profile_for: Any) -> int:
    counts = args.microbatch_counts or [m for m in (1, 2, 4, 8, 16, 32) if args.ranks <= m <= args.batch_size]
    counts = [m for m in counts if m <= args.batch_size]
    copy = _host_copy()
    plans, refused = search(
        profile_for, args.ranks, counts, host_copy=copy, memory_cap=args.memory, exact_limit=args.exact_limit
    )
    if not plans:
        reasons = "; ".join(
            f"{r.schedule} m={r.microbatches} recompute {r.recompute} offload {r.offload}: {r.why}" for r in refused[:5]
        )
        raise PlanError(f"no configuration fits: {reasons}")
    print(ranking_table(plans[: args.top]))
    print(f"{len(plans)} configurations ranked, {len(refused)} did not apply or fit; best written to {args.out}")
    best = plans[0]
    best.save(args.out)
    print()
    _print_plan(best)
    if args.memory is not None:
        # Without a cap recompute and offload only add time, so the fastest plan of all keeps everything.
        free, _ = search(profile_for, args.ranks, counts, recomputes=("none",), offloads=("none",))
        if free:
            print(trade(best, free[0]))
    print(f"train with it:\n  {train_command(best, args)}")
    return 0


def ranking_table(plans: list[Plan]) -> str:
    columns = (
        "#",
        "schedule",
        "v",
        "m",
        "recompute",
        "offload",
        "blocks per stage",
        "step (sync)",
        "period",
        "bubble",
        "peak/rank",
    )
    rows = [
        (
            str(i + 1),
            p.spec.schedule,
            str(p.spec.virtual),
            str(p.spec.microbatches),
            p.spec.recompute,
            p.spec.offload,
            ",".join(map(str, p.layers_per_stage)),
            f"{p.step_time * 1e3:.1f} ms",
            f"{p.period * 1e3:.1f} ms",
            f"{p.bubble:.3f}",
            " ".join(f"{b / 2**20:.0f}" for b in p.peak_bytes) + " MiB",
        )
        for i, p in enumerate(plans)
    ]
    return _table(columns, rows)


def _table(columns: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[k]) for row in [columns, *rows]) for k in range(len(columns))]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)).rstrip() for row in [columns, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _print_plan(plan: Plan) -> None:
    spec = plan.spec
    program = build_schedule(spec)
    rows = []
    for s, stage in enumerate(plan.stages):
        rank = program.rank_of(s)
        rows.append(
            (
                str(s),
                str(rank),
                _compact(stage.layers),
                f"{stage.parameters / 1e6:.2f}M",
                f"{stage.forward * 1e3:.2f}",
                f"{stage.backward * 1e3:.2f}",
                f"{stage.busy * 1e3:.1f}",
                f"{stage.sends / 2**20:.2f} MiB",
                f"{plan.peak_bytes[rank] / 2**20:.0f} MiB",
            )
        )
    columns = ("stage", "rank", "layers", "params", "F ms/mb", "B+W ms/mb", "busy ms/step", "sends/mb", "peak (rank)")
    print(
        f"{spec.schedule}, {spec.ranks} ranks x {spec.virtual} stage(s), {spec.microbatches} micro-batches of"
        f" {plan.microbatch_size}, recompute {spec.recompute}, offload {spec.offload}, method {plan.method}"
        f" ({'exact' if plan.exact else 'local search'})"
    )
    print(_table(columns, rows))
    print(
        f"predicted step {plan.step_time * 1e3:.1f} ms (synchronous: first start to last end over all ranks),"
        f" period {plan.period * 1e3:.1f} ms (steady state, steps back to back), bubble {plan.bubble:.3f}"
    )
    t = plan.transfers
    if t is None:
        print("messages between ranks take no time in this prediction (--no-transfers)")
    else:
        print(
            f"each message between ranks: a send busies its rank {t.send * 1e3:.2f} ms, a receive's post"
            f" {t.recv * 1e3:.2f} ms ({_late(t)}), latency {t.latency * 1e3:.2f} ms (measured at"
            f" {t.nbytes / 2**20:.2f} MiB)"
        )


def _late(transfers: TransferCosts) -> str:
    if transfers.late_recv is None:
        return "the same after its message arrived: not measured"
    return f"{transfers.late_recv * 1e3:.2f} ms after its message arrived"


def _compact(names: tuple[str, ...]) -> str:
    """`layers.0`, `layers.1`, `layers.2` -> `layers.0-2`."""
    out: list[str] = []
    run: list[int] = []
    prefix = ""

    def flush() -> None:
        if run:
            out.append(f"{prefix}{run[0]}" if len(run) == 1 else f"{prefix}{run[0]}-{run[-1]}")
            run.clear()

    for name in names:
        head, _, tail = name.rpartition(".")
        if tail.isdigit() and (not run or (head + "." == prefix and int(tail) == run[-1] + 1)):
            prefix = head + "."
            run.append(int(tail))
            continue
        flush()
        if tail.isdigit():
            prefix = head + "."
            run.append(int(tail))
        else:
            out.append(name)
    flush()
    return ", ".join(out)


def train_command(plan: Plan, args: argparse.Namespace) -> str:
    """The `conveyor train` line that trains this plan's model with it."""
    sizes = f"--layers {args.layers} --dim {args.dim} --heads {args.heads} --context {args.context}"
    if args.model != "gpt":
        sizes = f"--model {args.model} {sizes}" + (f" --model-config {args.model_config}" if args.model_config else "")
    spec = plan.spec
    settings = (
        f"--schedule {spec.schedule} --ranks {spec.ranks} --virtual {spec.virtual}"
        f" --microbatches {spec.microbatches} --recompute {spec.recompute} --offload {spec.offload}"
        f" --batch-size {args.batch_size}"
    )
    return f"conveyor train --plan {args.out} {settings} {sizes}"

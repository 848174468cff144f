"""Every schedule conveyor offers, what it needs and what it costs: the one place a name is looked up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .actions import Program
from .building_block import v_half, v_min
from .dualpipe import dualpipev
from .gpipe import gpipe
from .graph import StageGraph
from .interleaved import interleaved_1f1b, looped_bfs
from .lowering import forward_only as drop_backwards
from .lowering import lower
from .one_f_one_b import one_f_one_b
from .pipedream import pipedream, pipedream_2bw
from .validate import validate
from .zero_bubble import zb_h1, zb_h2, zbv

if TYPE_CHECKING:
    from .spec import PipelineSpec

__all__ = ["SCHEDULES", "ScheduleInfo", "build_schedule", "schedule_info"]


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    generate: Callable[[int, int, int], Program]
    """(ranks P, micro-batches m, stages per rank v) -> the generator's program."""
    stages_per_rank: str
    microbatches: str
    memory: str
    """Peak activations held, in micro-batches of one stage, on the busiest rank."""
    bubble: str
    """Bubble fraction with equal F, B, W costs (B + W = 2F when the backward is not split)."""
    default_virtual: int = 1
    allowed_virtual: tuple[int, ...] | None = (1,)
    """None: any v >= 2."""
    staleness: str = "0"
    """How many updates a micro-batch's gradient lags the weights it is applied to."""
    stream: Callable[[int, int, int, bool], Program] | None = None
    """An asynchronous schedule: (ranks P, micro-batches per mini-batch m, mini-batches, vertical sync) ->
    one program over the whole stream, which never flushes between mini-batches."""

    round_robin: Callable[[tuple[int, ...], int, int, bool], Program] | None = None
    """A schedule that can replicate stages (1F1B-RR): (replicas per stage, micro-batches per mini-batch m,
    mini-batches, vertical sync) -> the program with stage s on replicas[s] ranks, dealt micro-batches
    round-robin."""
    data_parallel: bool = False
    """Whether it runs pipeline x data parallelism (`dp`): one stage per rank, flushed after each mini-batch,
    every stage replicated alike."""
    split_backward: bool = False
    """Whether its programs split backwards into B (input gradients) and W (weight gradients)."""

    @property
    def asynchronous(self) -> bool:
        """Whether it updates inside a stream of mini-batches, never flushing between them (PipeDream)."""
        return self.stream is not None

    @property
    def replicates(self) -> bool:
        """Whether it can hold a stage on several ranks that take its micro-batches round-robin (1F1B-RR)."""
        return self.round_robin is not None

    def check_virtual(self, virtual: int) -> None:
        allowed = self.allowed_virtual
        if allowed is None and virtual < 2:
            raise ValueError(f"{self.name} runs at least 2 stages per rank; got {virtual}")
        if allowed is not None and virtual not in allowed:
            counts = " or ".join(map(str, allowed))
            raise ValueError(f"{self.name} runs {counts} stage{'' if allowed == (1,) else 's'} per rank; got {virtual}")


def _single(generator: Callable[[int, int], Program]) -> Callable[[int, int, int], Program]:
    return lambda ranks, m, virtual: generator(ranks, m)


def _unflushed(name: str) -> Callable[[int, int, int], Program]:
    """The one-mini-batch program of an asynchronous schedule (what `generate` gives; `stream` gives more)."""
    return lambda ranks, m, virtual: SCHEDULES[name].stream(ranks, m, 1, False)  # type: ignore[misc]


def _no_vertical_sync(
    generator: Callable[[int, int, int], Program], ranks: int, m: int, mini_batches: int, vertical: bool
) -> Program:
    if vertical:
        raise ValueError("pipedream-2bw has every stage use the same version already: vertical sync does not apply")
    return generator(ranks, m, mini_batches)


SCHEDULES: dict[str, ScheduleInfo] = {
    info.name: info
    for info in [
        ScheduleInfo(
            "gpipe",
            _single(gpipe),
            "1, or replicated",
            "any m >= 1",
            "m",
            "(P-1)/(m+P-1)",
            round_robin=lambda replicas, m, n, vertical: gpipe(sum(replicas), m, replicas),
            data_parallel=True,
        ),
        ScheduleInfo(
            "1f1b",
            _single(one_f_one_b),
            "1, or replicated",
            "any m >= 1 (m >= P fills the pipe)",
            "min(P, m)",
            "(P-1)/(m+P-1)",
            round_robin=lambda replicas, m, n, vertical: one_f_one_b(sum(replicas), m, replicas),
            data_parallel=True,
        ),
        ScheduleInfo(
            "interleaved-1f1b",
            interleaved_1f1b,
            "v >= 2, looped (stage s on rank s mod P)",
            "a multiple of P",
            "v P + P - 1",
            "(P-1)/(v m + P-1)",
            default_virtual=2,
            allowed_virtual=None,
        ),
        ScheduleInfo(
            "looped-bfs",
            looped_bfs,
            "v >= 1, looped (stage s on rank s mod P)",
            "any m >= 1",
            "v m",
            "(P-1)/(v m + P-1)",
            default_virtual=2,
            allowed_virtual=None,
        ),
        ScheduleInfo(
            "zb-h1",
            _single(zb_h1),
            "1, split backward",
            "any m >= 1",
            "min(P, m)",
            "(P-1)/(3m+P-1), a third of 1F1B's bubble time",
            split_backward=True,
        ),
        ScheduleInfo(
            "zb-h2",
            _single(zb_h2),
            "1, split backward",
            "any m >= 1 (m >= 2P-1: no bubble)",
            "2P - 1",
            "0 for m >= 2P-1",
            split_backward=True,
        ),
        ScheduleInfo(
            "zbv",
            _single(zbv),
            "2, V-shape (rank r: stages r and 2P-1-r), split backward",
            "m >= 2P-1",
            "2P (= P full-size)",
            "0 for m >= 2P-1",
            default_virtual=2,
            allowed_virtual=(2,),
            split_backward=True,
        ),
        ScheduleInfo(
            "v-half",
            _single(v_half),
            "2, V-shape, split backward",
            "any m >= 1",
            "2 min(m, floor((P+2)/2)) (half of it full-size)",
            "about half 1F1B's; `conveyor simulate` tells",
            default_virtual=2,
            allowed_virtual=(2,),
            split_backward=True,
        ),
        ScheduleInfo(
            "v-min",
            _single(v_min),
            "2, V-shape, split backward",
            "any m >= 1",
            "2 min(m, floor((P+4)/3)) (half of it full-size)",
            "about 2/3 of 1F1B's (more if F, B, W differ)",
            default_virtual=2,
            allowed_virtual=(2,),
            split_backward=True,
        ),
        ScheduleInfo(
            "dualpipev",
            _single(dualpipev),
            "2, V-shape, part split backward",
            "m >= 2P",
            "2P + 1",
            "near 0; `conveyor simulate` tells",
            default_virtual=2,
            allowed_virtual=(2,),
            split_backward=True,
        ),
        ScheduleInfo(
            "pipedream",
            _unflushed("pipedream"),
            "1 or replicated, async: a step per micro-batch",
            "any m >= 1",
            "P; P - r weight versions on rank r",
            "0 in the steady state",
            staleness="P - 1 - r on rank r (P - 1 with vertical sync)",
            stream=lambda p, m, n, vertical: pipedream(p, m, n, vertical),
            round_robin=lambda replicas, m, n, vertical: pipedream(sum(replicas), m, n, vertical, replicas),
        ),
        ScheduleInfo(
            "pipedream-2bw",
            _unflushed("pipedream-2bw"),
            "1 or replicated, async: a step per mini-batch",
            "m >= P - 1",
            "P; 2 weight versions",
            "0 in the steady state",
            staleness="1",
            stream=lambda p, m, n, vertical: _no_vertical_sync(pipedream_2bw, p, m, n, vertical),
            round_robin=lambda replicas, m, n, vertical: _no_vertical_sync(
                lambda p, m, n: pipedream_2bw(p, m, n, replicas), sum(replicas), m, n, vertical
            ),
        ),
    ]
}


def schedule_info(name: str) -> ScheduleInfo:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None


def build_schedule(
    spec: PipelineSpec,
    graph: StageGraph | None = None,
    *,
    forward_only: bool = False,
    mini_batches: int = 1,
    prefetch: bool = True,
) -> Program:
    """The lowered, validated program of `spec`'s schedule, ready for the executor.

    The model is split into `spec.num_stages` stages. `graph` is the split's
    stage graph (a chain if None): its edges become the program's transfers and
    its tied parameters its reductions. With `forward_only`, the program keeps
    only the schedule's forwards, in its order and placement (for evaluation and
    inference). An asynchronous schedule's program covers a stream of
    `mini_batches` mini-batches without a flush between them. `prefetch=False`
    keeps each receive right before the compute that needs it. The stages `spec.offload` names move their
    activations to host memory between forward and backward (`schedules/offload.py`).
    """
    info = SCHEDULES[spec.schedule]
    if not info.asynchronous and mini_batches != 1:
        raise ValueError(
            f"{spec.schedule} flushes after every mini-batch: a program of {mini_batches} mini-batches is for the"
            " asynchronous schedules (pipedream, pipedream-2bw)"
        )
    replicas = spec.replica_counts
    if replicas is not None:
        assert info.round_robin is not None  # the spec checked it
        generated = info.round_robin(replicas, spec.microbatches, mini_batches, spec.vertical_sync)
    elif info.stream is not None:
        generated = info.stream(spec.ranks, spec.microbatches, mini_batches, spec.vertical_sync)
    else:
        generated = info.generate(spec.ranks, spec.microbatches, spec.stages_per_rank)
    if graph is not None:
        if graph.num_stages != generated.num_stages:
            raise ValueError(
                f"{spec.schedule} on {spec.ranks} ranks with {spec.stages_per_rank} stage(s) per rank runs"
                f" {generated.num_stages} stages; the model was split into {graph.num_stages}"
            )
        generated = replace(generated, graph=graph)
    if forward_only:
        generated = drop_backwards(generated)
    program = lower(generated, prefetch=prefetch, offload=spec.offloaded)
    validate(program)
    return program

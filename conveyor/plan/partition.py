"""Where to cut: contiguous stage boundaries that minimize the simulated step time within a memory cap.

The objective is the simulator's synchronous step (`Simulation.step_time`) of the schedule's lowered program,
not the slowest stage: under 1F1B, zero-bubble and V placements the ends of a pipeline weigh differently.
A split's cost vector decides that time, so trying every contiguous split is exact. Below `EXACT_LIMIT`
splits conveyor does that, as a branch and bound: splits are simulated in order of a lower bound (the busiest
rank's compute, which no schedule can beat), and the search stops once the bound passes the best time found.
Above it, a local search (moving one block across one boundary at a time, from a balanced start) finds a
good split but proves nothing; `Partition.exact` says which one ran.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..observe.host_copy import HostCopy
from ..observe.profile import LayerProfile
from ..observe.simulate import CostModel, simulate
from ..schedules import PipelineSpec, Program, build_schedule
from ..split import even_split
from .cost import MemoryModel, stage_costs, stage_layers, static_bytes

__all__ = ["EXACT_LIMIT", "METHODS", "Partition", "PlanError", "count_splits", "partition", "splits"]

METHODS = ("auto", "time", "memory", "params", "uniform")
EXACT_LIMIT = 20_000
"""Most splits the exact search enumerates; beyond, a local search."""


class PlanError(ValueError):
    """No split meets the request; the message says what would."""


@dataclass(frozen=True)
class Partition:
    """A split and what the simulator predicts for it."""

    layers_per_stage: tuple[int, ...]
    step_time: float
    """Simulated synchronous step (seconds, with a profile's costs)."""
    peak_bytes: tuple[float, ...]
    """Per rank: weights, gradients, optimizer state and the most activations held at once."""
    exact: bool
    """Whether every split was considered (else a local search found it)."""
    costs: CostModel


def lower_bounds(program: Program) -> list[list[int]]:
    """The stages of each rank (a rank's compute bounds every schedule's step from below)."""
    return [program.stages_of(rank) for rank in range(program.num_ranks)]


def _busiest(costs: CostModel, ranks: list[list[int]], m: int) -> float:
    """No step is shorter than the compute of its busiest rank (backwards at their cheaper of whole and B + W)."""
    return max(
        sum(
            m * (c.forward + min(c.whole_backward, c.backward + c.weight)) + c.step + c.reduce
            for c in (costs.of(s) for s in stages)
        )
        for stages in ranks
    )


def _lowest(profile: LayerProfile, num_stages: int) -> list[int]:
    """The fewest blocks each stage may own: none where an end layer gives it something."""
    lows = [1] * num_stages
    if profile.first:
        lows[0] = 0
    if profile.last:
        lows[-1] = 0
    if num_stages == 1:
        lows[0] = 0
    return lows


def count_splits(profile: LayerProfile, num_stages: int) -> int:
    """How many contiguous splits there are of the profile's layers into `num_stages` stages."""
    blocks = len(profile.layers) - profile.first - profile.last
    free = blocks - sum(_lowest(profile, num_stages))
    return math.comb(free + num_stages - 1, num_stages - 1) if free >= 0 else 0


def splits(profile: LayerProfile, num_stages: int) -> Iterator[tuple[int, ...]]:
    """Every contiguous split (blocks per stage), in lexicographic order."""
    blocks = len(profile.layers) - profile.first - profile.last
    lows = _lowest(profile, num_stages)
    free = blocks - sum(lows)
    for bars in itertools.combinations(range(free + num_stages - 1), num_stages - 1):
        edges = (-1, *bars, free + num_stages - 1)
        yield tuple(lows[s] + edges[s + 1] - edges[s] - 1 for s in range(num_stages))


def _check_size(profile: LayerProfile, num_stages: int) -> None:
    if count_splits(profile, num_stages) == 0:
        raise PlanError(
            f"{num_stages} stages need at least {num_stages} layers to own; the model has {len(profile.layers)}"
            f" ({', '.join(layer.name for layer in profile.layers)}): use fewer ranks or stages per rank"
        )


def partition(
    profile: LayerProfile,
    spec: PipelineSpec,
    *,
    method: str = "auto",
    memory_cap: float | None = None,
    host_copy: HostCopy | None = None,
    exact_limit: int = EXACT_LIMIT,
) -> Partition:
    """The split `method` chooses for the pipeline `spec` describes (its micro-batches of the profile's size);
    the stages `spec.offload` names move activations to host memory, each copy taking `host_copy`'s time.

    auto: the least simulated step time within `memory_cap` bytes per rank (no cap: any); time: the least step
    time, ignoring the cap; memory: the least peak memory of the busiest rank; params: the least parameters
    on any stage; uniform: blocks as even as possible (earlier stages take the remainder), the default split.
    Ties go to the split first in lexicographic order. Raises PlanError when nothing fits.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if memory_cap is not None and not memory_cap > 0:
        raise ValueError(f"a memory cap must be a positive number of bytes; got {memory_cap}")
    program = build_schedule(spec)
    num_stages = program.num_stages
    _check_size(profile, num_stages)
    memory = MemoryModel.of(program)
    search = _Search(profile, program, memory, spec.recompute, spec.offloaded, host_copy)
    exact = count_splits(profile, num_stages) <= exact_limit
    cap = memory_cap if method == "auto" else None
    if method == "uniform":
        blocks = len(profile.layers) - profile.first - profile.last
        chosen = tuple(even_split(blocks, num_stages))
        stage_layers(profile, chosen)  # refuses a stage that owns nothing
    elif method == "params":
        chosen = search.least(lambda c: (max(search.stage_parameters(c)), c), exact)
    elif method == "memory":
        chosen = search.least(lambda c: (max(search.peak(c)), c), exact)
    else:
        chosen = search.fastest(cap, exact)
    return search.result(chosen, exact or method == "uniform")


class _Search:
    """Splits of one profile for one program, with what each costs (memoized)."""

    def __init__(
        self,
        profile: LayerProfile,
        program: Program,
        memory: MemoryModel,
        recompute: str,
        offload: frozenset[int] = frozenset(),
        host_copy: HostCopy | None = None,
    ) -> None:
        self.profile = profile
        self.program = program
        self.memory = memory
        self.recompute = recompute
        self.offload = offload
        self.host_copy = host_copy
        self.ranks = lower_bounds(program)
        self._costs: dict[tuple[int, ...], CostModel] = {}
        self._times: dict[tuple[int, ...], float] = {}

    def costs(self, split: tuple[int, ...]) -> CostModel:
        if split not in self._costs:
            self._costs[split] = stage_costs(self.profile, split, self.recompute, self.offload, self.host_copy)
        return self._costs[split]

    def peak(self, split: tuple[int, ...]) -> list[float]:
        return self.memory.peak(self.costs(split), static_bytes(self.profile, split))

    def stage_parameters(self, split: tuple[int, ...]) -> list[int]:
        return [sum(self.profile.layers[i].parameters for i in ls) for ls in stage_layers(self.profile, split)]

    def time(self, split: tuple[int, ...]) -> float:
        if split not in self._times:
            self._times[split] = simulate(self.program, self.costs(split)).step_time
        return self._times[split]

    def bound(self, split: tuple[int, ...]) -> float:
        return _busiest(self.costs(split), self.ranks, self.program.num_microbatches)

    def result(self, split: tuple[int, ...], exact: bool) -> Partition:
        return Partition(split, self.time(split), tuple(self.peak(split)), exact, self.costs(split))

    def least(self, key: Callable[[tuple[int, ...]], tuple[float, tuple[int, ...]]], exact: bool) -> tuple[int, ...]:
        if exact:
            return min(splits(self.profile, self.program.num_stages), key=key)
        return self._descend(self._starts(), key)

    def fastest(self, cap: float | None, exact: bool) -> tuple[int, ...]:
        """The least simulated step time among the splits within `cap`."""

        def fits(split: tuple[int, ...]) -> bool:
            return cap is None or max(self.peak(split)) <= cap

        if not exact:
            starts = [s for s in self._starts() if fits(s)]
            if not starts:
                starts = [self._descend(self._starts(), lambda c: (max(self.peak(c)), c))]
                if not fits(starts[0]):
                    self._refuse(cap, starts[0], exact)
            return self._descend(starts, lambda c: (self.time(c), c), fits)
        feasible = [s for s in splits(self.profile, self.program.num_stages) if fits(s)]
        if not feasible:
            least = min(splits(self.profile, self.program.num_stages), key=lambda c: (max(self.peak(c)), c))
            self._refuse(cap, least, exact)
        best: tuple[float, tuple[int, ...]] | None = None
        for bound, split in sorted((self.bound(s), s) for s in feasible):
            if best is not None and bound > best[0]:
                break  # every split left is slower than its bound, which is slower than the best
            candidate = (self.time(split), split)
            best = candidate if best is None else min(best, candidate)
        assert best is not None
        return best[1]

    def _refuse(self, cap: float | None, least: tuple[int, ...], exact: bool) -> None:
        peak = max(self.peak(least))
        which = "the smallest" if exact else "the smallest found (a local search)"
        raise PlanError(
            f"no split of {len(self.profile.layers)} layers into"
            f" {self.program.num_stages} stages fits in {_gib(cap)} per rank under {self.program.name} with"
            f" {self.program.num_microbatches} micro-batches (recompute {self.recompute}, offload"
            f" {sorted(self.offload) or 'none'}): {which} peak is {_gib(peak)} (layers per stage {list(least)});"
            " allow at least that, recompute or offload, or use more ranks"
        )

    def _starts(self) -> list[tuple[int, ...]]:
        """Balanced starting splits for the local search: even by blocks, and by each block's compute."""
        num_stages = self.program.num_stages
        lows = _lowest(self.profile, num_stages)
        blocks = len(self.profile.layers) - self.profile.first - self.profile.last
        starts = []
        even = tuple(even_split(blocks, num_stages))
        if all(n >= low for n, low in zip(even, lows, strict=True)):
            starts.append(even)
        work = [p.forward + p.whole for p in self.profile.layers]
        starts.append(_balanced(work, self.profile.first, self.profile.last, lows))
        return sorted(set(starts))

    def _descend(
        self,
        starts: Sequence[tuple[int, ...]],
        key: Callable[[tuple[int, ...]], tuple[float, tuple[int, ...]]],
        fits: Callable[[tuple[int, ...]], bool] = lambda split: True,
    ) -> tuple[int, ...]:
        """From each start, move to the best neighbour (one block across one boundary) while it is better."""
        lows = _lowest(self.profile, self.program.num_stages)
        best: tuple[int, ...] | None = None
        for start in starts:
            current = start
            while True:
                moves = [n for n in _neighbours(current, lows) if fits(n)]
                better = min(moves, key=key, default=None)
                if better is None or key(better) >= key(current):
                    break
                current = better
            if best is None or key(current) < key(best):
                best = current
        assert best is not None
        return best


def _neighbours(split: tuple[int, ...], lows: list[int]) -> Iterator[tuple[int, ...]]:
    for s in range(len(split) - 1):
        for give, take in ((s, s + 1), (s + 1, s)):
            if split[give] > lows[give]:
                moved = list(split)
                moved[give] -= 1
                moved[take] += 1
                yield tuple(moved)


def _balanced(work: list[float], first: bool, last: bool, lows: list[int]) -> tuple[int, ...]:
    """Blocks per stage minimizing the most work on one stage (a dynamic program over contiguous splits)."""
    blocks = work[int(first) : len(work) - int(last)]
    head = work[0] if first else 0.0
    tail = work[-1] if last else 0.0
    stages, n = len(lows), len(blocks)
    prefix = list(itertools.accumulate(blocks, initial=0.0))
    # best[s][j]: the least bottleneck of the first s stages over the first j blocks, and the last stage's count
    best: list[list[tuple[float, int]]] = [[(math.inf, -1)] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0)
    for s in range(1, stages + 1):
        for j in range(n + 1):
            for count in range(lows[s - 1], j + 1):
                before = best[s - 1][j - count][0]
                load = prefix[j] - prefix[j - count] + (head if s == 1 else 0.0) + (tail if s == stages else 0.0)
                value = max(before, load)
                if value < best[s][j][0]:
                    best[s][j] = (value, count)
    counts, j = [], n
    for s in range(stages, 0, -1):
        count = best[s][j][1]
        counts.append(count)
        j -= count
    return tuple(reversed(counts))


def _gib(value: float | None) -> str:
    return "any memory" if value is None else f"{value:,.0f} bytes ({value / 2**20:.2f} MiB)"

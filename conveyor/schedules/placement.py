"""Where stages live: which ranks hold each stage."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["chain", "check_sizes", "looped", "one_rank_each", "replicated", "v_shape"]

Placement = tuple[tuple[int, ...], ...]


def one_rank_each(ranks: Iterable[int]) -> Placement:
    """The placement of stages held by one rank each: stage s on `ranks[s]`."""
    return tuple((rank,) for rank in ranks)


def replicated(replicas: Sequence[int]) -> Placement:
    """Stage s on `replicas[s]` ranks of its own, in order: (2, 1) puts stage 0 on ranks 0 and 1, stage 1 on rank 2."""
    if not replicas or any(r < 1 for r in replicas):
        raise ValueError(f"every stage needs at least one replica; got {tuple(replicas)}")
    starts = [sum(replicas[:s]) for s in range(len(replicas))]
    return tuple(tuple(range(start, start + r)) for start, r in zip(starts, replicas, strict=True))


def check_sizes(name: str, num_ranks: int, num_microbatches: int) -> None:
    if num_ranks < 1:
        raise ValueError(f"{name} needs at least 1 rank; got {num_ranks}")
    if num_microbatches < 1:
        raise ValueError(f"{name} needs at least 1 micro-batch; got {num_microbatches}")


def looped(num_ranks: int, virtual: int) -> tuple[int, ...]:
    """Stage s on rank s mod P: each rank holds `virtual` stages spread along the model."""
    if virtual < 1:
        raise ValueError(f"need at least 1 stage per rank; got {virtual}")
    return tuple(stage % num_ranks for stage in range(num_ranks * virtual))


def v_shape(num_ranks: int) -> tuple[int, ...]:
    """Rank r holds stages r and 2P-1-r: down the ranks and back up, so the first and last stage share rank 0."""
    return tuple(stage if stage < num_ranks else 2 * num_ranks - 1 - stage for stage in range(2 * num_ranks))


def chain(name: str, num_ranks: int, num_microbatches: int, replicas: Sequence[int] | None) -> Placement:
    """One stage per rank, or (`replicas`) stage s on replicas[s] consecutive ranks, for a schedule `name`
    whose stages each take every micro-batch in turn (a replica its share, round-robin)."""
    if replicas is None:
        return one_rank_each(range(num_ranks))
    if sum(replicas) != num_ranks:
        raise ValueError(f"{name}: replicas {tuple(replicas)} hold {sum(replicas)} ranks, but it runs on {num_ranks}")
    if max(replicas) > num_microbatches:
        stage = list(replicas).index(max(replicas))
        raise ValueError(
            f"{name}: stage {stage} has {max(replicas)} replicas but a mini-batch has only {num_microbatches}"
            " micro-batches; every replica needs at least one"
        )
    return replicated(replicas)


def worker_microbatches(ranks: Sequence[int], rank: int, num_microbatches: int) -> list[int]:
    """The micro-batches `rank` runs of a stage held by `ranks`: every len(ranks)-th, round-robin."""
    return list(range(ranks.index(rank), num_microbatches, len(ranks)))

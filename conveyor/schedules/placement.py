"""Where stages live: which rank owns each stage."""

from __future__ import annotations

__all__ = ["check_sizes", "looped", "v_shape"]


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

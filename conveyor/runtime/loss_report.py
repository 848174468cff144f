"""The mini-batch loss a step returns: summed from its micro-batches, over a replicated last stage, to every rank."""

from __future__ import annotations

from typing import Any

import torch

from ..schedules import Channel, Program
from .stage import MicrobatchResult
from .transport import Transport

__all__ = ["LossReport"]


class LossReport:
    """Adds up the last stage's weighted micro-batch losses into the mini-batch loss, and hands it on.

    A replicated last stage's ranks each hold some micro-batches: they exchange their parts and add them
    up in rank order (the same bits on each). With `loss_on_all_ranks`, the last stage's (first) rank
    sends it to every other rank: point-to-point messages rather than a broadcast, because gloo runs a
    collective on a worker thread that drops its tensors after the caller has gone on, and a rank that
    exits right after its last step can then abort in that thread.
    """

    def __init__(self, transport: Transport, program: Program, rank: int, num_ranks: int, device: torch.device):
        self.transport, self.rank, self.num_ranks, self.device = transport, rank, num_ranks, device
        self.last_ranks = program.replicas_of(program.num_stages - 1)

    @staticmethod
    def channels(program: Program, num_ranks: int) -> dict[Channel, tuple[int, int]]:
        """Between the ranks of a replicated last stage, for their parts; from its first rank to each other."""
        last_ranks = program.replicas_of(program.num_stages - 1)
        return {
            ("loss", a, b): (a, b)
            for a in last_ranks
            for b in range(num_ranks)
            if a != b and (a == last_ranks[0] or b in last_ranks)
        }

    def report(
        self,
        results: list[MicrobatchResult] | None,
        loss_on_all_ranks: bool,
        losses: list[torch.Tensor] | None,
        outputs: list[Any] | None,
    ) -> torch.Tensor | None:
        """The mini-batch loss where a step returns it (see `Pipeline.step`); fills `losses` and `outputs`."""
        loss = None
        if results is not None:
            # A micro-batch that counts nothing (weight 0) may have the NaN of an empty mean: it is left out.
            weighted = [r.loss * r.weight for r in results if r.loss is not None and r.weight != 0]
            loss = torch.stack(weighted).sum() if weighted else torch.zeros((), device=self.device)
            if losses is not None:
                losses[:] = [r.loss for r in results if r.loss is not None]
            if outputs is not None:
                outputs[:] = [r.output for r in results]
            if len(self.last_ranks) > 1:
                loss = self._sum_over_last_replicas(loss.detach())
        if loss_on_all_ranks:
            loss = self._share(loss)
        return loss

    def _share(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The last stage's loss on every rank, in float32 elsewhere."""
        first = self.last_ranks[0]
        if self.rank == first:
            assert loss is not None
            for r in range(self.num_ranks):
                if r not in self.last_ranks:
                    self.transport.send(loss.detach().float(), ("loss", self.rank, r))
            self.transport.flush()
            return loss
        if loss is not None:  # another replica of the last stage: it has the sum already
            return loss
        return self.transport.recv_now((), torch.float32, ("loss", first, self.rank))

    def _sum_over_last_replicas(self, part: torch.Tensor) -> torch.Tensor:
        incoming = {}
        for r in self.last_ranks:
            if r != self.rank:
                self.transport.send(part, ("loss", self.rank, r))
                incoming[r] = self.transport.recv(tuple(part.shape), part.dtype, ("loss", r, self.rank))
        parts = {self.rank: part, **{r: message.wait() for r, message in incoming.items()}}
        self.transport.flush()
        total = parts[self.last_ranks[0]]
        for r in self.last_ranks[1:]:
            total = total + parts[r]
        return total

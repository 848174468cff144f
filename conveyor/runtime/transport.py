"""Point-to-point tensor transfers between ranks over torch.distributed.

Sends and receives are asynchronous: `send` returns at once, `recv` posts a
buffer and returns a handle whose `wait()` gives the tensor. With the gloo
backend, CUDA tensors travel through host memory (gloo only moves CPU tensors).

Each direction of each link (sender, receiver) gets a process group of its
own. NCCL runs all operations between two ranks of one group in order on one
stream, and a send there blocks until its receive is posted: with both
directions on one stream, a rank's pending send can hold back the receive its
peer is waiting for, and the two deadlock even though the schedule is sound.
With a group per direction, a send waits only for its own receive, which is
exactly what the validator assumes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Transport", "Incoming"]


@dataclass
class Incoming:
    """A posted receive: `wait()` returns the tensor, on the transport's device."""

    buffer: torch.Tensor
    work: dist.Work | None
    device: torch.device

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.buffer.to(self.device, non_blocking=False)


@dataclass
class Transport:
    """Sends and receives tensors to and from other ranks of `group` (ranks are group ranks).

    `links` maps (sender, receiver) to the process group that carries that
    direction; see `open_links`. Pairs not in it use `group`.
    """

    device: torch.device
    group: dist.ProcessGroup | None = None
    links: dict[tuple[int, int], dist.ProcessGroup] = field(default_factory=dict)
    _in_flight: list[tuple[dist.Work, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def open_links(
        cls, pairs: Iterable[tuple[int, int]], device: torch.device, group: dist.ProcessGroup | None = None
    ) -> Transport:
        """A transport with one process group per (sender, receiver) in `pairs`.

        Collective: every rank of the default group must call it with the same pairs.
        """
        rank = dist.get_rank(group)
        links = {}
        for src, dst in sorted(set(pairs)):
            members = [_global(group, src), _global(group, dst)]
            link = dist.new_group(members)  # every rank must call new_group, member or not
            if rank in (src, dst):
                assert link is not None
                links[(src, dst)] = link
        return cls(device, group, links)

    @property
    def stages_through_host(self) -> bool:
        """Gloo cannot move device memory, so CUDA tensors are copied to the host and back."""
        return self.device.type != "cpu" and dist.get_backend(self.group) == "gloo"

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Start sending `tensor` to `dst`; the tensor is kept alive until the send completes."""
        payload = tensor.detach()
        payload = payload.cpu() if self.stages_through_host else payload.to(self.device)
        payload = payload.contiguous()
        work = dist.isend(payload, dst=_global(self.group, dst), group=self._link(self.rank, dst))
        assert work is not None
        self._in_flight.append((work, payload))
        self._forget_finished()

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> Incoming:
        """Post a receive of a tensor of `shape` and `dtype` from `src`."""
        on_host = self.stages_through_host
        buffer = torch.empty(shape, dtype=dtype, device="cpu" if on_host else self.device)
        work = dist.irecv(buffer, src=_global(self.group, src), group=self._link(src, self.rank))
        return Incoming(buffer, work, self.device)

    def recv_now(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        return self.recv(shape, dtype, src).wait()

    def flush(self) -> None:
        """Wait until every send has left this rank (the end of a step)."""
        for work, _ in self._in_flight:
            work.wait()
        self._in_flight.clear()

    def _forget_finished(self) -> None:
        # Drop references to sent buffers early so their memory can be reused.
        if len(self._in_flight) > 8:
            self._in_flight = [(w, t) for w, t in self._in_flight if not w.is_completed()]

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def _link(self, src: int, dst: int) -> dist.ProcessGroup | None:
        return self.links.get((src, dst), self.group)


def _global(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)

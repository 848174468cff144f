"""Point-to-point tensor transfers between ranks over torch.distributed.

Sends and receives are asynchronous: `send` returns at once, `recv` posts a
buffer and returns a handle whose `wait()` gives the tensor. With the gloo
backend, CUDA tensors travel through host memory (gloo only moves CPU tensors).

Links (see `conveyor.schedules.Link`: stage s's activations to s + 1, or its
input gradients to s - 1) must not hold each other up: the validator assumes
that a send waits only for its own receive, and that a link's messages match
in order. How that is kept depends on the backend:

- NCCL runs all operations of one group between two ranks in order on one
  stream, and a send there blocks until its receive is posted: were two links
  to share a group, a pending send on one could hold back the receive the peer
  waits for on the other, and the ranks would deadlock although the schedule
  is sound. So each link gets a process group of its own.
- Gloo matches a message by its tag, and moves its payload only once the
  receive is posted, so links can share the pipeline's group, each with a tag
  of its own. A group of their own would cost more than it saves: every gloo
  group runs a network thread that wakes every 10 ms, and on a machine with
  as many cores as ranks each wake-up pre-empts a rank's compute
  (docs/benchmarks.md). Each transport opened on a group takes fresh tags, so
  a receive left posted by an earlier pipeline (the next step's signature)
  never catches a later pipeline's message; and the tags start at FIRST_TAG,
  far above the small tags (0 by default) of the user's own messages on that
  group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..schedules import Link

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
    """Sends and receives tensors over links; ranks are ranks of `group`.

    `links` maps each link to its (sender, receiver) ranks, `groups` each link
    this rank is on to the process group that carries it, and `tags` each link
    to the tag of its messages (see `open`).
    """

    device: torch.device
    group: dist.ProcessGroup | None = None
    links: dict[Link, tuple[int, int]] = field(default_factory=dict)
    groups: dict[Link, dist.ProcessGroup | None] = field(default_factory=dict)
    tags: dict[Link, int] = field(default_factory=dict)
    _in_flight: list[tuple[dist.Work, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def open(
        cls, links: dict[Link, tuple[int, int]], device: torch.device, group: dist.ProcessGroup | None = None
    ) -> Transport:
        """A transport whose links cannot hold each other up: a tag per link (gloo) or a group per link (others).

        Every rank of `group` must open its transports in the same order and with the same links, so
        that their tags agree; with NCCL every rank of the default group must call it (it creates groups).
        """
        ordered = sorted(links)
        if dist.get_backend(group) == "gloo":
            first_tag = _take_tags(group, len(ordered))
            tags = {link: first_tag + i for i, link in enumerate(ordered)}
            return cls(device, group, dict(links), dict.fromkeys(ordered, group), tags)
        rank = dist.get_rank(group)
        groups: dict[Link, dist.ProcessGroup | None] = {}
        for link in ordered:
            src, dst = links[link]
            created = dist.new_group([_global(group, src), _global(group, dst)])  # called by every rank
            if rank in (src, dst):
                groups[link] = created
        return cls(device, group, dict(links), groups)

    @property
    def stages_through_host(self) -> bool:
        """Gloo cannot move device memory, so CUDA tensors are copied to the host and back."""
        return self.device.type != "cpu" and dist.get_backend(self.group) == "gloo"

    def send(self, tensor: torch.Tensor, link: Link) -> None:
        """Start sending `tensor` over `link`; the tensor is kept alive until the send completes."""
        payload = tensor.detach()
        payload = payload.cpu() if self.stages_through_host else payload.to(self.device)
        payload = payload.contiguous()
        dst = self.links[link][1]
        group = self.groups.get(link, self.group)
        work = dist.isend(payload, dst=_global(self.group, dst), group=group, tag=self.tags.get(link, 0))
        assert work is not None
        self._in_flight.append((work, payload))
        self._forget_finished()

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, link: Link) -> Incoming:
        """Post a receive of a tensor of `shape` and `dtype` over `link`."""
        on_host = self.stages_through_host
        buffer = torch.empty(shape, dtype=dtype, device="cpu" if on_host else self.device)
        src = self.links[link][0]
        group = self.groups.get(link, self.group)
        work = dist.irecv(buffer, src=_global(self.group, src), group=group, tag=self.tags.get(link, 0))
        return Incoming(buffer, work, self.device)

    def recv_now(self, shape: tuple[int, ...], dtype: torch.dtype, link: Link) -> torch.Tensor:
        return self.recv(shape, dtype, link).wait()

    def flush(self) -> None:
        """Wait until every send has left this rank (the end of a step)."""
        for work, _ in self._in_flight:
            work.wait()
        self._in_flight.clear()

    def _forget_finished(self) -> None:
        # Drop references to sent buffers early so their memory can be reused.
        if len(self._in_flight) > 8:
            self._in_flight = [(w, t) for w, t in self._in_flight if not w.is_completed()]


FIRST_TAG = 1 << 20

# Tags handed out so far per group (by name): ranks open transports in the same order, so they agree.
_tags_taken: dict[str, int] = {}


def _take_tags(group: dist.ProcessGroup | None, count: int) -> int:
    """The first of `count` tags no earlier transport on `group` used."""
    name = group.group_name if group is not None else "default"
    first = _tags_taken.get(name, FIRST_TAG)
    _tags_taken[name] = first + count
    return first


def _global(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)

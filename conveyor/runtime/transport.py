"""Point-to-point tensor transfers between ranks over torch.distributed.

Sends and receives are asynchronous: `send` returns at once, `recv` posts a
buffer and returns a handle whose `wait()` gives the tensor. With the gloo
backend, CUDA tensors travel through host memory (gloo only moves CPU tensors).

Messages travel over *channels*: the program's links (`conveyor.schedules.Link`:
an edge's activations, or its gradients back), and a few of the pipeline's own
(the loss for other ranks, shared gradients), each named by a tuple.
Channels must not hold each other up: the validator assumes that a send
waits only for its own receive, and that a channel's messages match in order.
How that is kept depends on the backend:

- NCCL runs all operations of one group between two ranks in order on one
  stream, and a send there blocks until its receive is posted: were two channels
  to share a group, a pending send on one could hold back the receive the peer
  waits for on the other, and the ranks would deadlock although the schedule
  is sound. So each channel gets a process group of its own.
- Gloo matches a message by its tag, and moves its payload only once the
  receive is posted, so channels can share the pipeline's group, each with a tag
  of its own. A group of their own would cost more than it saves: every gloo
  group runs a network thread that wakes every 10 ms, and on a machine with
  as many cores as ranks each wake-up pre-empts a rank's compute
  (docs/benchmarks-log.md). Each transport opened on a group takes fresh tags, so
  a receive left posted by an earlier pipeline (the next step's signature)
  never catches a later pipeline's message; and the tags start at FIRST_TAG,
  far above the small tags (0 by default) of the user's own messages on that
  group.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..schedules import Channel
from ..watchdog import heartbeat

__all__ = ["Incoming", "Transport"]


@dataclass
class Incoming:
    """A posted receive: `wait()` returns the tensor, on the transport's device.

    With a `timeout_s`, a wait that outlasts it raises TimeoutError, and a peer that went away raises
    ConnectionError, both naming this rank, the peer and the channel (`what`).
    """

    buffer: torch.Tensor
    work: dist.Work | None
    device: torch.device
    what: str = "a message"
    timeout_s: float | None = None

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            heartbeat()  # a wait that can give up is progress (the watchdog's limit is above the wait's)
            if self.timeout_s is None:
                self.work.wait()
            else:
                self._wait_bounded(self.timeout_s)
            heartbeat()
            self.work = None
        return self.buffer.to(self.device, non_blocking=False)

    def _wait_bounded(self, timeout_s: float) -> None:
        assert self.work is not None
        try:
            self.work.wait(timedelta(seconds=timeout_s))
        except RuntimeError as error:
            if "Timed out" in str(error):
                raise TimeoutError(
                    f"{self.what} did not arrive within {timeout_s:g} s (Pipeline(timeout_s=...), conveyor train"
                    " --timeout-s): that rank is stuck, stopped, or making other calls than this one"
                ) from None
            raise ConnectionError(
                f"{self.what} never came: that rank ended (returned, exited or crashed) before sending it"
            ) from error


@dataclass
class Transport:
    """Sends and receives tensors over channels; ranks are ranks of `group`.

    `channels` maps each channel to its (sender, receiver) ranks, `groups` each channel
    this rank is on to the process group that carries it, and `tags` each channel
    to the tag of its messages (see `open`).
    """

    device: torch.device
    group: dist.ProcessGroup | None = None
    channels: dict[Channel, tuple[int, int]] = field(default_factory=dict)
    groups: dict[Channel, dist.ProcessGroup | None] = field(default_factory=dict)
    tags: dict[Channel, int] = field(default_factory=dict)
    timeout_s: float | None = None
    """How long a receive may wait (gloo; None: the process group's own timeout, NCCL's)."""
    bytes_sent: Counter[Channel] = field(default_factory=Counter)
    """Bytes this rank sent over each channel so far (payloads, metadata messages included)."""
    _in_flight: list[tuple[dist.Work, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def open(
        cls,
        channels: dict[Channel, tuple[int, int]],
        device: torch.device,
        group: dist.ProcessGroup | None = None,
        timeout_s: float | None = None,
    ) -> Transport:
        """A transport whose channels cannot hold each other up: a tag (gloo) or a group (others) per channel.

        Every rank of `group` must open its transports in the same order and with the same channels, so
        that their tags agree; with NCCL every rank of the default group must call it (it creates groups).
        """
        ordered = sorted(channels)
        if dist.get_backend(group) == "gloo":
            first_tag = _take_tags(group, len(ordered))
            tags = {channel: first_tag + i for i, channel in enumerate(ordered)}
            return cls(device, group, dict(channels), dict.fromkeys(ordered, group), tags, timeout_s)
        rank = dist.get_rank(group)
        groups: dict[Channel, dist.ProcessGroup | None] = {}
        for channel in ordered:
            src, dst = channels[channel]
            created = dist.new_group([_global(group, src), _global(group, dst)])  # called by every rank
            if rank in (src, dst):
                groups[channel] = created
        return cls(device, group, dict(channels), groups, timeout_s=timeout_s)

    @property
    def stages_through_host(self) -> bool:
        """Gloo cannot move device memory, so CUDA tensors are copied to the host and back."""
        return self.device.type != "cpu" and dist.get_backend(self.group) == "gloo"

    def send(self, tensor: torch.Tensor, channel: Channel) -> dist.Work:
        """Start sending `tensor` over `channel`; the tensor is kept alive until the send completes (`settle`,
        or `flush` at the end of the step)."""
        payload = tensor.detach()
        payload = payload.cpu() if self.stages_through_host else payload.to(self.device)
        payload = payload.contiguous()
        self.bytes_sent[channel] += payload.nbytes
        dst = self.channels[channel][1]
        group = self.groups.get(channel, self.group)
        try:
            work = dist.isend(payload, dst=_global(self.group, dst), group=group, tag=self.tags.get(channel, 0))
        except RuntimeError as error:
            me = self.channels[channel][0]
            raise ConnectionError(
                f"rank {me}: could not send to rank {dst} over {channel}: that rank ended (returned, exited or crashed)"
            ) from error
        assert work is not None
        self._in_flight.append((work, payload))
        self._forget_finished()
        return work

    def settle(self, sends: list[dist.Work]) -> None:
        """Let go of the buffers of `sends`, which the caller knows are done (their receiver answered).

        Gloo tells a send is done only to a wait, so without this a sent buffer lives until the step's end.
        """
        for work in sends:
            work.wait()
        done = {id(work) for work in sends}
        self._in_flight = [(w, t) for w, t in self._in_flight if id(w) not in done]

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, channel: Channel) -> Incoming:
        """Post a receive of a tensor of `shape` and `dtype` over `channel`."""
        on_host = self.stages_through_host
        buffer = torch.empty(shape, dtype=dtype, device="cpu" if on_host else self.device)
        src = self.channels[channel][0]
        group = self.groups.get(channel, self.group)
        work = dist.irecv(buffer, src=_global(self.group, src), group=group, tag=self.tags.get(channel, 0))
        me = self.channels[channel][1]
        what = f"rank {me}: the message from rank {src} over {channel}"
        bounded = self.timeout_s if dist.get_backend(self.group) == "gloo" else None
        return Incoming(buffer, work, self.device, what, bounded)

    def all_reduce(self, tensor: torch.Tensor, group: dist.ProcessGroup, what: str) -> Incoming:
        """Start summing `tensor` over the ranks of `group` (a replicated stage's); `wait()` gives the sum.

        One collective rather than a message to every other rank: a ring all-reduce sends each rank's
        gradient about twice whatever the number of replicas. Every rank of `group` ends with the same bits.
        """
        buffer = tensor.detach()
        buffer = (buffer.cpu() if self.stages_through_host else buffer.to(self.device)).contiguous()
        work = dist.all_reduce(buffer, group=group, async_op=True)
        bounded = self.timeout_s if dist.get_backend(group) == "gloo" else None
        return Incoming(buffer, work, self.device, what, bounded)

    def recv_now(self, shape: tuple[int, ...], dtype: torch.dtype, channel: Channel) -> torch.Tensor:
        return self.recv(shape, dtype, channel).wait()

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

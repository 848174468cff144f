"""Point-to-point tensor transfers between ranks over torch.distributed.

Sends and receives are asynchronous: `send` returns at once, `recv` posts a
buffer and returns a handle whose `wait()` gives the tensor. With the gloo
backend, CUDA tensors travel through host memory (gloo only moves CPU tensors).
"""

from __future__ import annotations

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
    """Sends and receives tensors to and from other ranks of `group` (ranks are group ranks)."""

    device: torch.device
    group: dist.ProcessGroup | None = None
    _in_flight: list[tuple[dist.Work, torch.Tensor]] = field(default_factory=list)

    @property
    def stages_through_host(self) -> bool:
        """Gloo cannot move device memory, so CUDA tensors are copied to the host and back."""
        return self.device.type != "cpu" and dist.get_backend(self.group) == "gloo"

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Start sending `tensor` to `dst`; the tensor is kept alive until the send completes."""
        payload = tensor.detach()
        if self.stages_through_host:
            payload = payload.cpu()
        payload = payload.contiguous()
        work = dist.isend(payload, dst=self._global(dst), group=self.group)
        assert work is not None
        self._in_flight.append((work, payload))
        self._forget_finished()

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> Incoming:
        """Post a receive of a tensor of `shape` and `dtype` from `src`."""
        on_host = self.stages_through_host
        buffer = torch.empty(shape, dtype=dtype, device="cpu" if on_host else self.device)
        work = dist.irecv(buffer, src=self._global(src), group=self.group)
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

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

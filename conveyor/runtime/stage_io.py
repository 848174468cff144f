"""Moving stage inputs, outputs and gradients between ranks, with shapes learned once.

A receiver must know shapes and dtypes before it posts a buffer. At the start
of each step the first stage names the step's *input signature* (the shapes and
dtypes of its micro-batches) and the signature travels down the pipeline, one
8-byte message per activation link. Its receive is posted at the end of the
previous step: with gloo, a receive posted after its send has arrived costs
the receiver milliseconds of handshake (docs/benchmarks.md). The first time a link sees a signature, each
activation transfer is preceded by a metadata message; the receiver caches
what it learned, so later steps with the same signature send only the data and
can post receives early. Gradients need no metadata: their shapes are those of
the activations the receiver sent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..schedules import Link, Program
from .tensor_meta import HEADER_LENGTH, TensorMeta, decode_metas, encode_metas
from .transport import Incoming, Transport

__all__ = ["StageIO"]

# (signature, receiving stage, micro-batch)
Key = tuple[int, int, int]

CLOSED = -1  # sent instead of a next step's signature by `close` (signatures are never negative)


@dataclass
class _Receive:
    """One stage input or output gradient on its way over `link`."""

    link: Link
    metas: list[TensorMeta] | None  # None until the metadata message arrives
    cache_key: Key | None = None  # where to remember the metadata once it arrives
    incoming: list[Incoming] | None = None  # None until the buffers are posted


class StageIO:
    """The transfers of one rank's stages for one program."""

    def __init__(self, transport: Transport, program: Program, rank: int) -> None:
        self.transport = transport
        self.program = program
        self.rank = rank
        self.signature = 0
        self._metas_in: dict[Key, list[TensorMeta]] = {}  # learned from senders
        self._metas_out: dict[Key, list[TensorMeta]] = {}  # already described to receivers
        self._queues: dict[Link, deque[_Receive]] = {}  # not yet posted, per link
        self._posted: dict[tuple[str, int, int], _Receive] = {}
        self._next_signature: dict[Link, Incoming] = {}  # posted at the end of the previous step
        self._between_steps = False  # a step ended, and no other began or closed the pipeline

    @property
    def receives_posted(self) -> int:
        """Receives posted and not yet waited on, those left for the next step's signature included."""
        return len(self._posted) + sum(len(q) for q in self._queues.values()) + len(self._next_signature)

    def begin_step(self, signature: int | None) -> None:
        """Agree on this step's input signature: given on the first stage's rank, received elsewhere.

        Stages are visited in order, so each rank receives from a lower stage
        before it sends on: the messages cannot wait on each other in a cycle.
        """
        program, rank = self.program, self.rank
        self._between_steps = False
        for stage in program.stages_of(rank):
            if stage == 0:
                assert signature is not None, "the first stage's rank must give the step's input signature"
                self.signature = signature
            elif program.rank_of(stage - 1) != rank:
                link = ("act", stage - 1)
                incoming = self._next_signature.pop(link, None) or self.transport.recv((1,), torch.int64, link)
                self.signature = int(incoming.wait().item())
                if self.signature == CLOSED:
                    raise RuntimeError(
                        f"rank {rank}: rank {program.rank_of(stage - 1)} closed the pipeline while this rank began"
                        " a step; every rank must call close() after the same step"
                    )
            if stage + 1 < program.num_stages and program.rank_of(stage + 1) != rank:
                self.transport.send(torch.tensor([self.signature], dtype=torch.int64), ("act", stage))

    def end_step(self) -> None:
        assert not self._posted and not any(self._queues.values()), "a receive was posted but never used"
        self.transport.flush()
        for stage in self.program.stages_of(self.rank):
            if stage > 0 and self.program.rank_of(stage - 1) != self.rank:
                link = ("act", stage - 1)
                try:
                    self._next_signature[link] = self.transport.recv((1,), torch.int64, link)
                except RuntimeError:
                    # After the last step the sender may already have closed its process group.
                    # If a next step comes, begin_step posts the receive again and reports any real failure.
                    pass
        self._between_steps = True

    def close(self) -> None:
        """Answer the receives `end_step` left posted for a next step that will not come.

        Where a rank would send the next step's signature it sends CLOSED, and
        where it posted that receive it waits for CLOSED. Every rank of the
        pipeline must call it after the same step; before any step, or a second
        time, it does nothing. A later step still works.
        """
        if not self._between_steps:
            return
        self._between_steps = False
        program, rank = self.program, self.rank
        for stage in program.stages_of(rank):
            if stage + 1 < program.num_stages and program.rank_of(stage + 1) != rank:
                self.transport.send(torch.tensor([CLOSED], dtype=torch.int64), ("act", stage))
        for link, incoming in self._next_signature.items():
            if int(incoming.wait().item()) != CLOSED:
                raise RuntimeError(
                    f"rank {rank}: a step began over {link} while this rank closed the pipeline;"
                    " every rank must call close() after the same step"
                )
        self._next_signature.clear()
        self.transport.flush()

    # Activations: the output of `stage` goes to stage + 1.

    def send_activations(self, stage: int, mb: int, tensors: Sequence[torch.Tensor]) -> None:
        metas = [TensorMeta.of(t) for t in tensors]
        key = (self.signature, stage + 1, mb)
        described = self._metas_out.get(key)
        link = ("act", stage)
        if described is None:
            self.transport.send(encode_metas(metas, f"stage {stage} output"), link)
            self._metas_out[key] = metas
        elif described != metas:
            raise RuntimeError(
                f"stage {stage} output for micro-batch {mb} is {_describe(metas)}, but an earlier step with"
                f" the same input shapes gave {_describe(described)}: a stage's output shapes must depend"
                " only on its input shapes"
            )
        for tensor in tensors:
            self.transport.send(tensor, link)

    def post_activations(self, stage: int, mb: int) -> None:
        """Post the receive of `stage`'s inputs (from stage - 1) for micro-batch `mb`."""
        key = (self.signature, stage, mb)
        self._post(("act", stage, mb), _Receive(("act", stage - 1), self._metas_in.get(key), cache_key=key))

    def wait_activations(self, stage: int, mb: int) -> list[torch.Tensor]:
        receive = self._wait(("act", stage, mb))
        assert receive.metas is not None
        return [
            t.requires_grad_(m.requires_grad and t.is_floating_point())
            for t, m in zip(self._tensors(receive), receive.metas, strict=True)
        ]

    # Gradients: the gradient of `stage`'s input goes back to stage - 1.

    def send_gradients(self, stage: int, grads: Sequence[torch.Tensor]) -> None:
        for grad in grads:
            self.transport.send(grad, ("grad", stage))

    def post_gradients(self, stage: int, mb: int, metas: list[TensorMeta]) -> None:
        """Post the receive of the gradients of `stage`'s outputs described by `metas`."""
        self._post(("grad", stage, mb), _Receive(("grad", stage + 1), metas))

    def wait_gradients(self, stage: int, mb: int) -> list[torch.Tensor]:
        return self._tensors(self._wait(("grad", stage, mb)))

    # Receives on one link are posted in program order, because a link's
    # messages match in posting order. A receive whose shapes are not known
    # yet holds back the ones behind it until its metadata arrives.

    def _post(self, name: tuple[str, int, int], receive: _Receive) -> None:
        self._posted[name] = receive
        self._queues.setdefault(receive.link, deque()).append(receive)
        self._pump(receive.link, until=None)

    def _wait(self, name: tuple[str, int, int]) -> _Receive:
        receive = self._posted.pop(name, None)
        if receive is None:
            raise RuntimeError(
                f"rank {self.rank}: {name[0]} of stage {name[1]}, micro-batch {name[2]} was never posted"
            )
        self._pump(receive.link, until=receive)
        return receive

    def _pump(self, link: Link, until: _Receive | None) -> None:
        """Post queued receives of `link` in order; block on metadata only up to `until`."""
        queue = self._queues[link]
        while queue:
            head = queue[0]
            if head.metas is None:
                if until is None or until.incoming is not None:
                    return
                header = self.transport.recv_now((HEADER_LENGTH,), torch.int64, link)
                head.metas = decode_metas(header)
                assert head.cache_key is not None
                self._metas_in[head.cache_key] = head.metas
            head.incoming = [self.transport.recv(m.shape, m.dtype, link) for m in head.metas]
            queue.popleft()

    def _tensors(self, receive: _Receive) -> list[torch.Tensor]:
        assert receive.incoming is not None
        return [incoming.wait() for incoming in receive.incoming]


def _describe(metas: Sequence[TensorMeta]) -> str:
    return ", ".join(f"{str(m.dtype).removeprefix('torch.')}{list(m.shape)}" for m in metas) or "nothing"

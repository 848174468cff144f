"""Moving stage inputs, outputs and gradients between ranks, with shapes learned once.

A receiver must know shapes and dtypes before it posts a buffer. At the start
of each step the first stage names the step's *input signature* (the shapes and
dtypes of its micro-batches) and the signature travels down the pipeline, one
small message per activation link, with what kind of run the step is (training,
or forward only), so that ranks that disagree fail at once. Its receive is
posted at the end of the previous step: with gloo, a receive posted after its
send has arrived costs the receiver milliseconds of handshake
(docs/benchmarks.md). The first time a link sees a signature, each activation
transfer is preceded by a metadata message; the receiver caches what it
learned, so later steps with the same signature send only the data and can post
receives early. Gradients need no metadata: their shapes are those of the
activations the receiver sent.

All of it travels per channel (`Program.channel`): a link, or, where one end
of it is a replicated stage, each pair of ranks on it, so a stage fed by
replicas hears the header of each and checks that they agree.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..schedules import Channel, Link, Program
from .tensor_meta import HEADER_LENGTH, TensorMeta, decode_metas, encode_metas
from .transport import Incoming, Transport

__all__ = ["FORWARD_ONLY", "STEP_HEADER", "StageIO", "TRAINING"]

# (signature, kind of run, channel, micro-batch): a forward-only run sends no gradient flags
Key = tuple[int, int, Channel, int]

CLOSED = -1  # sent instead of a next step's signature by `close` (signatures are never negative)
TRAINING, FORWARD_ONLY = 0, 1  # what kind of run a step is: the header's second word
_RUNS = {TRAINING: "a training step", FORWARD_ONLY: "a forward-only run (evaluate or predict)"}
STEP_HEADER = 4  # words of a step header: signature, kind of run, runs so far, the caller's options


@dataclass
class _Receive:
    """One stage input or output gradient on its way over `channel`."""

    channel: Channel
    metas: list[TensorMeta] | None  # None until the metadata message arrives
    cache_key: Key | None = None  # where to remember the metadata once it arrives
    incoming: list[Incoming] | None = None  # None until the buffers are posted
    own_header: bool = True  # False: an earlier receive on the link brings the metadata for this key


class StageIO:
    """The transfers of one rank's stages for one program."""

    def __init__(self, transport: Transport, program: Program, rank: int) -> None:
        self.transport = transport
        self.program = program
        self.rank = rank
        self.signature = 0
        self.run = TRAINING
        self.runs = 0  # runs begun, counted alike on every rank
        self._peer_runs: dict[int, int] = {}  # the run each upstream rank last began, from its header
        self.uniform = False
        self._metas_in: dict[Key, list[TensorMeta]] = {}  # learned from senders
        self._metas_out: dict[Key, list[TensorMeta]] = {}  # already described to receivers
        self._queues: dict[Channel, deque[_Receive]] = {}  # not yet posted, per channel
        self._posted: dict[tuple[Link, int], _Receive] = {}
        self._next_header: dict[Channel, Incoming] = {}  # posted at the end of the previous step
        self._channels = program.channels()
        self._between_steps = False  # a step ended, and no other began or closed the pipeline
        # Activations sent and not yet answered by their gradients, whose buffers the transport still holds.
        self._unanswered: dict[tuple[Link, int], list[dist.Work]] = {}

    @property
    def receives_posted(self) -> int:
        """Receives posted and not yet waited on, those left for the next step's header included."""
        return len(self._posted) + sum(len(q) for q in self._queues.values()) + len(self._next_header)

    def _incoming(self, stage: int) -> list[Channel]:
        """The activation channels from other ranks into `stage` on this rank (the order headers come in)."""
        return sorted(
            c
            for c, (_, receiver) in self._channels.items()
            if c[0] == "act" and c[2] == stage and receiver == self.rank
        )

    def _incoming_channels(self) -> list[Channel]:
        return [c for s in self.program.stages_of(self.rank) for c in self._incoming(s)]

    def _outgoing(self, stage: int) -> list[Channel]:
        return sorted(
            c for c, (sender, _) in self._channels.items() if c[0] == "act" and c[1] == stage and sender == self.rank
        )

    def begin_step(
        self, signature: int | None, run: int = TRAINING, uniform: bool = False, options: tuple[str, int] = ("", 0)
    ) -> None:
        """Agree on this step's input signature and kind of run: given on the first stage's rank, received elsewhere.

        `uniform`: every micro-batch has the same shapes (a stream's), so each link is described once, not
        once per micro-batch. `options` is (what, value): a flag of the caller that changes which messages
        the step sends (`loss_on_all_ranks`), compared with every upstream rank's, as is the count of runs
        so far, so a one-sided option or an extra run fails at once instead of waiting.

        Stages are visited in order, so each rank receives from a lower stage
        before it sends on: the messages cannot wait on each other in a cycle.
        """
        program, rank = self.program, self.rank
        self._between_steps = False
        self.run = run
        self.uniform = uniform
        self.runs += 1
        what, option = options
        for stage in program.stages_of(rank):
            if stage == 0:
                assert signature is not None, "the first stage's rank must give the step's input signature"
                self.signature = signature
            heard: dict[int, int] = {}  # sender -> its signature
            for channel in self._incoming(stage):
                incoming = self._next_header.pop(channel, None) or self.transport.recv(
                    (STEP_HEADER,), torch.int64, channel
                )
                try:
                    self.signature, theirs, their_runs, their_option = incoming.wait().tolist()
                except (TimeoutError, ConnectionError) as error:
                    raise type(error)(f"{error} [the header of this rank's run {self.runs}]") from None
                sender = self._channels[channel][0]
                heard[sender] = self.signature
                self._peer_runs[sender] = their_runs
                if self.signature == CLOSED:
                    raise RuntimeError(
                        f"rank {rank}: rank {sender} closed the pipeline while this rank began"
                        " a step; every rank must call close() after the same step"
                    )
                if theirs != run:
                    raise RuntimeError(
                        f"rank {rank} began {_RUNS[run]} while rank {sender} began {_RUNS.get(theirs, theirs)}:"
                        " every rank must call the same method (step, evaluate or predict) in the same order"
                    )
                if their_runs != self.runs:
                    raise RuntimeError(
                        f"rank {rank} began its run {self.runs} of the pipeline (step, evaluate, predict or stream)"
                        f" while rank {sender} began its run {their_runs}: every rank must make the same calls"
                    )
                if their_option != option:
                    raise RuntimeError(
                        f"rank {rank} was called with {what}={bool(option)} while rank {sender} was called with"
                        f" {what}={bool(their_option)}: every rank must pass the same"
                    )
            if len(set(heard.values())) > 1:
                raise RuntimeError(
                    f"rank {rank}: the replicas feeding stage {stage} began steps on different input shapes"
                    f" (signatures {heard} by rank); every rank must be given the same batch"
                )
            for channel in self._outgoing(stage):
                header = [self.signature, run, self.runs, option]
                self.transport.send(torch.tensor(header, dtype=torch.int64), channel)

    def end_step(self) -> None:
        assert not self._posted and not any(self._queues.values()), "a receive was posted but never used"
        self.transport.flush()
        self._unanswered.clear()  # edges that carry no gradient, and forward-only runs: flushed above
        for channel in self._incoming_channels():
            try:
                self._next_header[channel] = self.transport.recv((STEP_HEADER,), torch.int64, channel)
            except RuntimeError:
                # After the last step the sender may already have closed its process group.
                # If a next step comes, begin_step posts the receive again and reports any real failure.
                pass
        self._between_steps = True

    def close(self) -> None:
        """Answer the receives `end_step` left posted for a next step that will not come.

        Where a rank would send the next step's header it sends CLOSED, and
        where it posted that receive it waits for CLOSED. Every rank of the
        pipeline must call it after the same step; before any step, or a second
        time, it does nothing. A later step still works.
        """
        if not self._between_steps:
            return
        self._between_steps = False
        for stage in self.program.stages_of(self.rank):
            for channel in self._outgoing(stage):
                self.transport.send(torch.tensor([CLOSED, TRAINING, self.runs, 0], dtype=torch.int64), channel)
        for channel, incoming in self._next_header.items():
            if int(incoming.wait()[0].item()) != CLOSED:
                raise RuntimeError(
                    f"rank {self.rank}: a step began over {channel} while this rank closed the pipeline;"
                    " every rank must call close() after the same step"
                )
        self._next_header.clear()
        self.transport.flush()

    def send(self, link: Link, mb: int, tensors: Sequence[torch.Tensor]) -> None:
        """Send micro-batch `mb`'s values over `link`: activations (described once per signature) or gradients."""
        channel = self.program.channel(link, mb)
        if link[0] == "act":
            self._describe(channel, mb, tensors)
        sends = [self.transport.send(tensor, channel) for tensor in tensors]
        if link[0] == "act" and self.run == TRAINING:
            self._unanswered[(link, mb)] = sends

    def _describe(self, channel: Channel, mb: int, tensors: Sequence[torch.Tensor]) -> None:
        link = channel[:3]
        metas = [TensorMeta.of(t) for t in tensors]
        key = self._key(channel, mb)
        described = self._metas_out.get(key)
        if described is None:
            self.transport.send(encode_metas(metas, f"stage {link[1]} output for stage {link[2]}"), channel)
            self._metas_out[key] = metas
        elif described != metas:
            raise RuntimeError(
                f"stage {link[1]} output for stage {link[2]}, micro-batch {mb}, is {_describe(metas)}, but an"
                f" earlier step with the same input shapes gave {_describe(described)}: a stage's output shapes"
                " must depend only on its input shapes"
            )

    def _key(self, channel: Channel, mb: int) -> Key:
        return (self.signature, self.run, channel, 0 if self.uniform else mb)

    def post_activations(self, link: Link, mb: int) -> None:
        """Post the receive of micro-batch `mb`'s values over activation link `link`."""
        channel = self.program.channel(link, mb)
        key = self._key(channel, mb)
        known = self._metas_in.get(key)
        # In a uniform run one metadata message describes every micro-batch: only the first receive reads it.
        leader = any(r.cache_key == key and r.own_header for r in self._queues.get(channel, ()))
        self._post((link, mb), _Receive(channel, known, cache_key=key, own_header=not leader))

    def post_gradients(self, link: Link, mb: int, metas: list[TensorMeta]) -> None:
        """Post the receive of the gradients described by `metas` over gradient link `link`."""
        self._post((link, mb), _Receive(self.program.channel(link, mb), metas))

    def wait(self, link: Link, mb: int) -> list[torch.Tensor]:
        """The tensors of micro-batch `mb` over `link`, once they arrived (activations with their gradient flags)."""
        receive = self._posted.pop((link, mb), None)
        if receive is None:
            raise RuntimeError(
                f"rank {self.rank}: {link[0]} of edge {link[1]}->{link[2]}, micro-batch {mb} was never posted"
            )
        self._pump(receive.channel, until=receive)
        assert receive.incoming is not None and receive.metas is not None
        try:
            tensors = [incoming.wait() for incoming in receive.incoming]
        except (TimeoutError, ConnectionError) as error:
            what = "activations" if link[0] == "act" else "gradients"
            sender = self._channels[receive.channel][0]
            known = self._peer_runs.get(sender)
            last = "" if known is None else f"; rank {sender} last began run {known}, this rank is in run {self.runs}"
            raise type(error)(f"{error} [{what} of edge {link[1]}->{link[2]}, micro-batch {mb}{last}]") from None
        if link[0] == "grad":
            # Their activations reached the receiver before it could answer: let the sent buffers go now,
            # not at the end of the step, so a rank holds only the micro-batches its schedule keeps.
            answered = self._unanswered.pop((("act", link[1], link[2]), mb), None)
            if answered:
                self.transport.settle(answered)
            return tensors
        return [
            t.requires_grad_(m.requires_grad and t.is_floating_point())
            for t, m in zip(tensors, receive.metas, strict=True)
        ]

    # Receives on one link are posted in program order, because a link's
    # messages match in posting order. A receive whose shapes are not known
    # yet holds back the ones behind it until its metadata arrives.

    def _post(self, name: tuple[Link, int], receive: _Receive) -> None:
        self._posted[name] = receive
        self._queues.setdefault(receive.channel, deque()).append(receive)
        self._pump(receive.channel, until=None)

    def _pump(self, channel: Channel, until: _Receive | None) -> None:
        """Post queued receives of `channel` in order; block on metadata only up to `until`."""
        queue = self._queues[channel]
        while queue:
            head = queue[0]
            if head.metas is None and not head.own_header:
                assert head.cache_key is not None
                head.metas = self._metas_in[head.cache_key]  # its leader, ahead in this queue, learned it
            if head.metas is None:
                if until is None or until.incoming is not None:
                    return
                header = self.transport.recv_now((HEADER_LENGTH,), torch.int64, channel)
                head.metas = decode_metas(header)
                assert head.cache_key is not None
                self._metas_in[head.cache_key] = head.metas
            head.incoming = [self.transport.recv(m.shape, m.dtype, channel) for m in head.metas]
            queue.popleft()


def _describe(metas: Sequence[TensorMeta]) -> str:
    return ", ".join(f"{str(m.dtype).removeprefix('torch.')}{list(m.shape)}" for m in metas) or "nothing"

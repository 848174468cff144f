"""Tied parameters: one parameter held by several stages, whose gradients are summed before each step.

The split registers a tied parameter (GPT-2's token embedding, reused by its LM
head) on every stage that uses it. Stages on one rank share one tensor, so
autograd already sums their parts; ranks exchange their parts point to point.
A REDUCE action offers this rank's part once every local holder has offered
it; the STEP behind it waits for the other ranks' parts and adds them up in
rank order, so every holder ends with the same bits and steps alike, as the
unsplit model's one parameter would.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..schedules import Program
from .transport import Channel, Incoming, Transport

__all__ = ["TiedGradients", "tie_channels"]

Key = tuple[int, int | None]  # (tie index, micro-batch of an asynchronous step, or None for a mini-batch)


def tie_channels(program: Program) -> dict[Channel, tuple[int, int]]:
    """The channels the ranks of each tie exchange gradients over: ("tie<i>", sender, receiver)."""
    channels: dict[Channel, tuple[int, int]] = {}
    for index, tie in enumerate(program.graph.ties):
        ranks = sorted({program.rank_of(s) for s in tie.stages})
        for a in ranks:
            for b in ranks:
                if a != b:
                    channels[(f"tie{index}", a, b)] = (a, b)
    return channels


class TiedGradients:
    """The gradient sums of this rank's tied parameters. `params[i]` is the rank's tensor of tie i."""

    def __init__(self, program: Program, rank: int, params: Mapping[int, nn.Parameter], transport: Transport) -> None:
        self.program = program
        self.rank = rank
        self.params = dict(params)
        self.transport = transport
        ties = program.graph.ties
        self._local = {i: {s for s in ties[i].stages if program.rank_of(s) == rank} for i in self.params}
        self._ranks = {i: sorted({program.rank_of(s) for s in ties[i].stages}) for i in self.params}
        self._offered: dict[Key, set[int]] = {}
        self._incoming: dict[Key, dict[int, Incoming]] = {}
        self._mine: dict[Key, torch.Tensor] = {}
        self._stepped: dict[Key, set[int]] = {}
        missing = [i for i, tie in enumerate(ties) if any(program.rank_of(s) == rank for s in tie.stages)]
        if sorted(self.params) != missing:
            raise ValueError(f"rank {rank} holds ties {missing} but was given the tensors of {sorted(self.params)}")

    def _ties_of(self, stage: int) -> list[int]:
        return [i for i in self.params if stage in self._local[i]]

    def offer(self, stage: int, mb: int | None) -> None:
        """REDUCE: `stage` has its part of the gradients; once every local holder has, send this rank's part."""
        for i in self._ties_of(stage):
            key = (i, mb)
            offered = self._offered.setdefault(key, set())
            offered.add(stage)
            if offered != self._local[i]:
                continue
            param = self.params[i]
            mine = param.grad if param.grad is not None else torch.zeros_like(param)
            self._mine[key] = mine
            incoming = {}
            for other in self._ranks[i]:
                if other != self.rank:
                    self.transport.send(mine, (f"tie{i}", self.rank, other))
                    incoming[other] = self.transport.recv(
                        tuple(param.shape), param.dtype, (f"tie{i}", other, self.rank)
                    )
            self._incoming[key] = incoming

    def wait(self, stage: int, mb: int | None) -> None:
        """Before `stage`'s STEP: the full gradient of each of its tied parameters, the same on every rank."""
        for i in self._ties_of(stage):
            key = (i, mb)
            if key in self._mine:  # the first local holder to step sums; the others find it done
                parts = {self.rank: self._mine.pop(key)}
                parts.update({r: incoming.wait() for r, incoming in self._incoming.pop(key).items()})
                ranks = self._ranks[i]
                total = parts[ranks[0]]
                for r in ranks[1:]:
                    total = total + parts[r]
                self.params[i].grad = total
            elif self._offered.get(key) != self._local[i]:
                raise RuntimeError(
                    f"rank {self.rank}: stage {stage} steps before every local holder of tie {i} offered its gradient"
                )
            stepped = self._stepped.setdefault(key, set())
            stepped.add(stage)
            if stepped == self._local[i]:
                del self._offered[key], self._stepped[key]

"""Shared gradients: parameters held on several ranks, whose gradients are summed before each step.

Two things share them. A tied parameter (GPT-2's token embedding, reused by
its LM head) is registered on every stage that uses it; stages on one rank
share one tensor, so autograd already sums their parts, and ranks exchange
theirs. A replicated stage (1F1B-RR, or pipeline x data parallelism) is held
by several ranks that each ran some of its micro-batches; they sum all of the
stage's gradients, in one bucket, with an all-reduce over the process group
of its replicas (as DDP does).

A REDUCE action offers this rank's part once every local holder has offered
it; the STEP behind it waits for the sum: a tie's, from the other ranks'
parts added up in rank order, a replicated stage's from its all-reduce. Every
holder ends with the same bits and steps alike, as the unsplit model's one
parameter would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..schedules import Channel, Program, StageGraph, replica_gradient_scale
from .transport import Incoming, Transport

__all__ = ["SharedGradients", "share_gradients", "share_local_ties", "shared_channels"]

Key = tuple[str, int | None]  # (group, micro-batch of an asynchronous step, or None for a mini-batch)


@dataclass
class _Group:
    """Tensors whose gradients `ranks` sum: one tied parameter, or all of a replicated stage's."""

    name: str
    ranks: list[int]
    holders: set[int]
    """The stages on this rank that hold the tensors (all must offer before this rank sends)."""
    params: Sequence[nn.Parameter]
    scale: float = 1.0
    """What the sum is multiplied by (see `replica_gradient_scale`)."""
    collective: dist.ProcessGroup | None = None
    """A replicated stage's: the process group of its replicas, which all-reduce its gradients."""


def _tie_ranks(program: Program, index: int) -> list[int]:
    return sorted({program.rank_of(s) for s in program.graph.ties[index].stages})


def shared_channels(program: Program) -> dict[Channel, tuple[int, int]]:
    """The channels the ranks of each group exchange gradients over: (group, sender, receiver).

    A group is "tie<i>" for the graph's tie i and "replicas<s>" for a replicated stage s.
    """
    groups = [(f"tie{i}", _tie_ranks(program, i)) for i in range(len(program.graph.ties))]
    groups += [(f"replicas{s}", list(program.replicas_of(s))) for s in range(program.num_stages)]
    return {(name, a, b): (a, b) for name, ranks in groups for a in ranks for b in ranks if a != b}


class SharedGradients:
    """The gradient sums of this rank's shared tensors.

    `tied[i]` is the rank's tensor of tie i; `replicated[s]` the parameters of
    a replicated stage s on this rank, and `replica_groups[s]` the process group
    of the ranks that hold it.
    """

    def __init__(
        self,
        program: Program,
        rank: int,
        tied: Mapping[int, nn.Parameter],
        replicated: Mapping[int, Sequence[nn.Parameter]],
        replica_groups: Mapping[int, dist.ProcessGroup],
        transport: Transport,
    ) -> None:
        self.rank = rank
        self.transport = transport
        ties = program.graph.ties
        holding = [i for i, tie in enumerate(ties) if any(program.rank_of(s) == rank for s in tie.stages)]
        if sorted(tied) != holding:
            raise ValueError(f"rank {rank} holds ties {holding} but was given the tensors of {sorted(tied)}")
        groups = [
            _Group(f"tie{i}", _tie_ranks(program, i), {s for s in ties[i].stages if program.rank_of(s) == rank}, [p])
            for i, p in tied.items()
        ]
        groups += [
            _Group(
                f"replicas{s}",
                list(program.replicas_of(s)),
                {s},
                list(params),
                replica_gradient_scale(program, s),
                replica_groups[s],
            )
            for s, params in replicated.items()
        ]
        self._groups = {g.name: g for g in groups}
        self._offered: dict[Key, set[int]] = {}
        self._incoming: dict[Key, dict[int, Incoming]] = {}
        self._sums: dict[Key, Incoming] = {}
        self._mine: dict[Key, torch.Tensor] = {}
        self._stepped: dict[Key, set[int]] = {}

    def _groups_of(self, stage: int) -> list[_Group]:
        return [g for g in self._groups.values() if stage in g.holders]

    def offer(self, stage: int, mb: int | None) -> None:
        """REDUCE: `stage` has its part of the gradients; once every local holder has, send this rank's part."""
        for group in self._groups_of(stage):
            key = (group.name, mb)
            offered = self._offered.setdefault(key, set())
            offered.add(stage)
            if offered != group.holders:
                continue
            mine = _flat_grads(group.params)
            self._mine[key] = mine
            if group.collective is not None:
                what = f"rank {self.rank}: the sum of {group.name}'s gradients over ranks {group.ranks}"
                self._sums[key] = self.transport.all_reduce(mine, group.collective, what)
                continue
            incoming = {}
            for other in group.ranks:
                if other != self.rank:
                    self.transport.send(mine, (group.name, self.rank, other))
                    incoming[other] = self.transport.recv(tuple(mine.shape), mine.dtype, (group.name, other, self.rank))
            self._incoming[key] = incoming

    def wait(self, stage: int, mb: int | None) -> None:
        """Before `stage`'s STEP: the summed gradient of each of its shared tensors, the same on every rank."""
        for group in self._groups_of(stage):
            key = (group.name, mb)
            if key in self._mine:  # the first local holder to step sums; the others find it done
                mine = self._mine.pop(key)
                if key in self._sums:
                    total = self._sums.pop(key).wait()
                else:
                    parts = {self.rank: mine}
                    parts.update({r: incoming.wait() for r, incoming in self._incoming.pop(key).items()})
                    total = parts[group.ranks[0]]
                    for r in group.ranks[1:]:
                        total = total + parts[r]
                if group.scale != 1.0:
                    total = total * group.scale
                _set_grads(group.params, total)
            elif self._offered.get(key) != group.holders:
                raise RuntimeError(
                    f"rank {self.rank}: stage {stage} steps before every local holder of {group.name} offered its"
                    " gradient"
                )
            stepped = self._stepped.setdefault(key, set())
            stepped.add(stage)
            if stepped == group.holders:
                del self._offered[key], self._stepped[key]


def _flat_grads(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """The parameters' gradients in one flat tensor (zeros where a parameter got none), one message per rank.

    Always a copy, even of one parameter: the sum is still in flight when a later backward may add to `.grad`.
    """
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    return torch.cat(grads)


def _set_grads(params: Sequence[nn.Parameter], flat: torch.Tensor) -> None:
    at = 0
    for p in params:
        p.grad = flat[at : at + p.numel()].view_as(p)  # views of one buffer, as DDP's buckets
        at += p.numel()


def share_local_ties(graph: StageGraph, modules: Mapping[int, nn.Module]) -> None:
    """Stages of a tie that share this rank use one tensor (the first's), so autograd sums their parts."""
    for tie in graph.ties:
        here = [s for s in tie.stages if s in modules]
        if len(here) < 2:
            continue
        first = modules[here[0]].get_parameter(tie.name_on(here[0]))
        for s in here[1:]:
            name = tie.name_on(s)
            other = modules[s].get_parameter(name)
            if other.shape != first.shape or not torch.equal(other.detach().cpu(), first.detach().cpu()):
                raise ValueError(
                    f"tied parameter {tie.name_on(here[0])} of stage {here[0]} and {name} of stage {s}"
                    " start with different values; a tie must start equal (build both stages from one split)"
                )
            # Under every name the stage holds it by (T5's last stage reads decoder.embed_tokens.weight and also
            # holds it as lm_head.weight): a name left behind would keep a copy that nothing trains.
            for alias, param in list(modules[s].named_parameters(remove_duplicate=False)):
                if param is other:
                    owner, _, attribute = alias.rpartition(".")
                    setattr(modules[s].get_submodule(owner), attribute, first)


def share_gradients(
    program: Program,
    rank: int,
    modules: Mapping[int, nn.Module],
    transport: Transport,
    replica_groups: Mapping[int, dist.ProcessGroup],
) -> SharedGradients | None:
    """This rank's tied and replicated parameters, after checking that every rank holding them starts with the
    same bits (they sum gradients and step alike); None when it holds none."""
    tied = {}
    for index, tie in enumerate(program.graph.ties):
        here = [s for s in tie.stages if s in modules]
        if here:
            tied[index] = modules[here[0]].get_parameter(tie.name_on(here[0]))
            names = ", ".join(f"stage {s} {name}" for s, name in tie.names)
            ranks = sorted({program.rank_of(s) for s in tie.stages})
            _check_equal_start(transport, rank, f"tie{index}", ranks, [tied[index]], f"tied parameter ({names})")
    replicated = {}
    for s, module in modules.items():
        ranks = list(program.replicas_of(s))
        if len(ranks) > 1:
            replicated[s] = list(module.parameters())
            _check_equal_start(transport, rank, f"replicas{s}", ranks, replicated[s], f"stage {s}'s weights")
    if not tied and not replicated:
        return None
    return SharedGradients(program, rank, tied, replicated, replica_groups, transport)


def _check_equal_start(
    transport: Transport, rank: int, group: str, ranks: list[int], params: Sequence[nn.Parameter], what: str
) -> None:
    """Raise unless `params` have the same bits on every rank of `ranks`."""
    if len(ranks) < 2:
        return
    digest = _digest(params)
    others = {}
    for r in ranks:
        if r != rank:
            transport.send(digest, (group, rank, r))
            others[r] = transport.recv(tuple(digest.shape), digest.dtype, (group, r, rank))
    differing = [r for r, incoming in others.items() if not torch.equal(incoming.wait(), digest)]
    transport.flush()
    if differing:
        raise ValueError(
            f"{what} differ between rank {rank} and rank(s) {differing} at the start; they must start"
            " equal on every rank that holds them (build every rank's stages from one split and seed)"
        )


def _digest(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 128-bit hash of the tensors' bits, as two int64 words."""
    hashed = hashlib.blake2b(digest_size=16)
    for param in params:
        hashed.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    words = hashed.digest()
    return torch.frombuffer(bytearray(words), dtype=torch.int64).clone()

"""Weight versions of one stage in an asynchronous program: PipeDream's weight stashing.

In an asynchronous program a stage steps while other micro-batches are in
flight, and each micro-batch's backward must use the weights its forward used
(its version, from `Program.weight_versions`). Autograd keeps references to the
tensors a forward ran with, so the optimizer, which updates the live
parameters in place, must never step a tensor an in-flight micro-batch ran
with. A micro-batch whose backward comes before the stage's next step (every
one of a synchronous program, the last stage's of PipeDream) runs on the live
parameters; any other runs on a *snapshot* of its version (a detached copy,
made once per version and shared by the micro-batches that use it), through
`torch.func.functional_call`. The program says everything in advance, so a
copy is made only where a version must outlive a step. Gradients computed on a
snapshot move to the live parameters as soon as its backward ends, so
reductions and the step see them where they always are.

Without stashing (the ablation) a micro-batch's backward runs with the live
weights of that moment instead: its snapshot is overwritten with them just
before backward.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from ..schedules import Action, Kind, Program

__all__ = ["WeightVersions"]


class WeightVersions:
    """The live weights of `module` (stage `stage`) and the snapshots of older versions still needed."""

    def __init__(self, module: nn.Module, stage: int, stashing: bool = True) -> None:
        self.module = module
        self.stage = stage
        self.stashing = stashing
        self.live = 0  # updates applied since the program began: the live weights are this version
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.used: dict[int, tuple[int, int]] = {}
        """Per micro-batch of the last program: (version its forward used, version its backward used)."""
        self.peak_versions = 1
        """The most weight versions held at once: the live one and the older ones kept (PipeDream's count)."""
        self.peak_bytes = 0
        """The most bytes of snapshots held at once (a snapshot of the live version, about to change, included)."""
        self._version: dict[int, int] = {}
        self._crosses: set[int] = set()  # micro-batches with a step of this stage between their forward and backward
        self._coming: Counter[int] = Counter()  # versions of forwards still to run
        self._pending: Counter[int] = Counter()  # snapshot users: forwards still to run or backwards not yet run
        self._on_snapshot: dict[int, int] = {}  # micro-batch -> version of the snapshot it runs on

    def begin(self, program: Program, actions: list[Action]) -> None:
        """Plan a run of `program` (this rank's `actions`): which micro-batches need which version, and where."""
        if self.snapshots or self._on_snapshot:
            raise RuntimeError(
                f"stage {self.stage}: a program began while micro-batches of the last one were in flight"
            )
        versions = program.weight_versions or {}
        self.live = 0
        self.used = {}
        # Only the micro-batches this rank runs: a replica of the stage runs the others.
        mine = {a.mb for a in actions if a.stage == self.stage and a.kind is Kind.FORWARD and a.mb is not None}
        self._version = {k: v for (s, k), v in versions.items() if s == self.stage and k in mine}
        self._crosses = set()
        forwarded: set[int] = set()
        for action in actions:
            if action.stage != self.stage:
                continue
            if action.kind is Kind.FORWARD and action.mb is not None:
                forwarded.add(action.mb)
            elif action.kind is Kind.BACKWARD and action.mb is not None:
                forwarded.discard(action.mb)
            elif action.kind is Kind.STEP:
                self._crosses |= forwarded
        self._coming = Counter(self._version.values())
        self._pending = Counter()

    def forward_tensors(self, mb: int) -> dict[str, torch.Tensor] | None:
        """The parameters micro-batch `mb`'s forward runs with: None for the live module, else a snapshot."""
        version = self._version.get(mb, self.live)
        self._coming[version] -= 1
        if version == self.live and mb not in self._crosses:
            self.used[mb] = (version, version)
            return None
        if version not in self.snapshots:
            if version != self.live:
                raise RuntimeError(
                    f"stage {self.stage}: micro-batch {mb} needs weight version {version}, which was not kept"
                    f" (the live weights are version {self.live})"
                )
            self._snapshot()
        self._on_snapshot[mb] = version
        self._pending[version] += 1
        self.used[mb] = (version, -1)
        return self.snapshots[version]

    def before_backward(self, mb: int) -> None:
        """Without stashing, the backward of a micro-batch on a snapshot uses the live weights of now."""
        version = self._on_snapshot.get(mb)
        if version is None:
            return
        if not self.stashing:
            live = dict(self.module.named_parameters())
            for name, tensor in self.snapshots[version].items():
                tensor.data.copy_(live[name].data)  # .data: autograd's saved tensors must not notice
        self.used[mb] = (self.used[mb][0], version if self.stashing else self.live)

    def after_backward(self, mb: int) -> None:
        """Move the gradients computed on a snapshot to the live parameters, and let go of unused snapshots."""
        version = self._on_snapshot.pop(mb, None)
        if version is None:
            return
        live = dict(self.module.named_parameters())
        for name, tensor in self.snapshots[version].items():
            if tensor.grad is not None:
                param = live[name]
                param.grad = tensor.grad if param.grad is None else param.grad + tensor.grad
                tensor.grad = None
        self._pending[version] -= 1
        self._release(version)

    def before_step(self) -> None:
        """Keep the live version if a forward still to run needs it after this step changes the weights."""
        if self._coming[self.live] > 0 and self.live not in self.snapshots:
            self._snapshot()

    def after_step(self) -> None:
        self.live += 1
        for version in list(self.snapshots):
            self._release(version)
        self._count()

    def _count(self) -> None:
        self.peak_versions = max(self.peak_versions, len(set(self.snapshots) | {self.live}))

    def _snapshot(self) -> None:
        self.snapshots[self.live] = {
            name: param.detach().clone().requires_grad_(param.requires_grad)
            for name, param in self.module.named_parameters()
        }
        held = sum(t.nbytes for tensors in self.snapshots.values() for t in tensors.values())
        self.peak_bytes = max(self.peak_bytes, held)
        self._count()

    def _release(self, version: int) -> None:
        if self._pending[version] == 0 and self._coming[version] == 0 and version in self.snapshots:
            del self.snapshots[version]

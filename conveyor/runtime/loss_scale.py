"""Dynamic loss scaling for float16 across stages: one scale, and one decision to step or skip, for all ranks.

float16's smallest normal number is 6e-5: small gradients vanish in it. As
torch's GradScaler does, the last stage multiplies its loss by a scale S
before backward, so every gradient (the activations' between stages
included) is S times larger; before the update each stage divides its
weights' gradients by S. When any gradient overflowed to inf or NaN the
update is skipped and S halves; after `growth_interval` updates without
one, S doubles.

What a single process decides from its own gradients, a pipeline must
decide together: were one stage to skip while the others step, the stages
would hold weights of different steps. So each rank reports whether its
gradients are finite, one all-reduce takes the worst, and every rank
skips or steps alike and keeps the same S.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["MIN_SCALE", "LossScale"]

MIN_SCALE = 2.0**-24
"""The scale never backs off below this (GradScaler has no floor: after about 1,100 skips in a row its scale is
0.0 and unscaling divides by zero)."""

_FINITE, _OVERFLOW, _BAD_LOSS = 0.0, 1.0, 2.0  # what a rank reports; the all-reduce keeps the worst


class LossScale:
    """The scale of a float16 pipeline's loss (torch.amp.GradScaler's defaults and rules)."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        self.scale = init_scale
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self._good_steps = 0
        self.skipped = 0
        """Updates skipped so far because a gradient overflowed."""

    def unscale(
        self,
        grads: Iterable[torch.Tensor],
        group: dist.ProcessGroup | None,
        device: torch.device,
        loss_finite: bool = True,
    ) -> tuple[bool, bool]:
        """Divide this rank's gradients by the scale; returns (every rank's gradients are finite, some rank's
        loss was not finite) alike on every rank (a collective). `loss_finite` is this rank's loss's, if it
        has one: a loss that is inf or NaN itself is no overflow a smaller scale would cure."""
        inverse = 1.0 / self.scale
        checks = []
        for grad in grads:
            grad.mul_(inverse)
            checks.append(torch.isfinite(grad).all())
        # One flag for all of them (on a GPU, no host sync per tensor), the worst over the ranks.
        overflow = (~torch.stack(checks).all()).float() if checks else torch.zeros((), device=device)
        if not loss_finite:
            overflow = torch.full((), _BAD_LOSS, device=overflow.device)
        if dist.get_backend(group) == "gloo":
            overflow = overflow.cpu()
        dist.all_reduce(overflow, op=dist.ReduceOp.MAX, group=group)
        worst = float(overflow.item())
        return worst == _FINITE, worst == _BAD_LOSS

    def state(self) -> torch.Tensor:
        """The scale and its counters, for a checkpoint (float64: the scale is a power of 2 up to 2**1023)."""
        return torch.tensor([self.scale, self._good_steps, self.skipped], dtype=torch.float64)

    def load_state(self, state: torch.Tensor) -> None:
        scale, good, skipped = state.tolist()
        self.scale, self._good_steps, self.skipped = scale, int(good), int(skipped)

    def update(self, finite: bool) -> None:
        """After a step (finite) or a skipped one: back off, or grow after `growth_interval` good steps."""
        if not finite:
            self.scale = max(MIN_SCALE, self.scale * self.backoff_factor)
            self._good_steps = 0
            self.skipped += 1
            return
        self._good_steps += 1
        if self._good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self._good_steps = 0

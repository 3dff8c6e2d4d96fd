"""Learning-rate schedules: a small typed record and a pure `lr_at(step)`.

Invariants:
- `lr_at(step)` is a pure function of the schedule and the step, so a resumed
  run needs no scheduler state: the step number recorded at the last commit is
  enough to continue with exactly the same learning rates.
- Steps count from 0, and the learning rate used *for* step `s` is `lr_at(s)`.
  This is the Hugging Face convention (`LambdaLR` evaluated at `last_epoch = s`):
  warm-up rises linearly from 0 at step 0 to `lr` at step `warmup_steps`, then
  the rate decays to `lr * min_lr_ratio` at step `total_steps`.
- With `min_lr_ratio = 0` the values equal `transformers`'
  `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
  `get_cosine_schedule_with_warmup`; cosine with `min_lr_ratio > 0` equals
  `get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=...)`. The factor
  arithmetic below is written in the same order as theirs so the floats agree
  to the last bit, not just within a tolerance.
- Past `total_steps` the rate stays at its final value (HF's cosine would rise
  again along the cosine; a run never asks for those steps, and a flat tail is
  the safer answer if one does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .errors import UserError

ScheduleKind = Literal["constant", "linear", "cosine"]
KINDS: tuple[str, ...] = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """A learning-rate schedule with linear warm-up.

    Fields are validated on construction; a bad value raises `UserError`
    naming the field (these come straight from the user's config or flags).
    """

    kind: ScheduleKind
    """"constant", "linear" (decay to the minimum) or "cosine" (half-cosine decay to the minimum)."""
    lr: float
    """Peak learning rate, reached at the end of warm-up."""
    warmup_steps: int
    """Steps of linear warm-up from 0 to `lr`; 0 starts at `lr`."""
    total_steps: int
    """Total optimizer steps of the run; decay ends here."""
    min_lr_ratio: float = 0.0
    """Final rate as a fraction of `lr` (linear and cosine only)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"schedule.kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr < 0:
            raise UserError(f"schedule.lr: expected a finite number >= 0, got {self.lr!r}")
        if not _is_int(self.total_steps) or self.total_steps < 1:
            raise UserError(f"schedule.total_steps: expected an integer >= 1, got {self.total_steps!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise UserError(f"schedule.warmup_steps: expected an integer >= 0, got {self.warmup_steps!r}")
        if self.warmup_steps > self.total_steps:
            raise UserError(
                f"schedule.warmup_steps: {self.warmup_steps} is more than total_steps ({self.total_steps})"
            )
        ratio = self.min_lr_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise UserError(f"schedule.min_lr_ratio: expected a number in [0, 1], got {ratio!r}")

    @property
    def min_lr(self) -> float:
        """The rate at the end of decay (`lr` itself for a constant schedule)."""
        return self.lr if self.kind == "constant" else self.lr * self.min_lr_ratio

    def lr_at(self, step: int) -> float:
        """Learning rate for step `step` (counting from 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        # LambdaLR returns base_lr * factor; multiply the same way for bit-equal results.
        return self.lr * self.factor_at(step)

    def factor_at(self, step: int) -> float:
        """The multiplier of `lr` at `step`: what HF's `lr_lambda(step)` returns."""
        warmup, total = self.warmup_steps, self.total_steps
        if step < warmup:
            return float(step) / float(max(1, warmup))
        if self.kind == "constant":
            return 1.0
        step = min(step, total)  # flat tail past the end (module docstring)
        progress_den = float(max(1, total - warmup))
        if self.kind == "linear":
            remaining = max(0.0, float(total - step) / progress_den)
            if self.min_lr_ratio == 0.0:
                return remaining  # exactly HF's expression
            return remaining * (1 - self.min_lr_ratio) + self.min_lr_ratio
        progress = float(step - warmup) / progress_den
        factor = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
        factor = factor * (1 - self.min_lr_ratio) + self.min_lr_ratio
        return max(0.0, factor)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

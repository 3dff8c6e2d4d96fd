"""Update rules: per-tensor, in-place updates applied inside backward.

A rule sees one parameter at a time, the moment its gradient is complete, and
must not know where the tensor lives (a view into a staging buffer, a CUDA
tensor, ...). Math is done in fp32 and written back in the parameter's own
dtype; for an fp32 parameter the update happens in place with no copy, so the
transient cost is the gradient alone (4 B/elem of the current tensor). For a
bf16/fp16 parameter it is an fp32 copy of the parameter and of the gradient
(8 B/elem of the current tensor).

Rules are stateless objects (SGD keeps no state: this is LOMO's point). A rule
that needs per-tensor state declares it with `state_spec`; the runtime keeps
that state beside the tensor's unit, so it streams with the unit's weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import UserError


class UpdateRule(Protocol):
    """What the runtime needs of an update rule."""

    lr: float

    def state_spec(self, param: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-tensor state this rule keeps, as name -> (shape, dtype); empty if stateless."""
        ...

    def apply(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float) -> None:
        """Update `param` in place from `grad` (which the caller frees afterwards)."""
        ...


@dataclass
class SGD:
    """Plain SGD fused into backward, as in LOMO (arXiv 2306.09782).

    Arguments follow `torch.optim.SGD` (no momentum: momentum is optimizer state).
    Weight decay is applied as `p *= 1 - lr * weight_decay` before the gradient
    step, which equals torch's coupled `g + wd * p` form: p - lr*(g + wd*p) =
    p*(1 - lr*wd) - lr*g. `clip_grad_value` clamps each gradient element to
    [-v, v] before the step, as `torch.nn.utils.clip_grad_value_` does.
    `clip_grad_norm` needs the norm of all gradients before any update; the
    runtime runs the two-pass scheme for it (see `Runtime.backward`).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_grad_value: float | None = None
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        _check_positive("lr", self.lr, allow_zero=True)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        if self.clip_grad_value is not None:
            _check_positive("clip_grad_value", self.clip_grad_value)
        if self.clip_grad_norm is not None:
            _check_positive("clip_grad_norm", self.clip_grad_norm)

    def state_spec(self, param: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {}

    def apply(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float) -> None:
        if self.clip_grad_value is not None:
            grad = grad.clamp(-self.clip_grad_value, self.clip_grad_value)
        if param.dtype == torch.float32:
            # In place on the stored tensor: no fp32 copy needed.
            if self.weight_decay:
                param.mul_(1.0 - lr * self.weight_decay)
            param.add_(grad.to(torch.float32), alpha=-lr)
            return
        work = param.to(torch.float32)
        if self.weight_decay:
            work.mul_(1.0 - lr * self.weight_decay)
        work.add_(grad.to(torch.float32), alpha=-lr)
        param.copy_(work)


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"update rule: {name} must be a finite number {bound}, got {value!r}")

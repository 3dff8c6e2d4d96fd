"""Update rules: per-tensor, in-place updates applied inside backward.

A rule sees one parameter at a time, the moment its gradient is complete, and
must not know where the tensor lives. The runtime hands it

* `work`: the fp32 values to update in place. For an fp32 parameter this *is*
  the parameter (no copy); for bf16/fp16 it is an fp32 copy (or the fp32
  master weights, when kept) that the runtime rounds back into the parameter,
  to nearest or stochastically;
* `grad`: the fp32 gradient, already unscaled (fp16 loss scaling), clipped by
  value and multiplied by the norm-clipping coefficient;
* `state`: the rule's per-tensor tensors, declared by `state_spec`. They live
  in the unit's file beside the weights and stream with them, so a rule with
  state costs disk and I/O, not resident memory beyond the units in use;
* `ctx`: the learning rate and the 1-based update count (bias corrections).

Transient memory per parameter: the fp32 gradient (4 B/elem) and, for
low-precision weights, the fp32 work copy (4 B/elem). AdamW keeps 8 B/elem of
state, AdaLomo (rows + columns) about 4(m+n) B per m x n matrix.

Clipping settings live on the rule (torch's argument names) and are applied by
the runtime, because global-norm clipping needs every gradient of the step:
`clip_mode="exact"` runs two backward passes (norms first, as the LOMO paper
does), `"previous"` uses the previous step's global norm (one pass; the first
step runs exact), and `"unit"` clips each unit's gradients by their own norm
(holding one unit's gradients at a time).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import UserError

CLIP_MODES = ("exact", "previous", "unit")

StateSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class UpdateContext:
    """Per-step values a rule may use."""

    lr: float
    step: int  # 1-based: the number of updates this tensor has received, including this one
    decay: bool = True  # apply the rule's weight decay to this tensor (trainers exempt biases and norms)


class UpdateRule(Protocol):
    """What the runtime needs of an update rule."""

    lr: float
    weight_decay: float
    clip_grad_value: float | None
    clip_grad_norm: float | None
    clip_mode: str

    def state_spec(self, shape: tuple[int, ...]) -> StateSpec:
        """Per-tensor state this rule keeps (name -> (shape, dtype)); zeros at the start."""
        ...

    def apply(self, work: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], ctx: UpdateContext) -> None:
        """Update the fp32 tensor `work` in place from the fp32 `grad`."""
        ...


@dataclass
class SGD:
    """Plain SGD fused into backward, as in LOMO (arXiv 2306.09782). No state.

    Weight decay is `p *= 1 - lr * weight_decay` before the step, which equals
    torch.optim.SGD's `g + wd * p` form: p - lr*(g + wd*p) = p*(1 - lr*wd) - lr*g.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_grad_value: float | None = None
    clip_grad_norm: float | None = None
    clip_mode: str = "exact"

    def __post_init__(self) -> None:
        _check_common(self)

    def state_spec(self, shape: tuple[int, ...]) -> StateSpec:
        return {}

    def apply(self, work: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], ctx: UpdateContext) -> None:
        if self.weight_decay and ctx.decay:
            work.mul_(1.0 - ctx.lr * self.weight_decay)
        work.add_(grad, alpha=-ctx.lr)


@dataclass
class AdamW:
    """AdamW (Loshchilov & Hutter) with fp32 moments streamed beside each unit.

    The arithmetic follows torch.optim.AdamW's single-tensor path operation for
    operation, so results match it to the last bit on the same inputs.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_grad_value: float | None = None
    clip_grad_norm: float | None = None
    clip_mode: str = "exact"
    fused: bool = True  # use the native kernel (native/lomo_kernels.cpp) when it builds; same math in one pass

    def __post_init__(self) -> None:
        _check_common(self)
        if not (0.0 <= self.betas[0] < 1.0 and 0.0 <= self.betas[1] < 1.0):
            raise UserError(f"update rule: betas must be in [0, 1), got {self.betas!r}")
        _check_number("eps", self.eps, allow_zero=False)

    def state_spec(self, shape: tuple[int, ...]) -> StateSpec:
        return {"exp_avg": (shape, torch.float32), "exp_avg_sq": (shape, torch.float32)}

    def apply(self, work: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], ctx: UpdateContext) -> None:
        beta1, beta2 = self.betas
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        weight_decay = self.weight_decay if ctx.decay else 0.0
        if self.fused:
            from .native import adamw_native

            if adamw_native(work, grad, exp_avg, exp_avg_sq, ctx.lr, self.betas, self.eps, weight_decay, ctx.step):
                return
        work.mul_(1 - ctx.lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** ctx.step
        bias_correction2 = 1 - beta2 ** ctx.step
        step_size = ctx.lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(self.eps)
        work.addcdiv_(exp_avg, denom, value=-step_size)


@dataclass
class AdaLomo:
    """AdaLomo (arXiv 2310.10195): factored second moment, grouped update
    normalisation and a relative step size, with no first moment.

    For a matrix, row and column means of grad^2 + eps1 are tracked (Adafactor's
    factorisation); for a vector the full mean square. beta2 at update t is
    1 - t^decay_rate. The update is normalised so its RMS is at most
    `clip_threshold`, and scaled by lr * max(eps2, RMS(param)).
    """

    lr: float = 1e-3
    eps: tuple[float, float] = (1e-30, 1e-3)
    clip_threshold: float = 1.0
    decay_rate: float = -0.8
    weight_decay: float = 0.0
    clip_grad_value: float | None = None
    clip_grad_norm: float | None = None
    clip_mode: str = "exact"

    def __post_init__(self) -> None:
        _check_common(self)
        _check_number("clip_threshold", self.clip_threshold, allow_zero=False)

    def state_spec(self, shape: tuple[int, ...]) -> StateSpec:
        if len(shape) >= 2:
            return {"exp_avg_sq_row": (shape[:-1], torch.float32), "exp_avg_sq_col": (shape[:-2] + shape[-1:], torch.float32)}
        return {"exp_avg_sq": (shape, torch.float32)}

    def apply(self, work: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], ctx: UpdateContext) -> None:
        beta2t = 1.0 - math.pow(ctx.step, self.decay_rate)
        update = grad.square() + self.eps[0]
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(grad)
        else:
            sq = state["exp_avg_sq"]
            sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = sq.rsqrt().mul_(grad)
        update.div_((_rms(update) / self.clip_threshold).clamp_(min=1.0))
        lr = ctx.lr * max(self.eps[1], float(_rms(work)))
        if self.weight_decay and ctx.decay:
            work.mul_(1.0 - lr * self.weight_decay)
        work.add_(update, alpha=-lr)


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def row_updates_exact(rule: str, weight_decay: float, clip_grad_value: float | None, dtype: str, tied: bool,
                      grad_accumulation: bool) -> bool:
    """Is updating only the embedding rows a batch used exactly what the dense update does?

    Yes for SGD without weight decay (a row with no gradient stays as it is; clipping by norm only
    scales the gradient), with fp32 weights, an untied input embedding and no gradient accumulation
    or per-value clipping. Not for AdamW (its moments decay every row every step), AdaLomo (its
    second moment is factored over the whole matrix) or any weight decay; a tied embedding gets
    the lm_head's dense gradient anyway, so it gains nothing. The runtime and the planner both ask."""
    return (rule == "sgd" and not weight_decay and clip_grad_value is None and dtype == "fp32" and not tied
            and not grad_accumulation)


def rule_by_name(name: str, **kwargs: object) -> UpdateRule:
    """Build a rule from its CLI name (sgd, adamw, adalomo)."""
    rules = {"sgd": SGD, "adamw": AdamW, "adalomo": AdaLomo}
    if name not in rules:
        raise UserError(f"--rule must be one of {', '.join(rules)}, got {name!r}")
    return rules[name](**kwargs)  # type: ignore[arg-type]


def _check_common(rule: UpdateRule) -> None:
    _check_number("lr", rule.lr, allow_zero=True)
    _check_number("weight_decay", rule.weight_decay, allow_zero=True)
    if rule.clip_grad_value is not None:
        _check_number("clip_grad_value", rule.clip_grad_value, allow_zero=False)
    if rule.clip_grad_norm is not None:
        _check_number("clip_grad_norm", rule.clip_grad_norm, allow_zero=False)
    if rule.clip_mode not in CLIP_MODES:
        raise UserError(f"update rule: clip_mode must be one of {', '.join(CLIP_MODES)}, got {rule.clip_mode!r}")


def _check_number(name: str, value: float, allow_zero: bool) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"update rule: {name} must be a finite number {bound}, got {value!r}")

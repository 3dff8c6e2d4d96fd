"""LRSchedule against the transformers schedulers it claims to match (tolerance 1e-12)."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from lomo_runtime.errors import UserError
from lomo_runtime.schedule import LRSchedule

LR = 3e-4


def _reference_lrs(make_scheduler, total_steps: int) -> list[float]:
    """The lr each step 0..total_steps is run with under a real LambdaLR."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(total_steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (10, 10), (7, 100), (1, 1)])
def test_linear_matches_transformers(warmup: int, total: int) -> None:
    expected = _reference_lrs(lambda opt: get_linear_schedule_with_warmup(opt, warmup, total), total)
    schedule = LRSchedule("linear", LR, warmup, total)
    for step, want in enumerate(expected):
        assert schedule.lr_at(step) == pytest.approx(want, abs=1e-12, rel=0), step


@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (10, 10), (7, 100), (1, 1)])
def test_cosine_matches_transformers(warmup: int, total: int) -> None:
    expected = _reference_lrs(lambda opt: get_cosine_schedule_with_warmup(opt, warmup, total), total)
    schedule = LRSchedule("cosine", LR, warmup, total)
    for step, want in enumerate(expected):
        assert schedule.lr_at(step) == pytest.approx(want, abs=1e-12, rel=0), step


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_cosine_min_lr_matches_transformers(ratio: float) -> None:
    expected = _reference_lrs(
        lambda opt: get_cosine_with_min_lr_schedule_with_warmup(opt, 5, 50, min_lr_rate=ratio), 50
    )
    schedule = LRSchedule("cosine", LR, 5, 50, min_lr_ratio=ratio)
    for step, want in enumerate(expected):
        assert schedule.lr_at(step) == pytest.approx(want, abs=1e-12, rel=0), step
    assert schedule.lr_at(50) == pytest.approx(LR * ratio, abs=1e-12)


@pytest.mark.parametrize("warmup", [0, 4])
def test_constant_matches_transformers(warmup: int) -> None:
    expected = _reference_lrs(lambda opt: get_constant_schedule_with_warmup(opt, warmup), 20)
    schedule = LRSchedule("constant", LR, warmup, 20)
    for step, want in enumerate(expected):
        assert schedule.lr_at(step) == pytest.approx(want, abs=1e-12, rel=0), step


def test_linear_decays_to_min_lr_ratio() -> None:
    schedule = LRSchedule("linear", 1.0, 2, 12, min_lr_ratio=0.1)
    assert schedule.lr_at(0) == 0.0
    assert schedule.lr_at(2) == pytest.approx(1.0)
    assert schedule.lr_at(7) == pytest.approx(0.55)
    assert schedule.lr_at(12) == pytest.approx(0.1)


def test_flat_after_total_steps() -> None:
    for kind in ("linear", "cosine"):
        schedule = LRSchedule(kind, 1.0, 0, 10, min_lr_ratio=0.2)
        assert schedule.lr_at(11) == schedule.lr_at(10) == pytest.approx(0.2)
        assert schedule.lr_at(1000) == pytest.approx(0.2)


def test_negative_step_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        LRSchedule("linear", 1.0, 0, 10).lr_at(-1)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(kind="step"), "schedule.kind"),
        (dict(lr=-1.0), "schedule.lr"),
        (dict(lr=float("nan")), "schedule.lr"),
        (dict(lr="0.1"), "schedule.lr"),
        (dict(total_steps=0), "schedule.total_steps"),
        (dict(total_steps=10.0), "schedule.total_steps"),
        (dict(warmup_steps=-1), "schedule.warmup_steps"),
        (dict(warmup_steps=11), "schedule.warmup_steps"),
        (dict(min_lr_ratio=1.5), "schedule.min_lr_ratio"),
        (dict(min_lr_ratio=-0.1), "schedule.min_lr_ratio"),
    ],
)
def test_validation_names_the_field(kwargs: dict, field: str) -> None:
    args = dict(kind="cosine", lr=1e-3, warmup_steps=1, total_steps=10) | kwargs
    with pytest.raises(UserError, match=field):
        LRSchedule(**args)

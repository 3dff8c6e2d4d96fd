"""Fused C++ kernels from `native/`, built on first use, with pure-PyTorch fallbacks.

`load()` compiles `native/lomo_kernels.cpp` with torch's extension loader
(about a minute on 2 cores the first time; cached under
TORCH_EXTENSIONS_DIR afterwards) and returns None, with the reason in
`load_error`, where no compiler is available: callers then use the PyTorch
versions, which are also the references the tests check the kernels against.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch

_SOURCE = Path(__file__).resolve().parents[1] / "native" / "lomo_kernels.cpp"
_lock = threading.Lock()
_module: Any = None
load_error: str | None = None


def load() -> Any | None:
    """The compiled kernels, or None (see `load_error`) when they cannot be built here."""
    global _module, load_error
    with _lock:
        if _module is not None or load_error is not None:
            return _module
        if os.environ.get("LOMO_RUN_NO_NATIVE"):
            load_error = "disabled by LOMO_RUN_NO_NATIVE"
            return None
        if not _SOURCE.exists():
            load_error = f"{_SOURCE} is missing (installed without the source tree)"
            return None
        try:
            from torch.utils.cpp_extension import load as build

            _module = build(name="lomo_kernels", sources=[str(_SOURCE)], extra_cflags=["-O3"], verbose=False)
        except Exception as err:  # no compiler, no headers: the fallback still works
            load_error = f"{type(err).__name__}: {err}"
        return _module


def stochastic_round_bf16_native(values: torch.Tensor, seed: int) -> torch.Tensor | None:
    """fp32 -> bf16 with seeded stochastic rounding in one pass; None if the kernels are unavailable."""
    module = load()
    if module is None:
        return None
    out = torch.empty(values.shape, dtype=torch.bfloat16)
    module.sr_bf16(out, values.contiguous(), seed & ((1 << 63) - 1))
    return out


def adamw_native(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 lr: float, betas: tuple[float, float], eps: float, weight_decay: float, step: int) -> bool:
    """Fused in-place AdamW on contiguous fp32 tensors; False if the kernels are unavailable."""
    module = load()
    if module is None or not all(t.is_contiguous() for t in (param, grad, exp_avg, exp_avg_sq)):
        return False
    module.adamw_(param, grad, exp_avg, exp_avg_sq, lr, betas[0], betas[1], eps, weight_decay, step)
    return True

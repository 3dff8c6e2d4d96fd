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


# ---- stochastic rounding to bf16 -----------------------------------------------------------------
# The definition is the kernel's (native/lomo_kernels.cpp, sr_bf16): element i of a tensor rounded
# with seed s gets the noise
#     noise(s, i) = splitmix64(s ^ (i * 0xD1B54A32D192ED03)) & 0xFFFF        (uint64 arithmetic)
# and its bf16 bits are
#     bits >> 16                       when the fp32 exponent is all ones (inf: exact; NaN: the
#                                      quiet bit 0x0040 is also set, so a NaN never truncates to inf)
#     (bits + noise) >> 16             otherwise (rounds the magnitude up with probability
#                                      (bits & 0xFFFF) / 2^16: unbiased).
# The pure-PyTorch version below draws exactly the same bits, so a run gives the same weights with
# or without the compiled kernels, on any thread count.

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_INDEX_MUL = 0xD1B54A32D192ED03
SR_CHUNK = 1 << 16  # elements per pass of the PyTorch version (int64 temporaries: 8 bytes each)
# On a device: a pass is a dozen kernel launches, so passes are larger (24 B/elem of temporaries:
# 96 MiB at most), and the inf/NaN fix-up runs unconditionally rather than after a host sync.
SR_CHUNK_DEVICE = 1 << 22


def _as_int64(value: int) -> int:
    """The int64 with the same two's-complement bits as `value` mod 2^64 (torch has no uint64 math)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def splitmix64(x: int) -> int:
    """SplitMix64's output function on Python ints (mod 2^64): the kernel's hash, as the reference."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def rounding_seed(run_seed: int, step: int, index: int) -> int:
    """The stochastic-rounding seed of parameter `index` at `step` of a run seeded `run_seed`.

    Chained SplitMix64 over the three (each taken mod 2^64) in plain Python integers, so it is the
    same in every process and Python version (unlike `hash`, which PYTHONHASHSEED salts for str and
    which is not a specified function). In [0, 2^63).
    """
    h = splitmix64(run_seed & _MASK64)
    h = splitmix64(h ^ (step & _MASK64))
    h = splitmix64(h ^ (index & _MASK64))
    return h >> 1


def _shr(x: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Logical right shift of int64 `x` by k into `out`: torch's >> is arithmetic, so mask the sign fill."""
    torch.bitwise_right_shift(x, k, out=out)
    return out.bitwise_and_((1 << (64 - k)) - 1)


def _sr_noise(seed64: int, start: int, count: int, device: torch.device,
              x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """noise(seed, i) for i in [start, start + count), as int32, computed in the int64 buffers x, tmp."""
    x, tmp = x[:count], tmp[:count]
    torch.arange(start, start + count, dtype=torch.int64, device=device, out=x)
    x.mul_(_as_int64(_INDEX_MUL)).bitwise_xor_(seed64)    # seed ^ (i * C), wrapping
    x.add_(_as_int64(_GOLDEN))
    x.bitwise_xor_(_shr(x, 30, tmp)).mul_(_as_int64(_MIX1))
    x.bitwise_xor_(_shr(x, 27, tmp)).mul_(_as_int64(_MIX2))
    # Only the low 16 bits of x ^ (x >> 31) are used: bits 31..46 of x, so the sign fill is harmless.
    x.bitwise_xor_(torch.bitwise_right_shift(x, 31, out=tmp))
    return x.bitwise_and_(0xFFFF).to(torch.int32)


def stochastic_round_bf16_torch(values: torch.Tensor, seed: int) -> torch.Tensor:
    """The kernel's stochastic rounding (same bits for the same seed and element index) in PyTorch.

    Works on any device; chunks of SR_CHUNK elements bound the temporaries (~24 bytes per element
    of a chunk, so the default keeps them in cache). `seed` is taken mod 2^64.
    """
    if values.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16: expected float32 values, got {values.dtype}")
    flat = values.contiguous().view(-1).view(torch.int32)
    out = torch.empty(flat.shape, dtype=torch.int16, device=flat.device)
    n = flat.numel()
    seed64 = _as_int64(seed)
    on_host = flat.device.type == "cpu"
    chunk = min(SR_CHUNK if on_host else SR_CHUNK_DEVICE, max(n, 1))
    x = torch.empty(chunk, dtype=torch.int64, device=flat.device)
    tmp = torch.empty(chunk, dtype=torch.int64, device=flat.device)
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        bits = flat[start:start + count]
        noise = _sr_noise(seed64, start, count, flat.device, x, tmp)
        special = bits.bitwise_and(0x7F800000) == 0x7F800000  # inf or NaN: no noise
        any_special = bool(special.any()) if on_host else True  # the same bits either way
        if any_special:
            noise.masked_fill_(special, 0)
        # Finite fp32 bits + 16-bit noise never overflow int32, so int32 addition is the kernel's uint32 one.
        high = noise.add_(bits).bitwise_right_shift_(16)
        if any_special:  # NaN: set the quiet bit so a NaN whose payload lies in the dropped bits stays NaN
            nan = special & (bits.bitwise_and(0x007FFFFF) != 0)
            high.bitwise_or_(nan.to(torch.int32).mul_(0x0040))
        out[start:start + count] = high  # already in int16 range (the shift sign-extends): the kernel's uint16 bits
    return out.view(torch.bfloat16).view(values.shape)


def stochastic_round_bf16_native(values: torch.Tensor, seed: int) -> torch.Tensor | None:
    """fp32 -> bf16 with seeded stochastic rounding in one pass; None if the kernels are unavailable.

    CPU tensors only (the kernel reads host memory); `seed` is taken mod 2^64.
    """
    if values.device.type != "cpu" or values.dtype != torch.float32:
        return None
    module = load()
    if module is None:
        return None
    out = torch.empty(values.shape, dtype=torch.bfloat16)
    module.sr_bf16(out, values.contiguous(), _as_int64(seed))
    return out


def stochastic_round_bf16(values: torch.Tensor, seed: int) -> torch.Tensor:
    """Round fp32 `values` to bf16 stochastically, seeded: the result depends only on (seed, element index).

    Uses the C++ kernel where it is built (CPU tensors) and otherwise `stochastic_round_bf16_torch`,
    which gives bit-identical results, so a run resumed without the kernels continues exactly.
    """
    rounded = stochastic_round_bf16_native(values, seed)
    return rounded if rounded is not None else stochastic_round_bf16_torch(values, seed)


def adamw_native(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 lr: float, betas: tuple[float, float], eps: float, weight_decay: float, step: int) -> bool:
    """Fused in-place AdamW on contiguous fp32 tensors; False if the kernels are unavailable."""
    if param.device.type != "cpu":
        return False  # the kernel reads host memory; on a device the rule's PyTorch ops run there
    module = load()
    if module is None or not all(t.is_contiguous() for t in (param, grad, exp_avg, exp_avg_sq)):
        return False
    module.adamw_(param, grad, exp_avg, exp_avg_sq, lr, betas[0], betas[1], eps, weight_decay, step)
    return True

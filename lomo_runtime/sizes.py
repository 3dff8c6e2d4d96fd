"""Human byte sizes: `512MiB`, `2GiB`, `1.5GB`, `160KB`, or plain bytes.

Decimal suffixes (KB, MB, GB, TB) are powers of 1000 and binary ones (KiB, MiB,
GiB, TiB) powers of 1024, as in the IEC convention; `K`, `M`, `G` alone are
binary, matching what most tools print.
"""
from __future__ import annotations

import math
import re

from .errors import UserError

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float, what: str = "size") -> int:
    """Parse a size into bytes; `what` names the flag or field in the error message."""
    if isinstance(value, bool):
        raise UserError(f"{what}: expected a size such as 2GiB, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise UserError(f"{what}: size must not be negative, got {value}")
        return int(value)
    match = _PATTERN.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise UserError(f"{what}: cannot read {value!r} as a size; use e.g. 512MiB, 2GiB, 1.5GB, 160KB or bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(nbytes: int | float, rounding: str = "nearest") -> str:
    """Format bytes with a binary suffix, three significant figures (four from 1000 up to 1024).

    `rounding="up"` for an amount something needs, `"down"` for one that is available, so that a
    message comparing them never prints "125 MiB is below the 125 MiB it needs".
    """
    value = float(nbytes)
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or suffix == "TiB":
            break
        value /= 1024
    if suffix == "B" or abs(value) >= 100:
        step = 1.0
    else:
        step = 10.0 ** (math.floor(math.log10(abs(value))) - 2) if value else 1.0
    if rounding == "up":
        value = math.ceil(round(value / step, 6)) * step
    elif rounding == "down":
        value = math.floor(round(value / step, 6)) * step
    elif rounding != "nearest":
        raise ValueError(f"rounding must be 'nearest', 'up' or 'down', got {rounding!r}")
    if suffix == "B" or abs(value) >= 100:
        return f"{value:.0f} {suffix}"
    return f"{value:.3g} {suffix}"

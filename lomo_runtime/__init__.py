"""lomo-run: full-parameter fine-tuning with fused LOMO updates and streamed weights.

The library face is `Runtime` with an update rule (`SGD`, `AdamW`, `AdaLomo`);
they are imported lazily so `lomo-run --help` and the checkpoint tools start without torch's
autograd machinery.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Runtime", "SGD", "AdamW", "AdaLomo", "StepResult", "LossScaler"]


def __getattr__(name: str) -> Any:
    if name in ("Runtime", "StepResult", "LossScaler"):
        from . import runtime

        return getattr(runtime, name)
    if name in ("SGD", "AdamW", "AdaLomo"):
        from . import rules

        return getattr(rules, name)
    raise AttributeError(f"module 'lomo_runtime' has no attribute {name!r}")

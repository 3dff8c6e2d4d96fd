"""The library face's contract: what `lomo_runtime` exports, the budget error's figures, and a
commit that refuses to leave an update unwritten."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_model
from lomo_runtime.errors import DoesNotFit
from lomo_runtime.sizes import format_size, parse_size


def test_the_design_contract_imports() -> None:
    from lomo_runtime import AdaLomo, AdamW, Runtime, SGD  # noqa: F401
    from lomo_runtime import rules

    assert AdamW is rules.AdamW and AdaLomo is rules.AdaLomo and SGD is rules.SGD


@pytest.mark.parametrize("nbytes,nearest,up,down", [
    (125 * 2**20, "125 MiB", "125 MiB", "125 MiB"),
    (125 * 2**20 + 300_000, "125 MiB", "126 MiB", "125 MiB"),
    (int(12.34 * 2**20), "12.3 MiB", "12.4 MiB", "12.3 MiB"),
    (1023 * 1024 + 900, "1024 KiB", "1024 KiB", "1023 KiB"),  # never "1.02e+03 KiB"
    (64 * 1024, "64 KiB", "64 KiB", "64 KiB"),
    (1000, "1000 B", "1000 B", "1000 B"),
])
def test_format_size_rounding(nbytes: int, nearest: str, up: str, down: str) -> None:
    assert (format_size(nbytes), format_size(nbytes, "up"), format_size(nbytes, "down")) == (nearest, up, down)


def test_budget_error_never_says_a_budget_is_below_itself(tmp_path: Path) -> None:
    """A budget a few KB below the minimum prints two different figures, the needed one rounded up."""
    from lomo_runtime import SGD, Runtime

    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    with Runtime(model_dir, SGD(lr=0.1), work_dir=tmp_path / "probe") as rt:
        need = rt.minimum_weights_budget()
    with pytest.raises(DoesNotFit) as caught:
        Runtime(model_dir, SGD(lr=0.1), work_dir=tmp_path / "w", weights_budget=need - 100)
    given, needed = re.search(r"weights budget (.+?) is below the (.+?) one step", str(caught.value)).groups()
    assert given != needed, caught.value
    assert parse_size(needed.replace(" ", "")) >= need, caught.value
    assert parse_size(given.replace(" ", "")) <= need - 100, caught.value


def test_a_commit_refuses_a_unit_holding_unapplied_gradients(tmp_path: Path) -> None:
    """The commit's own check: updates still in memory and not applied are an internal error,
    never a silently stale store."""
    from lomo_runtime import SGD, Runtime

    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with Runtime(model_dir, SGD(lr=0.1), work_dir=tmp_path / "w", commit_every=10) as rt:
        rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        rt.scheduler.units["block.0"].pending_grads = 1  # what a lost gradient hook would leave
        with pytest.raises(RuntimeError, match="internal error: unit block.0 holds gradients"):
            rt.commit()
        rt.scheduler.units["block.0"].pending_grads = 0
        assert rt.commit() == 1

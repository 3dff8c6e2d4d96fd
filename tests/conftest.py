"""Shared fixtures. Tiny-model builders live in `helpers.py` so tests can import them directly."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# helpers.py sits beside this file; make it importable however pytest was started.
sys.path.insert(0, str(Path(__file__).parent))

# The native kernels take about a minute to build; tests use the PyTorch reference math
# (and its RNG) unless a test asks for the kernels (tests/test_native.py). Subprocesses inherit this.
os.environ.setdefault("LOMO_RUN_NO_NATIVE", "1")

from helpers import make_tiny_model  # noqa: E402


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    """A SmolLM2-style Llama (tied embeddings, grouped-query attention), sharded safetensors."""
    return make_tiny_model(tmp_path, "llama", tied=True, sharded=True)


@pytest.fixture
def tiny_model_factory(tmp_path: Path):
    """`factory(arch="llama", tied=True, sharded=False, **config_overrides) -> Path` under this test's tmp_path."""
    def factory(arch: str = "llama", tied: bool = True, sharded: bool = False, **overrides) -> Path:
        return make_tiny_model(tmp_path, arch, tied=tied, sharded=sharded, **overrides)
    return factory

"""`lomo-run probe --device cuda` on a real GPU, and the planner reading what it cached. Skipped without CUDA."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lomo_runtime.cli import main

LLAMA_7B = Path(__file__).resolve().parent.parent / "configs" / "models" / "llama-7b"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMO_RUN_CACHE", str(tmp_path / "cache"))  # never read or write ~/.cache


def test_pinned_host_memory_is_registered_at_its_exact_size():
    from lomo_runtime.probe import pinned_host

    size = 64 * 2**20 + 4096  # not a power of two: the caching host allocator would round it up
    host, release, how = pinned_host(size)
    try:
        assert how == "cudaHostRegister" and host.numel() == size and host.is_pinned()
        assert host.data_ptr() % 4096 == 0
    finally:
        release()


def test_copy_and_matmul_figures_are_plausible():
    from lomo_runtime.probe import measure_copies, measure_cuda_flops

    h2d, d2h, how = measure_copies(64 * 2**20, repeat=3)
    assert how == "cudaHostRegister" and 1e9 < h2d < 2e11 and 1e9 < d2h < 2e11
    assert 1e12 < measure_cuda_flops("bf16", n=4096, calls=4, repeat=3) < 5e15


def test_probe_cuda_then_plan_uses_it(tmp_path, capsys):
    def cli(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        return exit_info.value.code, capsys.readouterr().out

    code, out = cli("probe", "--device", "cuda", "--offload-dir", str(tmp_path / "scratch"), "--json")
    probed = json.loads(out)
    assert code == 0 and probed["device_memory_bytes.cuda"] == torch.cuda.mem_get_info()[1]
    code, out = cli("plan", "--model", str(LLAMA_7B), "--device", "cuda", "--dtype", "bf16", "--json")
    p = json.loads(out)
    assert code == 0 and p["machine_source"].startswith("probe (")
    assert p["machine"]["flops_per_s"] == probed["flops_per_s.cuda.bf16"]
    assert p["budget_bytes"] == probed["device_memory_bytes.cuda"]

"""Measure what the planner needs to know about this machine, once, and cache it.

`lomo-run probe` measures disk read and write bandwidth (O_DIRECT where the
filesystem allows, through `lomo_runtime.io`, files of `size` bytes in the
NVMe directory), sustained matmul FLOP/s on the compute device, host-device
copy bandwidth on CUDA, and the framework overhead: the RSS of a fresh
process that imported torch + transformers and built an empty-parameter
Llama, and ran one tiny step (measured here: ~390 MiB on torch 2.13 /
transformers 5.24).

Results go to `$LOMO_RUN_CACHE/probe.json` (default `~/.cache/lomo-run/`);
`load_machine` reads them back and fills what was never measured with
defaults, recording each figure's source.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .planner.spec import Machine

DEFAULTS = {
    "disk_read_bps": 1.2e9,      # O_DIRECT reads measured here: 1.25-1.34 GB/s
    "disk_write_bps": 1.0e9,
    "flops_per_s": 5.0e10,       # fp32 matmul on 2 cores
    "h2d_bps": 1.2e10,           # PCIe 3 x16, pinned
    # gloo between two ranks on this 2-core machine: a 64 MiB fp32 all-reduce in 53 ms, 1.26 GB/s
    # (median of 5). NCCL on NVLink is two orders of magnitude faster: pass --allreduce-bw there.
    "allreduce_bps": 1.2e9,
    "framework_bytes": 390 * 2**20,  # measured here: torch 2.13 + transformers 5.24 + one tiny step
}


def cache_path() -> Path:
    root = os.environ.get("LOMO_RUN_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "lomo-run"
    return base / "probe.json"


def load_probe() -> dict[str, Any]:
    """The cached probe results ({} if never probed or unreadable)."""
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def host_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def load_machine(device: str = "cpu", dtype: str = "fp32", nvme_dir: str | None = None,
                 host_memory: int | None = None, device_memory: int | None = None) -> Machine:
    """A `Machine` from the probe cache, defaults where nothing was measured, and flags over both."""
    probed = load_probe()
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, default in DEFAULTS.items():
        probe_key = f"flops_per_s.{device}.{dtype}" if key == "flops_per_s" else key
        if probe_key in probed:
            values[key], source[key] = probed[probe_key], "probe"
        else:
            values[key], source[key] = default, "default"
    if host_memory is None:
        host_memory, source["host_memory_bytes"] = host_memory_bytes(), "machine"
    else:
        source["host_memory_bytes"] = "flag"
    nvme_free = None
    if nvme_dir is not None:
        path = Path(nvme_dir)
        while not path.exists() and path != path.parent:
            path = path.parent
        nvme_free, source["nvme_free_bytes"] = shutil.disk_usage(path).free, "statvfs"
    return Machine(host_memory_bytes=host_memory, device_memory_bytes=device_memory, nvme_free_bytes=nvme_free,
                   source=source, **{k: (int(v) if k == "framework_bytes" else float(v)) for k, v in values.items()})


# ---- measurements ----------------------------------------------------------------------------

def measure_disk(directory: str, size: int = 256 * 2**20) -> tuple[float, float]:
    """(read, write) bytes/s for one `size`-byte file written then read back with O_DIRECT."""
    from .io import aligned_empty, read_into, write_file

    buf = aligned_empty(size)
    buf.fill_(7)
    Path(directory).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = os.path.join(tmp, "probe.bin")
        start = time.perf_counter()
        write_file(path, buf, size)
        write_bps = size / (time.perf_counter() - start)
        start = time.perf_counter()
        read_into(path, 0, buf, size)
        read_bps = size / (time.perf_counter() - start)
    return read_bps, write_bps


def measure_flops(device: str = "cpu", dtype: str = "fp32", n: int = 2048, repeat: int = 5) -> float:
    """Sustained FLOP/s of an n x n x n matmul (2 n^3 FLOPs each), best of `repeat`."""
    import torch

    from .planner.spec import DTYPES

    a = torch.randn(n, n, dtype=DTYPES[dtype], device=device)
    b = torch.randn(n, n, dtype=DTYPES[dtype], device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def measure_h2d(size: int = 256 * 2**20) -> float:
    import torch

    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return size / (time.perf_counter() - start)


_FRAMEWORK_SNIPPET = """
import tempfile, torch
from transformers import AutoModelForCausalLM, LlamaConfig
from lomo_runtime.memory import current_rss_bytes
from lomo_runtime.rules import SGD
from lomo_runtime.runtime import Runtime
d = tempfile.mkdtemp()
config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     vocab_size=256, max_position_embeddings=64)
AutoModelForCausalLM.from_config(config).save_pretrained(d + "/m")
with Runtime(d + "/m", rule=SGD(lr=1e-4), work_dir=d + "/w") as rt:
    ids = torch.zeros(1, 16, dtype=torch.long)
    out = rt.model(input_ids=ids, labels=ids)
    rt.backward(out.loss)
    del out
    print(current_rss_bytes() - rt.pool.peak_bytes)
"""


def measure_framework_bytes() -> int:
    """RSS of a fresh process that imported torch + transformers, built a tiny `Runtime` and ran one
    step (kernels, thread pools and autograd warmed up: ~9 MiB more than the bare import), less its
    staging pool."""
    out = subprocess.run([sys.executable, "-c", _FRAMEWORK_SNIPPET], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def run_probe(nvme_dir: str, device: str = "cpu", dtypes: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, Any]:
    """Measure everything, merge into the cache file, return the new figures."""
    results: dict[str, Any] = dict(load_probe())
    results["disk_read_bps"], results["disk_write_bps"] = measure_disk(nvme_dir)
    for dtype in dtypes:
        results[f"flops_per_s.{device}.{dtype}"] = measure_flops(device, dtype)
    if device == "cuda":
        results["h2d_bps"] = measure_h2d()
    results["framework_bytes"] = measure_framework_bytes()
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)
    return results

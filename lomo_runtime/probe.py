"""Measure what the planner needs to know about this machine, once, and cache it.

`lomo-run probe` measures disk read and write bandwidth (O_DIRECT where the
filesystem allows, through `lomo_runtime.io`, files of `size` bytes in the
NVMe directory), sustained matmul FLOP/s on the compute device, and the
framework overhead: the RSS of a fresh process that imported torch +
transformers and built an empty-parameter Llama, and ran one tiny step
(measured here: ~390 MiB on torch 2.13 / transformers 5.24).

`lomo-run probe --device cuda` adds, timed with CUDA events (median of
repeats): H2D and D2H copy bandwidth from pinned host memory of exact size (an
anonymous mmap registered with `cudaHostRegister`, the way the staging pool
pins), bf16/fp16/fp32 FLOP/s of 8192^3 matmuls, and the device's memory
(`torch.cuda.mem_get_info`).

`io_engine` names the faster I/O engine for the store here, posix or DeepSpeed aio
(`aio.probe_engines`; aio is measured only where it is built).

Results go to `$LOMO_RUN_CACHE/probe.json` (default `~/.cache/lomo-run/`), one
flat object: the CUDA figures sit beside the CPU ones (`flops_per_s.cuda.bf16`
beside `flops_per_s.cpu.bf16`, `h2d_bps`, `d2h_bps`, `device_memory_bytes.cuda`).
`load_machine` reads them back, takes a named GPU's published figures
(`planner.gpus`) when asked, fills what was never measured with defaults, and
records each figure's source.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .planner.gpus import GPUS, gpu as gpu_named
from .planner.spec import Machine

DEFAULTS = {
    "disk_read_bps": 1.2e9,      # O_DIRECT reads measured here: 1.25-1.34 GB/s
    "disk_write_bps": 1.0e9,
    "flops_per_s": 5.0e10,       # fp32 matmul on 2 cores
    "h2d_bps": 1.2e10,           # PCIe 3 x16, pinned
    "d2h_bps": 1.2e10,
    # gloo between two ranks on this 2-core machine: a 64 MiB fp32 all-reduce in 53 ms, 1.26 GB/s
    # (median of 5). NCCL on NVLink is two orders of magnitude faster: pass --allreduce-bw there.
    "allreduce_bps": 1.2e9,
    # Measured here (torch 2.13, transformers 5.24): the RSS of training runs after a warm step, less
    # the staging pool, with the mmap threshold pinned and MKL's buffer cache off (what a memory
    # budget sets): 407 MiB for 4-layer 256-wide Llamas and for a 24-layer 1024-wide one alike.
    "framework_bytes": 407 * 2**20,
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


CUDA_FIGURES = ("flops_per_s", "h2d_bps", "d2h_bps")
"""The figures that describe a CUDA device; a probe, a `--gpu` or flags must give them."""
FLAG_NAMES = {"flops_per_s": "--flops", "h2d_bps": "--pcie-bandwidth", "d2h_bps": "--pcie-bandwidth",
              "disk_read_bps": "--disk-read-bw", "disk_write_bps": "--disk-write-bw",
              "allreduce_bps": "--allreduce-bw"}


def has_cuda_probe(probed: dict[str, Any]) -> bool:
    """Whether `probe --device cuda` ran on this machine (its FLOP/s are in the cache)."""
    return any(key.startswith("flops_per_s.cuda.") for key in probed)


def load_machine(device: str = "cpu", dtype: str = "fp32", nvme_dir: str | None = None,
                 host_memory: int | None = None, device_memory: int | None = None,
                 gpu: str | None = None) -> Machine:
    """A `Machine` from the probe cache, defaults where nothing was measured, and flags over both.

    On CUDA the device's figures (FLOP/s, H2D and D2H bytes/s, memory) come from `gpu`'s
    published figures when named, else from a CUDA probe in the cache, else they are defaults
    that describe no GPU (`origin` "defaults": `with_flags` refuses to plan with them).
    `device_memory` (the memory budget) wins over the probed or published memory.
    """
    probed = load_probe()
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, default in DEFAULTS.items():
        probe_key = f"flops_per_s.{device}.{dtype}" if key == "flops_per_s" else key
        if probe_key in probed:
            values[key], source[key] = probed[probe_key], "probe"
        else:
            values[key], source[key] = default, "default"
    origin = f"probe ({cache_path()})" if source["flops_per_s"] == "probe" else "defaults"
    memory = None
    if device == "cuda":
        if gpu is not None:
            named = gpu_named(gpu)
            values.update(flops_per_s=named.flops_per_s(dtype), h2d_bps=named.copy_bps, d2h_bps=named.copy_bps)
            source.update(dict.fromkeys(CUDA_FIGURES, f"gpu {named.name}"))
            memory, source["device_memory_bytes"] = named.memory_bytes, f"gpu {named.name}"
            origin = f"published figures for {named.name}"
        elif has_cuda_probe(probed):
            other = f"flops_per_s.cuda.{ {'bf16': 'fp16', 'fp16': 'bf16'}.get(dtype, dtype)}"
            if source["flops_per_s"] != "probe" and other in probed:  # tensor cores: bf16 and fp16 alike
                values["flops_per_s"], source["flops_per_s"] = probed[other], f"probe ({other})"
            if source["d2h_bps"] != "probe" and source["h2d_bps"] == "probe":
                values["d2h_bps"], source["d2h_bps"] = values["h2d_bps"], "probe (h2d_bps)"
            if "device_memory_bytes.cuda" in probed:
                memory, source["device_memory_bytes"] = int(probed["device_memory_bytes.cuda"]), "probe"
            # A probe without this dtype's FLOP/s describes the GPU no better than nothing does.
            origin = f"probe ({cache_path()})" if source["flops_per_s"] != "default" else "defaults"
        else:
            origin = "defaults"
    if device_memory is not None:
        memory, source["device_memory_bytes"] = device_memory, "flag"
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
    return Machine(host_memory_bytes=host_memory, device_memory_bytes=memory, nvme_free_bytes=nvme_free,
                   source=source, origin=origin,
                   **{k: (int(v) if k == "framework_bytes" else float(v)) for k, v in values.items()})


def with_flags(machine: Machine, device: str, figures: dict[str, float | None]) -> Machine:
    """Set the figures given as flags (`Machine` attribute -> value, None: not given) over `machine`.

    On CUDA, when neither a probe nor a named GPU gave the device's figures, both `--flops`
    and `--pcie-bandwidth` must: otherwise `UserError` (exit 2), saying how to get them.
    """
    given = {attr: value for attr, value in figures.items() if value is not None}
    for attr, value in given.items():
        setattr(machine, attr, float(value))
        machine.source[attr] = "flag"
    device_flags = sorted({FLAG_NAMES[a] for a in given if a in CUDA_FIGURES})
    if device == "cuda" and machine.origin == "defaults":
        missing = sorted({FLAG_NAMES[a] for a in CUDA_FIGURES} - set(device_flags))
        if missing:
            also = f"; {', '.join(device_flags)} alone is not enough" if device_flags else ""
            raise UserError(
                f"device cuda: no figures for the GPU (no CUDA probe in {cache_path()}{also}): "
                f"pass --gpu NAME ({', '.join(GPUS)}), or --flops and --pcie-bandwidth, "
                f"or run `lomo-run probe --device cuda` on the GPU machine")
        machine.origin = "flags"
    elif device_flags:
        machine.origin += f"; {', '.join(device_flags)} from flags"
    return machine


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
    """Sustained FLOP/s of an n x n x n matmul on the CPU (2 n^3 FLOPs each), best of `repeat`
    (CUDA: `measure_cuda_flops`)."""
    import torch

    from .planner.spec import DTYPES

    a = torch.randn(n, n, dtype=DTYPES[dtype], device=device)
    b = torch.randn(n, n, dtype=DTYPES[dtype], device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def require_cuda() -> None:
    """`UserError` (exit 2) in one line where torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserError(f"--device cuda: torch {torch.__version__} ({build}) sees no CUDA device here; "
                        f"run `lomo-run probe --device cuda` on the GPU machine")


def _time_cuda(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of `fn()` on the current stream, between two CUDA events."""
    import torch

    seconds = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)  # elapsed_time is in ms
    return statistics.median(seconds)


def pinned_host(size: int) -> tuple[Any, Callable[[], None], str]:
    """(`size` bytes of page-locked host memory as a uint8 tensor, its release, how it was pinned).

    Exact size: an anonymous mmap (page-aligned) registered with `cudaHostRegister`. Where that
    fails, torch's `pin_memory=True` (its caching host allocator rounds up to a power of two).
    The register call runs on a helper thread: a failed runtime call leaves CUDA's per-thread
    last error set, which torch's next kernel-launch check on this thread would report as its own.
    """
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    import torch

    region = mmap.mmap(-1, size)
    host = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
    cudart = torch.cuda.cudart()
    with ThreadPoolExecutor(1) as pool:
        err = int(pool.submit(cudart.cudaHostRegister, host.data_ptr(), size, 0).result())
    if err != 0:
        return torch.empty(size, dtype=torch.uint8, pin_memory=True), lambda: None, "pin_memory"

    def release() -> None:
        torch.cuda.synchronize()
        torch.cuda.check_error(cudart.cudaHostUnregister(host.data_ptr()))

    return host, release, "cudaHostRegister"


def measure_copies(size: int = 512 * 2**20, repeat: int = 7) -> tuple[float, float, str]:
    """(H2D, D2H) bytes/s of one `size`-byte copy between pinned host and device memory, median
    of `repeat`, and how the host memory was pinned."""
    import torch

    host, release, pinned = pinned_host(size)
    try:
        host.fill_(1)
        dev = torch.empty(size, dtype=torch.uint8, device="cuda")
        dev.copy_(host, non_blocking=True)  # warm up both directions
        host.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()
        h2d = size / _time_cuda(lambda: dev.copy_(host, non_blocking=True), repeat)
        d2h = size / _time_cuda(lambda: host.copy_(dev, non_blocking=True), repeat)
    finally:
        release()
    return h2d, d2h, pinned


def measure_cuda_flops(dtype: str = "bf16", n: int = 8192, calls: int = 10, repeat: int = 5) -> float:
    """Sustained FLOP/s of `calls` n x n x n matmuls back to back (2 n^3 FLOPs each), median of `repeat`."""
    import torch

    from .planner.spec import DTYPES

    a = torch.randn(n, n, dtype=DTYPES[dtype], device="cuda")
    b = torch.randn(n, n, dtype=DTYPES[dtype], device="cuda")
    out = torch.empty_like(a)
    torch.mm(a, b, out=out)  # cuBLAS handle and heuristics
    torch.cuda.synchronize()

    def matmuls() -> None:
        for _ in range(calls):
            torch.mm(a, b, out=out)

    return 2 * n**3 * calls / _time_cuda(matmuls, repeat)


def measure_cuda() -> dict[str, Any]:
    """The CUDA figures `load_machine` reads, under the cache's keys."""
    import torch

    h2d, d2h, pinned = measure_copies()
    results: dict[str, Any] = {"h2d_bps": h2d, "d2h_bps": d2h, "pinned_host.cuda": pinned}
    for dtype in ("bf16", "fp16", "fp32"):
        results[f"flops_per_s.cuda.{dtype}"] = measure_cuda_flops(dtype)
    free, total = torch.cuda.mem_get_info()
    results["device_memory_bytes.cuda"] = int(total)
    results["device_name.cuda"] = torch.cuda.get_device_name()
    results["torch.cuda"] = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    return results


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
    out = subprocess.run([sys.executable, "-c", _FRAMEWORK_SNIPPET], capture_output=True, text=True, check=True,
                         env={**os.environ, "MKL_DISABLE_FAST_MM": "1"})  # as a budgeted run has it
    return int(out.stdout.strip().splitlines()[-1])


def run_probe(nvme_dir: str, device: str = "cpu", dtypes: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, Any]:
    """Measure everything, merge into the cache file, return the new figures.

    `device="cuda"`: the CUDA figures (`measure_cuda`) instead of CPU FLOP/s; `UserError`
    before measuring anything where there is no CUDA device.
    """
    if device == "cuda":
        require_cuda()
    results: dict[str, Any] = dict(load_probe())
    results["disk_read_bps"], results["disk_write_bps"] = measure_disk(nvme_dir)
    from .aio import probe_engines  # the faster I/O engine here (io_engine), when aio is built

    results.update(probe_engines(nvme_dir, pin=device == "cuda"))
    if device == "cuda":
        results.update(measure_cuda())
    else:
        for dtype in dtypes:
            results[f"flops_per_s.{device}.{dtype}"] = measure_flops(device, dtype)
    results["framework_bytes"] = measure_framework_bytes()
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)
    return results

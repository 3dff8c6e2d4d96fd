"""The working store's I/O engines on one unit-sized file: posix (O_DIRECT) against DeepSpeed aio, and dd.

    python tools/bench_io.py [--size 256MiB] [--runs 3] [--queue-depths 4,32,128] [--threads 1,2]
                             [--dir .cache/bench_io] [--out benchmarks/bench_io.json]

Methods, each reading and writing the same `--size` file in `--dir`:

- posix: `lomo_runtime.io.read_into` / `write_file` (O_DIRECT `preadv`/`pwritev` into a
  page-aligned mmap buffer; the write fsyncs), the default engine;
- aio: `lomo_runtime.aio.AioIO` into the same kind of buffer, as the store uses it on CPU:
  through two 16 MiB locked bounce buffers, so at most 16 of the 1 MiB blocks are in flight
  whatever the queue depth;
- aio-locked: the same engine into a buffer DeepSpeed locked itself (`locked_empty`, like
  the CUDA staging pool's pinned buffers): one request per call, the full queue depth;
  both at every queue depth x intra-op thread count given;
- dd: `dd if=FILE of=/dev/null bs=8M iflag=direct`, and for writes `dd if=SRC of=FILE bs=8M
  oflag=direct conv=fsync` from a copy of the same bytes in /dev/shm (dd's own timing).

Every read is cold (the file's page cache dropped with posix_fadvise DONTNEED before it,
although O_DIRECT bypasses it) and its bytes are checked (CRC-32C against the file's).
Methods alternate within each run, in an order rotated each run; the figure is the median
of `--runs` runs (>= 3: this VM's disk varies several-fold from run to run). Prints a table
and writes JSON with every run's seconds. Needs the aio op built (it is built on first use,
~7.5 min on 2 cores; without libaio-dev only posix and dd are measured).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import crc32c
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lomo_runtime import aio  # noqa: E402
from lomo_runtime.io import aligned_empty, read_into, write_file  # noqa: E402
from lomo_runtime.sizes import format_size, parse_size  # noqa: E402

MiB = 2**20


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _dd_seconds(stderr: str) -> float:
    """dd's own figure: '268435456 bytes (268 MB, 256 MiB) copied, 0.21 s, 1.3 GB/s'."""
    match = re.search(r"copied, ([0-9.]+) s", stderr)
    if not match:
        raise RuntimeError(f"cannot read dd's timing from: {stderr!r}")
    return float(match.group(1))


class Method:
    """One way to read and write the file; `read()`/`write()` return seconds."""

    def __init__(self, name: str, queue_depth: int | None, threads: int | None,
                 read: Callable[[], float], write: Callable[[], float]) -> None:
        self.name, self.queue_depth, self.threads = name, queue_depth, threads
        self.read, self.write = read, write
        self.read_s: list[float] = []
        self.write_s: list[float] = []

    @property
    def label(self) -> str:
        return self.name if self.queue_depth is None else f"{self.name} qd={self.queue_depth} threads={self.threads}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256MiB", help="file size (a unit's size; default 256MiB)")
    parser.add_argument("--runs", type=int, default=3, help="runs per method (median; at least 3)")
    parser.add_argument("--queue-depths", default="4,32,128")
    parser.add_argument("--threads", default="1,2", help="aio intra_op_parallelism values")
    parser.add_argument("--block-size", default="1MiB", help="aio block size")
    parser.add_argument("--dir", default=str(REPO / ".cache" / "bench_io"), help="where the file lives (the store's disk)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "bench_io.json"))
    args = parser.parse_args()
    if args.runs < 3:
        parser.error("--runs must be at least 3")
    size = parse_size(args.size, "--size")
    block = parse_size(args.block_size, "--block-size")
    depths = [int(q) for q in args.queue_depths.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    if size % (4096 * max(threads)):
        parser.error(f"--size must be a multiple of {4096 * max(threads)} (aligned for every thread count)")

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    data_file, write_target = folder / "unit.bin", folder / "unit.write.bin"
    shm_src = Path("/dev/shm") / f"lomo-bench-io-{os.getpid()}.bin"

    src = aligned_empty(size)
    src[:size] = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = crc32c.crc32c(memoryview(src.numpy())[:size])
    write_file(data_file, src, size)
    shm_src.write_bytes(memoryview(src.numpy())[:size])
    dst = aligned_empty(size)

    def check(buf: torch.Tensor, what: str) -> None:
        got = crc32c.crc32c(memoryview(buf.numpy())[:size])
        if got != expected:
            raise SystemExit(f"{what}: the bytes read differ from the file's (crc32c {got:08x}, expected {expected:08x})")

    def timed_read(fn: Callable[[torch.Tensor], None], buf: torch.Tensor, what: str) -> Callable[[], float]:
        def run() -> float:
            buf.zero_()
            _drop_cache(data_file)
            start = time.perf_counter()
            fn(buf)
            seconds = time.perf_counter() - start
            check(buf, what)
            return seconds
        return run

    def timed_write(fn: Callable[[], None]) -> Callable[[], float]:
        def run() -> float:
            write_target.unlink(missing_ok=True)
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return run

    def dd_read() -> float:
        _drop_cache(data_file)
        proc = subprocess.run(["dd", f"if={data_file}", "of=/dev/null", "bs=8M", "iflag=direct"],
                              capture_output=True, text=True, check=True)
        return _dd_seconds(proc.stderr)

    def dd_write() -> float:
        write_target.unlink(missing_ok=True)
        proc = subprocess.run(["dd", f"if={shm_src}", f"of={write_target}", "bs=8M", "oflag=direct", "conv=fsync"],
                              capture_output=True, text=True, check=True)
        return _dd_seconds(proc.stderr)

    methods = [
        Method("posix", None, None, timed_read(lambda b: read_into(data_file, 0, b, size), dst, "posix"),
               timed_write(lambda: write_file(write_target, src, size))),
        Method("dd", None, None, dd_read, dd_write),
    ]
    reason = aio.unavailable_reason()
    locked = None
    if reason is None:
        op = aio.load_op(sys.stderr)
        for q in depths:
            for t in threads:
                engine = aio.AioIO(op, block_size=block, queue_depth=q, intra_op=t)
                if locked is None:
                    locked = engine.locked_empty(size)
                    locked_src = engine.locked_empty(size)
                    locked_src.copy_(src[:size])
                methods.append(Method(
                    "aio", q, t,
                    timed_read(lambda b, e=engine: e.read_into(data_file, 0, b, size), dst, f"aio qd={q} t={t}"),
                    timed_write(lambda e=engine: e.write_file(write_target, src, size))))
                methods.append(Method(
                    "aio-locked", q, t,
                    timed_read(lambda b, e=engine: e.read_into(data_file, 0, b, size), locked, f"aio-locked qd={q} t={t}"),
                    timed_write(lambda e=engine, s=locked_src: e.write_file(write_target, s, size))))
    else:
        print(f"aio not measured: {reason}", file=sys.stderr)

    for method in methods:  # warm-up: first-touch page faults, aio handles and bounce buffers
        method.read()
        method.write()
    for run in range(args.runs):
        shift = run % len(methods)
        for method in methods[shift:] + methods[:shift]:
            method.read_s.append(method.read())
            method.write_s.append(method.write())
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)

    for path in (write_target, shm_src):
        path.unlink(missing_ok=True)

    def rate(seconds: list[float]) -> float:
        return size / statistics.median(seconds) / MiB

    posix_read, posix_write = rate(methods[0].read_s), rate(methods[0].write_s)
    print(f"\n{format_size(size)} file in {folder} ({args.runs} runs, median; MiB/s, cold reads, fsynced writes)")
    print(f"{'method':<32} {'read MiB/s':>11} {'(min-max)':>13} {'vs posix':>8} {'write MiB/s':>12} {'(min-max)':>13} {'vs posix':>8}")
    rows = []
    for m in methods:
        read, write = rate(m.read_s), rate(m.write_s)
        lo_r, hi_r = size / max(m.read_s) / MiB, size / min(m.read_s) / MiB
        lo_w, hi_w = size / max(m.write_s) / MiB, size / min(m.write_s) / MiB
        print(f"{m.label:<32} {read:>11.0f} {f'({lo_r:.0f}-{hi_r:.0f})':>13} {read / posix_read:>7.2f}x "
              f"{write:>12.0f} {f'({lo_w:.0f}-{hi_w:.0f})':>13} {write / posix_write:>7.2f}x")
        rows.append({"method": m.name, "queue_depth": m.queue_depth, "intra_op_threads": m.threads,
                     "read_mib_s": round(read, 1), "write_mib_s": round(write, 1),
                     "read_s": m.read_s, "write_s": m.write_s})
    best_read = max(rows, key=lambda r: r["read_mib_s"])
    print(f"\nfastest read: {best_read['method']}"
          + (f" qd={best_read['queue_depth']} threads={best_read['intra_op_threads']}" if best_read["queue_depth"] else ""))

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "dir": str(folder.resolve()),
                    "filesystem_free_bytes": shutil.disk_usage(folder).free},
        "size_bytes": size, "runs": args.runs, "block_size": block,
        "aio": "measured" if reason is None else f"not measured: {reason}",
        "notes": "aio: the store's case on CPU (mmap buffer, 2 x 16 MiB locked bounce buffers, so at most 16 "
                 "blocks in flight); aio-locked: a buffer DeepSpeed locked (in place, the full queue depth); "
                 "dd: its own timing, writes from /dev/shm with conv=fsync",
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

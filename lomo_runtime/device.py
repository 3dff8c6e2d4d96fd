"""The compute device below the host tier: buffers, copy streams and events.

The three-tier scheduler (`tiers.DeviceTier`) talks to a device only through
this small interface, so the same scheduler runs on a GPU and, in the test
suite, on a simulated device on CPU:

* `empty(nbytes)`: a uint8 buffer in device memory (the tier's own pool keeps
  it; the framework's allocator never sees it freed while a copy uses it);
* `copy_in(dst, src, after)`: host -> device on the copy-in stream, once every
  event in `after` has completed (the buffer's previous uses); returns the
  copy's event;
* `copy_out(dst, src, after)`: device -> host on the copy-out stream, likewise;
* `record()`: an event after the compute queued so far (a buffer's last use);
* `compute_wait(event)`: later compute runs after `event` (on CUDA a stream
  wait, no host synchronisation);
* events have `query()` (done?) and `synchronize()` (the host waits).

Invariant the tier keeps and the simulated device checks: a buffer is reused
(copied into, released to a pool, freed) only after the event of its last use
has completed, and compute reads a buffer only after its copy's event.
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Protocol

import torch

from .errors import UserError


class Event(Protocol):
    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class Device(Protocol):
    """What the three-tier scheduler needs of a device (module docstring)."""

    name: str
    torch_device: torch.device
    pin_host: bool  # host staging buffers must be page-locked for asynchronous copies

    def empty(self, nbytes: int) -> torch.Tensor: ...

    def copy_in(self, dst: torch.Tensor, src: torch.Tensor, after: Iterable[Event] = ()) -> Event: ...

    def copy_out(self, dst: torch.Tensor, src: torch.Tensor, after: Iterable[Event] = ()) -> Event: ...

    def record(self) -> Event: ...

    def compute_wait(self, event: Event) -> None: ...

    def check_idle(self, buf: torch.Tensor, what: str) -> None:
        """Called before `buf` is reused or bound for compute (the simulated device checks it)."""

    def peak_allocated_bytes(self) -> int: ...

    def reset_peak(self) -> None: ...


class _Done:
    """An event that has completed already (compute on a synchronous device)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


DONE = _Done()


class CudaDevice:
    """One CUDA device: H2D copies on one stream, D2H on another, compute on the current stream."""

    pin_host = True

    def __init__(self, index: int | None = None, timing: bool = False) -> None:
        """`timing`: time every copy with CUDA events (`copy_rates`), for benchmarks."""
        if not torch.cuda.is_available():
            raise UserError("device 'cuda': this machine has no CUDA device (torch.cuda.is_available() is False)")
        self.torch_device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        self.name = str(self.torch_device)
        with torch.cuda.device(self.torch_device):
            self.h2d = torch.cuda.Stream()
            self.d2h = torch.cuda.Stream()
        self.timing = timing
        self._timed: list[tuple[str, torch.cuda.Event, torch.cuda.Event, int]] = []

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)

    def _copy(self, stream, dst: torch.Tensor, src: torch.Tensor, after: Iterable[Event]) -> Event:
        for event in after:
            if isinstance(event, torch.cuda.Event):
                stream.wait_event(event)
        with torch.cuda.stream(stream):
            start = None
            if self.timing:
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event(enable_timing=self.timing)
            event.record(stream)
        if start is not None:
            self._timed.append(("h2d" if stream is self.h2d else "d2h", start, event, dst.numel() * dst.element_size()))
        return event

    def copy_rates(self, reset: bool = True) -> dict[str, float]:
        """Bytes/s of the timed copies per direction (bytes over the copies' own durations)."""
        totals: dict[str, list[float]] = {}
        for direction, start, end, nbytes in self._timed:
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
            entry = totals.setdefault(direction, [0.0, 0.0])
            entry[0] += nbytes
            entry[1] += seconds
        if reset:
            self._timed = []
        return {d: (b / s if s > 0 else 0.0) for d, (b, s) in totals.items()}

    def copy_in(self, dst, src, after=()) -> Event:
        return self._copy(self.h2d, dst, src, after)

    def copy_out(self, dst, src, after=()) -> Event:
        return self._copy(self.d2h, dst, src, after)

    def record(self) -> Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.torch_device))
        return event

    def compute_wait(self, event: Event) -> None:
        if isinstance(event, torch.cuda.Event):
            torch.cuda.current_stream(self.torch_device).wait_event(event)

    def check_idle(self, buf: torch.Tensor, what: str) -> None:
        return None  # stream order and the tier's events guarantee it; nothing to check cheaply

    def peak_allocated_bytes(self) -> int:
        return torch.cuda.max_memory_allocated(self.torch_device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.torch_device)


class _SimEvent:
    def __init__(self, future: Future) -> None:
        self.future = future

    def query(self) -> bool:
        return self.future.done()

    def synchronize(self) -> None:
        self.future.result()


class SimulatedDevice:
    """A stand-in device on CPU, for tests: separate buffers, a copy thread per stream, random delays.

    Compute is synchronous (it runs on the calling thread), so `compute_wait` makes the host wait for
    the copy. Every buffer a copy has been submitted for is busy until the copy completes; reusing,
    releasing or computing on a busy buffer is recorded in `violations` (and raised by
    `assert_clean`), and two copies touching one buffer at once are too. `max_delay_s` injects a
    random delay before each copy, so a missing wait shows as a violation or wrong numbers."""

    name = "sim"
    pin_host = False

    def __init__(self, max_delay_s: float = 0.0, seed: int = 0, min_delay_s: float = 0.0) -> None:
        self.torch_device = torch.device("cpu")
        self.max_delay_s = max_delay_s
        self.min_delay_s = min_delay_s
        self._rng = random.Random(seed)
        self._streams = {"h2d": ThreadPoolExecutor(1, thread_name_prefix="sim-h2d"),
                         "d2h": ThreadPoolExecutor(1, thread_name_prefix="sim-d2h")}
        self._lock = threading.Lock()
        self._pending: dict[int, int] = {}   # data_ptr -> copies submitted and not completed
        self._running: set[int] = set()      # data_ptrs a copy is moving bytes of right now
        self.violations: list[str] = []
        self.copies = 0
        self._allocated = 0
        self._peak = 0

    def empty(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            self._allocated += nbytes
            self._peak = max(self._peak, self._allocated)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        # Poison fresh memory, so a copy that was not waited for is seen in the numbers.
        buf.fill_(0xFF)
        return buf

    def freed(self, nbytes: int) -> None:
        with self._lock:
            self._allocated -= nbytes

    def _copy(self, stream: str, dst: torch.Tensor, src: torch.Tensor, after: Iterable[Event]) -> Event:
        after = list(after)
        delay = self._rng.uniform(self.min_delay_s, max(self.min_delay_s, self.max_delay_s))
        ptrs = (dst.data_ptr(), src.data_ptr())
        with self._lock:
            for p in ptrs:
                self._pending[p] = self._pending.get(p, 0) + 1
            self.copies += 1

        def run() -> None:
            for event in after:  # a stream waiting on events of the other stream or of compute
                event.synchronize()
            if delay:
                time.sleep(delay)
            with self._lock:
                for p in ptrs:
                    if p in self._running:
                        self.violations.append(f"two copies touch buffer {p:#x} at once ({stream})")
                self._running.update(ptrs)
            try:
                dst.copy_(src)
            finally:
                with self._lock:
                    self._running.difference_update(ptrs)
                    for p in ptrs:
                        self._pending[p] -= 1
                        if not self._pending[p]:
                            del self._pending[p]

        return _SimEvent(self._streams[stream].submit(run))

    def copy_in(self, dst, src, after=()) -> Event:
        return self._copy("h2d", dst, src, after)

    def copy_out(self, dst, src, after=()) -> Event:
        return self._copy("d2h", dst, src, after)

    def record(self) -> Event:
        return DONE

    def compute_wait(self, event: Event) -> None:
        event.synchronize()

    def check_idle(self, buf: torch.Tensor, what: str) -> None:
        with self._lock:
            if buf.numel() and self._pending.get(buf.data_ptr()):
                self.violations.append(f"{what} while a copy of it is in flight")

    def assert_clean(self) -> None:
        if self.violations:
            raise AssertionError("; ".join(self.violations[:5]))

    def peak_allocated_bytes(self) -> int:
        with self._lock:
            return self._peak

    def reset_peak(self) -> None:
        with self._lock:
            self._peak = self._allocated

    def close(self) -> None:
        for pool in self._streams.values():
            pool.shutdown(wait=True)


def open_device(device: "str | Device") -> "Device | None":
    """None for "cpu" (the host is the device: the two-tier scheduler), a `Device` otherwise."""
    if not isinstance(device, str):
        return device
    if device == "cpu":
        return None
    if device == "cuda" or device.startswith("cuda:"):
        index = int(device.split(":", 1)[1]) if ":" in device else None
        return CudaDevice(index)
    raise UserError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")

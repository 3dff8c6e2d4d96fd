"""A pool of aligned host staging buffers with exact byte accounting.

Invariants (all under one lock, so a prefetch thread and the main thread may
acquire and release concurrently):

- Every buffer is a 1-D uint8 tensor from ``io.aligned_empty``: 4 KiB-aligned,
  its size rounded up to a multiple of 4096 bytes. A request for n bytes is
  charged ``align_up(n)`` bytes; that is exactly the memory the buffer holds
  (unpinned buffers are anonymous mmaps with no over-allocation).
- ``bytes_allocated == bytes_in_use + bytes cached in the free lists`` and
  never exceeds ``capacity_bytes``; ``peak_bytes`` is the maximum
  ``bytes_allocated`` ever reached (the memory the pool really held).
- Released buffers are kept in a free list keyed by size and handed out again
  for the same rounded size, so a steady-state step allocates nothing. When a
  new size would exceed capacity, cached buffers of other sizes are freed first;
  only if that is not enough does ``acquire`` raise ``DoesNotFit``.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from .errors import DoesNotFit, UserError
from .io import aligned_empty, align_up, unpin
from .sizes import format_size


class StagingPool:
    """Aligned (on CUDA: optionally pinned) staging buffers for unit reads and write-backs."""

    def __init__(self, capacity_bytes: int | None, pin: bool = False) -> None:
        """``capacity_bytes``: most bytes the pool may hold (None: unbounded).
        ``pin``: page-locked buffers for CUDA copies; ``UserError`` here when there is no
        CUDA (``torch.empty(..., pin_memory=True)`` raises on CPU-only torch)."""
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0 or None, got {capacity_bytes}")
        if pin and not torch.cuda.is_available():
            raise UserError("pinned staging buffers need CUDA; this machine has none (use pin=False)")
        self.capacity_bytes = capacity_bytes
        self.pin = pin
        self._lock = threading.Lock()
        self._free: dict[int, list[torch.Tensor]] = {}
        # data_ptr -> rounded size of every buffer handed out and not yet released.
        self._in_use: dict[int, int] = {}
        self._bytes_in_use = 0
        self._bytes_cached = 0
        self._peak = 0
        # Called with a buffer being released (a simulated device checks that no copy still uses it).
        self.on_release: Callable[[torch.Tensor], None] | None = None
        self.allocations = 0
        """How many buffers were actually allocated (not reused); tests check steady state."""

    # -- accounting ----------------------------------------------------------

    @property
    def bytes_in_use(self) -> int:
        """Bytes of buffers acquired and not yet released (rounded sizes)."""
        with self._lock:
            return self._bytes_in_use

    @property
    def bytes_allocated(self) -> int:
        """Bytes the pool holds: in use plus cached in free lists."""
        with self._lock:
            return self._bytes_in_use + self._bytes_cached

    @property
    def peak_bytes(self) -> int:
        """The largest ``bytes_allocated`` seen since creation (or ``reset_peak``)."""
        with self._lock:
            return self._peak

    def reset_peak(self) -> None:
        """Restart peak tracking from the current ``bytes_allocated`` (e.g. per step)."""
        with self._lock:
            self._peak = self._bytes_in_use + self._bytes_cached

    # -- buffers -------------------------------------------------------------

    def acquire(self, nbytes: int) -> torch.Tensor:
        """An aligned uint8 buffer of ``align_up(nbytes)`` bytes (at least ``nbytes``).

        Reuses a cached buffer of the same rounded size when there is one. Raises
        ``DoesNotFit`` when the buffer cannot be held within ``capacity_bytes`` even
        after dropping every cached buffer.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        size = align_up(nbytes)
        if size == 0:
            return torch.empty(0, dtype=torch.uint8)  # holds no memory; not tracked
        with self._lock:
            cached = self._free.get(size)
            if cached:
                buf = cached.pop()
                self._bytes_cached -= size
            else:
                self._make_room(size)
                buf = aligned_empty(size, pin=self.pin)
                self.allocations += 1
            self._in_use[buf.data_ptr()] = size
            self._bytes_in_use += size
            self._peak = max(self._peak, self._bytes_in_use + self._bytes_cached)
            return buf

    def release(self, buf: torch.Tensor) -> None:
        """Return ``buf`` (exactly as ``acquire`` gave it) to the pool's free list."""
        if buf.numel() == 0:
            return
        if self.on_release is not None:
            self.on_release(buf)
        with self._lock:
            size = self._in_use.pop(buf.data_ptr(), None)
            if size is None or buf.numel() != size:
                if size is not None:
                    self._in_use[buf.data_ptr()] = size
                raise ValueError("release() of a buffer this pool did not hand out (or already released)")
            self._bytes_in_use -= size
            self._free.setdefault(size, []).append(buf)
            self._bytes_cached += size

    def trim(self) -> int:
        """Free every cached buffer; return the bytes freed."""
        with self._lock:
            freed = self._bytes_cached
            for bufs in self._free.values():
                self._drop(bufs)
            self._free.clear()
            self._bytes_cached = 0
            return freed

    def _make_room(self, size: int) -> None:
        """Drop cached buffers (largest first) until ``size`` more bytes fit; lock held."""
        if self.capacity_bytes is None:
            return
        if self._bytes_in_use + size > self.capacity_bytes:
            raise DoesNotFit(
                f"staging pool: a {format_size(size)} buffer does not fit: {format_size(self._bytes_in_use)} "
                f"in use of a {format_size(self.capacity_bytes)} capacity"
            )
        for cached_size in sorted(self._free, reverse=True):
            if self._bytes_in_use + self._bytes_cached + size <= self.capacity_bytes:
                break
            bufs = self._free.pop(cached_size)
            self._bytes_cached -= cached_size * len(bufs)
            self._drop(bufs)

    def _drop(self, bufs: list[torch.Tensor]) -> None:
        """Cached buffers leave the pool (a pinned one is unregistered first; the memory goes with the
        last reference)."""
        if self.pin:
            for buf in bufs:
                unpin(buf)

    def __repr__(self) -> str:
        cap = "unbounded" if self.capacity_bytes is None else format_size(self.capacity_bytes)
        return (
            f"StagingPool(capacity={cap}, in_use={format_size(self.bytes_in_use)}, "
            f"allocated={format_size(self.bytes_allocated)}, peak={format_size(self.peak_bytes)})"
        )

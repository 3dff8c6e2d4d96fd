"""Three tiers: device memory above the host tier (`Scheduler`) above the working store.

`DeviceTier` is what the runtime schedules through when there is a compute
device (CUDA, or the tests' simulated device). It keeps each unit's bytes in
the fastest tier that holds them:

* device: a buffer from the device pool (budget: the device weights budget);
  parameters and rule state are bound to views of it while it is there;
* host: the unit's staging buffer, pinned on CUDA, managed by the ordinary
  `Scheduler` under the host budget (`host_budget`), which reads from and
  writes to the working store exactly as on CPU;
* the store: committed and uncommitted generations (store.py).

Both tiers run Belady over the same access sequence: the device tier moves the
host scheduler's cursor in step with its own acquires, so "next use" is one
number for both. The host tier skips prefetching units the device holds, and
evicts their host copies first (`Scheduler.covered`).

Copies and their guards (device.py): a unit comes in by an H2D copy from its
host buffer, which the host tier keeps pinned (`Scheduler.hold`) until the
copy's event has completed; compute waits for that event before it uses the
unit. An updated unit goes out by a D2H copy into its host buffer (held, and
not read for it: `blank`), recorded after the compute that updated it; when
that event completes the host copy is dirty and the host tier writes it as it
writes any updated unit (now, if this step commits or it will be evicted from
host memory before its next use). A device buffer goes back to the pool with
the events of its last uses (compute, D2H) and is copied into again only after
them (the copy stream waits on them). An update of a unit whose D2H is in
flight waits for it (`ensure_writable`).

State per unit, beside the host's `UnitState`: ABSENT (no device buffer),
LOADING (H2D in flight), ON_DEVICE. `dirty`: the device bytes are newer than
the host's. Budget invariant: device bytes of LOADING and ON_DEVICE units never
exceed the device weights budget; the pool's cached buffers count too (it
drops them before the budget would be passed).

No host synchronisation per parameter: the runtime keeps the non-finite check
and norms on the device; this tier waits on the host only to land a copy the
host tier needs now (a host buffer under pressure, a commit).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .device import Device, Event
from .errors import DoesNotFit
from .io import align_up
from .scheduler import Scheduler, Unit, UnitState, bind_views, unbind_views
from .sizes import format_size


class DevState(enum.Enum):
    ABSENT = "absent"
    LOADING = "loading"      # an H2D copy into its device buffer is in flight
    ON_DEVICE = "on_device"


@dataclass
class Slot:
    """A unit's device-tier record."""

    state: DevState = DevState.ABSENT
    buffer: torch.Tensor | None = None
    event: Event | None = None               # the H2D copy (LOADING)
    uses: list[Event] = field(default_factory=list)  # must complete before the buffer is reused
    out: Event | None = None                 # the D2H copy into the host buffer, in flight
    pins: int = 0
    bound: bool = False
    dirty: bool = False                      # newer than the host copy (and the store)
    settled: bool = True                     # every update of this step is applied


@dataclass
class DeviceStats:
    h2d_copies: int = 0
    h2d_bytes: int = 0
    d2h_copies: int = 0
    d2h_bytes: int = 0
    host_waits_s: float = 0.0                # host waits on copies (landing them under pressure, commits)
    peak_device_weights_bytes: int = 0


class DevicePool:
    """Device buffers of unit sizes, kept for reuse with the events that guard them.

    Capacity-bounded like the staging pool: in use plus cached never exceeds it; cached buffers
    of other sizes are dropped (after their events) before a new size would pass it."""

    def __init__(self, device: Device, capacity: int | None) -> None:
        self.device = device
        self.capacity = capacity
        self._free: dict[int, list[tuple[torch.Tensor, list[Event]]]] = {}
        self.in_use = 0
        self.cached = 0
        self.peak = 0

    def acquire(self, nbytes: int) -> tuple[torch.Tensor, list[Event]]:
        size = align_up(nbytes)
        cached = self._free.get(size)
        if cached:
            buf, events = cached.pop()
            self.cached -= size
        else:
            self._make_room(size)
            buf, events = self.device.empty(size), []
        self.in_use += size
        self.peak = max(self.peak, self.in_use + self.cached)
        return buf, events

    def release(self, buf: torch.Tensor, events: list[Event]) -> None:
        size = buf.numel()
        self.in_use -= size
        self._free.setdefault(size, []).append((buf, events))
        self.cached += size

    def _drop(self, entries: list[tuple[torch.Tensor, list[Event]]]) -> None:
        for buf, events in entries:
            for event in events:
                event.synchronize()  # freed memory may be handed out at once: no copy may still touch it
            self.device.check_idle(buf, "a device buffer freed")
            freed = getattr(self.device, "freed", None)
            if freed is not None:
                freed(buf.numel())
            self.cached -= buf.numel()

    def _make_room(self, size: int) -> None:
        if self.capacity is None:
            return
        for cached_size in sorted(self._free, reverse=True):
            if self.in_use + self.cached + size <= self.capacity:
                break
            self._drop(self._free.pop(cached_size))

    def trim(self) -> None:
        for entries in self._free.values():
            self._drop(entries)
        self._free.clear()


class DeviceTier:
    """Units on the device above the host tier; the runtime's scheduler when there is a device."""

    def __init__(self, host: Scheduler, device: Device, device_budget: int | None, prefetch_depth: int = 2) -> None:
        self.host = host
        self.device = device
        self.units = host.units
        self.budget = device_budget
        self.prefetch_depth = prefetch_depth
        self.slots = {name: Slot() for name in self.units}
        self.pool = DevicePool(device, device_budget)
        self.dev_stats = DeviceStats()
        self._in: dict[str, Event] = {}    # H2D copies whose host buffer is still held
        self._out: dict[str, Event] = {}   # D2H copies whose host buffer has not landed
        self._write_through = False        # this step commits: landed host copies are written at once
        self.on_pressure: Callable[[], bool] | None = None
        host.covered = self._covers
        host.on_pressure = self._host_pressure
        if host.pool.on_release is None:
            host.pool.on_release = lambda buf: device.check_idle(buf, "a host staging buffer released")

    # ---- what the runtime reads -------------------------------------------------------------
    @property
    def stats(self):
        """The host tier's disk figures (reads, writes, waits): what the trainer's metrics show."""
        return self.host.stats

    @property
    def generation(self) -> int:
        return self.host.generation

    @generation.setter
    def generation(self, value: int) -> None:
        self.host.generation = value

    def resident_bytes(self) -> int:
        """Device bytes of units loading or on the device (what the device budget caps)."""
        return sum(self.units[n].nbytes for n, s in self.slots.items() if s.state is not DevState.ABSENT)

    def sliced_bytes(self) -> int:
        return 0

    def _note(self) -> None:
        self.dev_stats.peak_device_weights_bytes = max(self.dev_stats.peak_device_weights_bytes,
                                                       self.resident_bytes())

    def _covers(self, name: str) -> bool:
        return self.slots[name].state is not DevState.ABSENT

    # ---- the access sequence ----------------------------------------------------------------
    def begin_pass(self, sequence: Sequence[str]) -> None:
        self.host.begin_pass(sequence)

    def acquire(self, names: Sequence[str]) -> None:
        self.host.advance(names)
        for name in names:
            self.slots[name].pins += 1
        try:
            for name in names:
                self._make_resident(name)
        except BaseException:
            for name in names:
                self.slots[name].pins -= 1
            raise
        self.prefetch()

    def pin_resident(self, name: str) -> None:
        slot = self.slots[name]
        slot.pins += 1
        try:
            self._make_resident(name)
            self.ensure_writable([name])
        except BaseException:
            slot.pins -= 1
            raise

    def release(self, names: Sequence[str]) -> None:
        for name in names:
            slot = self.slots[name]
            assert slot.pins > 0, f"unit {name} released more often than acquired"
            slot.pins -= 1
            if slot.pins == 0:
                slot.uses = [self.device.record()] + ([slot.out] if slot.out is not None else [])

    def rest(self, name: str) -> None:
        return None

    def ensure_writable(self, names: Sequence[str]) -> None:
        """The compute is about to update `names`: after any D2H copy still reading them."""
        for name in names:
            slot = self.slots[name]
            if slot.out is not None:
                self.device.compute_wait(slot.out)
            if slot.buffer is not None:
                self.device.check_idle(slot.buffer, f"an update of unit {name}")

    # ---- coming in --------------------------------------------------------------------------
    def _make_resident(self, name: str) -> None:
        slot = self.slots[name]
        if slot.state is DevState.ABSENT:
            self._start_load(name, required=True)
        if slot.state is DevState.LOADING:
            self.device.compute_wait(slot.event)
            slot.state = DevState.ON_DEVICE
        if not slot.bound:
            self.device.check_idle(slot.buffer, f"compute on unit {name}")
            self._bind(name)

    def _start_load(self, name: str, required: bool) -> bool:
        unit, slot = self.units[name], self.slots[name]
        if not required and unit.state not in (UnitState.RESIDENT, UnitState.WRITING):
            return False  # a prefetch copies only what the host holds; reading it is the host's prefetch
        if not self._make_room(unit.nbytes, before=self.host.next_use(name), required=required):
            return False
        if name in self._out:
            self._land_out(name, wait=True)  # its host buffer is being filled from an older device copy
        host_buf = self.host.hold(name)  # read from the store first if the host does not hold it
        buf, events = self.pool.acquire(unit.nbytes)
        try:
            slot.event = self.device.copy_in(buf[:unit.nbytes], host_buf[:unit.nbytes], after=events)
        except BaseException:
            self.pool.release(buf, events)
            self.host.unhold(name)
            raise
        slot.buffer, slot.uses = buf, []
        slot.state = DevState.LOADING
        self._in[name] = slot.event
        self.dev_stats.h2d_copies += 1
        self.dev_stats.h2d_bytes += unit.nbytes
        self._note()
        return True

    def prefetch(self) -> None:
        """Copy the next units in the sequence to the device while they fit, from host memory only."""
        self._reap()
        started = 0
        for name in self.host.upcoming():
            if started >= self.prefetch_depth:
                break
            if self.slots[name].state is not DevState.ABSENT:
                continue
            if not self._start_load(name, required=False):
                break
            started += 1
        self.host.prefetch()

    def poll(self) -> None:
        """Called from gradient hooks: land finished copies, then prefetch if that freed anything."""
        if self._reap():
            self.prefetch()
        self.host.poll()

    def _reap(self) -> bool:
        """Give the host back buffers whose copies completed; whether any did."""
        landed = False
        for name in [n for n, e in self._in.items() if e.query()]:
            self._land_in(name, wait=False)
            landed = True
        for name in [n for n, e in self._out.items() if e.query()]:
            self._land_out(name, wait=False)
            landed = True
        return landed

    def _land_in(self, name: str, wait: bool) -> None:
        event = self._in.pop(name)
        if wait:
            self._host_wait(event)
        self.host.unhold(name)

    def _host_wait(self, event: Event) -> None:
        started = time.perf_counter()
        event.synchronize()
        self.dev_stats.host_waits_s += time.perf_counter() - started

    # ---- going out --------------------------------------------------------------------------
    def _copy_out(self, name: str) -> None:
        """Start copying `name`'s updated device bytes into its host buffer."""
        unit, slot = self.units[name], self.slots[name]
        host_buf = self.host.hold(name, blank=True)
        try:
            slot.out = self.device.copy_out(host_buf[:unit.nbytes], slot.buffer[:unit.nbytes],
                                            after=[self.device.record()])  # after the compute that updated it
        except BaseException:
            self.host.unhold(name)
            raise
        self._out[name] = slot.out
        slot.uses.append(slot.out)
        slot.dirty = False
        unit.settled = slot.settled
        self.dev_stats.d2h_copies += 1
        self.dev_stats.d2h_bytes += unit.nbytes

    def _land_out(self, name: str, wait: bool) -> None:
        """A D2H copy completed: the host copy holds the updates now and is the host tier's to write."""
        event = self._out.pop(name)
        if wait:
            self._host_wait(event)
        unit, slot = self.units[name], self.slots[name]
        if slot.out is event:
            slot.out = None
        self.device.check_idle(unit.buffer, f"the host copy of unit {name} written")
        unit.dirty = unit.updated = True
        self.host.unhold(name)
        if unit.state is UnitState.RESIDENT and unit.settled and (
                self._write_through or self.host.likely_evicted(name)):
            self.host.write_back(name)

    def mark_updated(self, unit: Unit) -> None:
        """The compute updated `unit` on the device."""
        slot = self.slots[unit.name]
        slot.dirty = True
        slot.settled = False
        unit.updated = True

    def settle(self, unit: Unit, commit_due: bool) -> None:
        """`unit`'s updates of this step are complete: copy it out now if the step commits or the
        device will evict it before its next use (overlapping the rest of backward)."""
        slot = self.slots[unit.name]
        self._write_through = commit_due
        if slot.dirty:
            slot.settled = True
            if slot.state is DevState.ON_DEVICE and (commit_due or self.likely_evicted(unit.name)):
                self._copy_out(unit.name)

    def settle_all(self) -> None:
        for name, slot in self.slots.items():
            slot.settled = True
            self.units[name].settled = True

    def likely_evicted(self, name: str) -> bool:
        if self.budget is None:
            return False
        needed = self.host.needed_before_next_use(name)
        return self.units[name].nbytes + sum(self.units[u].nbytes for u in needed) > self.budget

    # ---- eviction ---------------------------------------------------------------------------
    def _evictable(self, name: str, required: bool) -> bool:
        unit, slot = self.units[name], self.slots[name]
        return (slot.state is not DevState.ABSENT and slot.pins == 0 and unit.pending_grads == 0
                and unit.held_grads == 0 and unit.reducing == 0
                and (not slot.dirty or (required and slot.settled)))

    def _make_room(self, nbytes: int, before: int, required: bool) -> bool:
        if self.budget is None:
            return True
        while self.resident_bytes() + nbytes > self.budget:
            candidates = [n for n in self.slots if self._evictable(n, required)]
            if not required:
                candidates = [n for n in candidates if self.host.next_use(n) > before and not self.slots[n].dirty]
            if not candidates:
                if not required:
                    return False
                if self.on_pressure is not None and self.on_pressure():
                    continue  # the runtime gave up pins it could do without (kept graphs)
                holding = [n for n, s in self.slots.items() if s.state is not DevState.ABSENT and s.pins == 0]
                if holding:  # last resort: a unit holding gradients not applied yet (host tier: the same)
                    self._evict(max(holding, key=self.host.next_use))
                    continue
                held = [n for n, s in self.slots.items() if s.state is not DevState.ABSENT]
                raise DoesNotFit(
                    f"device weights budget {format_size(self.budget, 'down')} cannot hold a unit of "
                    f"{format_size(nbytes, 'up')}" + (f" beside {', '.join(held)}" if held else "")
                    + f"; raise it to at least {format_size(self.resident_bytes() + nbytes, 'up')}")
            self._evict(max(candidates, key=self.host.next_use))
        return True

    def _evict(self, name: str) -> None:
        slot = self.slots[name]
        if slot.dirty:
            self._copy_out(name)
        self._free(name)

    def _free(self, name: str) -> None:
        """`name` leaves the device; its buffer goes back to the pool with the events guarding it."""
        slot = self.slots[name]
        if slot.bound:
            self._unbind(name)
        events = slot.uses + [self.device.record()]  # its last compute use may be after the last release
        if slot.state is DevState.LOADING:
            events.append(slot.event)
        self.pool.release(slot.buffer, events)
        slot.buffer, slot.event, slot.uses = None, None, []
        slot.state = DevState.ABSENT

    def _bind(self, name: str) -> None:
        bind_views(self.units[name], self.slots[name].buffer)
        self.slots[name].bound = True

    def _unbind(self, name: str) -> None:
        unbind_views(self.units[name])
        self.slots[name].bound = False

    def _host_pressure(self) -> bool:
        """The host tier needs room and every unit it holds is pinned: land the copies holding
        host buffers (waiting for them), else ask the runtime (kept graphs)."""
        if self._in or self._out:
            for name in list(self._in):
                self._land_in(name, wait=True)
            for name in list(self._out):
                self._land_out(name, wait=True)
            return True
        return self.on_pressure is not None and self.on_pressure()

    # ---- commit, rollback, close ------------------------------------------------------------
    def _land_all(self) -> None:
        for name in list(self._in):
            self._land_in(name, wait=True)
        for name in list(self._out):
            self._land_out(name, wait=True)

    def flush(self) -> None:
        """Before a commit: every updated device unit out to the host, then the host tier's flush."""
        self._write_through = True
        for name, slot in self.slots.items():
            if slot.dirty:
                self._copy_out(name)
        self._land_all()
        self._write_through = False
        self.host.flush()

    def drain(self, raise_errors: bool = True) -> None:
        self._land_all()
        self.host.drain(raise_errors)

    def written_records(self) -> dict[str, object]:
        return self.host.written_records()

    def committed(self) -> None:
        self.host.committed()
        for slot in self.slots.values():
            slot.dirty, slot.settled = False, True

    def rollback(self) -> None:
        """Forget every update since the last commit: updated units leave the device unwritten."""
        self._land_all()
        for name, slot in self.slots.items():
            if slot.state is not DevState.ABSENT and (slot.dirty or self.units[name].updated):
                slot.pins = 0
                slot.dirty = False
                self._free(name)
            slot.dirty, slot.settled = False, True
        self.host.rollback()

    def evict_all(self) -> None:
        """Write nothing; free every clean, unpinned device unit, then the host tier's."""
        self._land_all()
        for name, slot in self.slots.items():
            if slot.state is not DevState.ABSENT and slot.pins == 0 and not slot.dirty:
                self._free(name)
        self.host.evict_all()

    def close(self) -> None:
        try:
            self._land_all()
        finally:
            for name, slot in self.slots.items():
                if slot.state is not DevState.ABSENT:
                    slot.pins = 0
                    self._free(name)
            self.pool.trim()
            self.host.close()

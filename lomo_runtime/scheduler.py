"""Unit residency: which units' weights are in memory, loading, or being written.

One record per unit with an explicit state (no parallel dicts). The scheduler
knows the order in which units will be used this step (forward order, then
reverse order for backward with recomputation) and uses it twice:

* prefetch: background reads of the next `prefetch_depth` units, as long as
  they fit the weights budget, overlapping disk with compute;
* eviction: when a unit must come in and the budget is full, the resident unit
  whose next use is farthest away goes out (Belady's rule, optimal when the
  future is known). Across the step boundary this keeps the units that
  backward touched last (the first ones) for the next forward: zig-zag reuse
  falls out of the rule instead of being a special case.

Only the thread that calls the scheduler mutates unit records; I/O threads run
`store.read_unit` / `store.write_unit` and hand results back through futures.

Budget invariant: the bytes of units that are LOADING, RESIDENT or WRITING
never exceed `weights_budget` (when one is set). A single access that needs
more than the budget raises `DoesNotFit`.

Write-back between commits (the runtime commits every N steps): an updated
unit that will stay resident until its next use is not written at all until
the commit (`flush`); one that Belady will evict before then is written as
soon as its update is complete (`likely_evicted`), so the write overlaps the
rest of backward. A unit still dirty when room is needed is written first and
then evicted (the compute thread waits for that write). Every write of one
commit interval goes to the same uncommitted generation (one file per unit,
rewritten if the unit is evicted twice): the committed file is never touched,
and the store holds at most two files per unit.
"""
from __future__ import annotations

import enum
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import DoesNotFit
from .sizes import format_size
from .skeleton import bind, unbind


class UnitState(enum.Enum):
    ON_DISK = "on_disk"    # only the committed (or an uncommitted newer) file holds it
    LOADING = "loading"    # a read into its staging buffer is in flight
    RESIDENT = "resident"  # buffer holds the current weights; parameters may be bound
    WRITING = "writing"    # resident, and its updated bytes are being written as a new generation
    SLICED = "sliced"      # collective mode (shard): only this rank's slice is in memory (`slice_buf`)


@dataclass
class Unit:
    """Everything the runtime knows about one unit, in one record."""

    name: str
    nbytes: int                                    # staging bytes (the unit file, 4 KiB multiple)
    params: list[tuple[nn.Parameter, torch.dtype, tuple[int, ...], int, int]]  # (param, dtype, shape, offset, nbytes)
    # Update-rule state streamed with the unit: (the parameter's state dict, key, dtype, shape, offset, nbytes).
    states: list[tuple[dict, str, torch.dtype, tuple[int, ...], int, int]] = field(default_factory=list)
    state: UnitState = UnitState.ON_DISK
    buffer: torch.Tensor | None = None
    bound: bool = False
    pins: int = 0                                  # segments running with this unit right now
    pending_grads: int = 0                         # gradients accumulated but not yet applied
    held_grads: int = 0                            # complete gradients held for the unit's clip norm (clip_mode="unit")
    reducing: int = 0                              # gradients in an all-reduce across ranks, not yet applied
    disk_nbytes: int = 0                           # bytes one read or write moves on disk (0 given: nbytes; a shard: its slice)
    slice_buf: torch.Tensor | None = None          # SLICED: this rank's slice of the unit's bytes
    slice_dirty: bool = False                      # SLICED: the slice holds updates the store does not have
    updated: bool = False                          # weights or state changed since the last commit
    dirty: bool = False                            # changed since its last write-back began
    settled: bool = True                           # every update of this step is applied (a dirty unit may be written)
    future: Future | None = None                   # the in-flight read or write
    written: object | None = None                  # store record of the newest uncommitted write

    def __post_init__(self) -> None:
        self.disk_nbytes = self.disk_nbytes or self.nbytes


@dataclass
class SchedulerStats:
    reads: int = 0
    read_bytes: int = 0
    writes: int = 0
    write_bytes: int = 0
    read_waits_s: float = 0.0                      # time the compute thread waited on a read it needed
    write_waits_s: float = 0.0                     # ... on a write (to evict or update a unit being written)
    peak_resident_bytes: int = 0
    peak_slice_bytes: int = 0                      # collective mode: slices held at rest (SLICED units)

    @property
    def waits_s(self) -> float:
        """Time the compute thread waited on I/O, reads and writes."""
        return self.read_waits_s + self.write_waits_s


def bind_views(unit: Unit, buffer: torch.Tensor) -> None:
    """Point `unit`'s parameters and rule state at views of `buffer` (its bytes, in the store's layout)."""
    for param, dtype, shape, offset, nbytes in unit.params:
        bind(param, buffer[offset:offset + nbytes].view(dtype).view(shape))
    for state, key, dtype, shape, offset, nbytes in unit.states:
        state[key] = buffer[offset:offset + nbytes].view(dtype).view(shape)


def unbind_views(unit: Unit) -> None:
    for param, *_ in unit.params:
        unbind(param)
    for state, key, *_ in unit.states:
        state.pop(key, None)


class Scheduler:
    """Residency, prefetch and eviction of units under a weights budget."""

    def __init__(
        self,
        units: Sequence[Unit],
        store,
        pool,
        weights_budget: int | None,
        prefetch_depth: int = 2,
        io_threads: int = 2,
        collective: bool = False,
        slice_rank: int = 0,
        bind: bool = True,
    ) -> None:
        self.units = {u.name: u for u in units}
        # Bind parameters to the host buffers (compute on the host). Under a device tier (tiers.py)
        # this scheduler is the host tier: the device tier binds parameters to device buffers.
        self.bind_params = bind
        # Under a device tier: is this unit held by the device now? Such a unit's host copy is not
        # needed until the device lets it go, so prefetch skips it and eviction takes it first.
        self.covered: Callable[[str], bool] | None = None
        # Collective mode (`--parallel shard`: a read all-gathers the unit): every rank must start
        # the same reads in the same order, so no decision may depend on I/O timing. Reads run on
        # one thread, in order; nothing is prefetched or reaped because a future happened to be
        # done; a prefetch may evict a unit still being written (waiting for its write).
        self.collective = collective
        # Collective mode keeps a unit at rest as this rank's slice (ZeRO-3's partitioned weights):
        # after its use, unless it is needed within the prefetch window, a whole unit goes down to
        # SLICED (its slice copied out, the whole buffer freed); using it again gathers the other
        # slices from the other ranks' memory, with no disk read. Slices leave memory (written if
        # they hold updates) only when the budget needs their room. The budget counts whole units
        # and slices, and a demotion needs room for the slice beside the whole unit while it
        # copies; without that room the unit leaves memory whole.
        self.slice_rank = slice_rank
        if collective:
            io_threads = 1
        self.store = store
        self.pool = pool
        self.weights_budget = weights_budget
        self.prefetch_depth = prefetch_depth
        self.stats = SchedulerStats()
        # Reads and writes get their own threads: a write-back of the unit just updated must never
        # queue in front of the read the next unit's compute is waiting for.
        self._reads = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="lomo-read")
        self._writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lomo-write")
        self._sequence: list[str] = []
        self._positions: dict[str, list[int]] = {}
        self._cursor = -1
        self._lock = threading.Lock()  # guards stats touched by I/O threads
        self._inflight: set[str] = set()  # units with a read or write future (poll scans only these)
        self._count_waits = True
        self.generation = 1  # the uncommitted generation this commit interval writes (the runtime sets it)
        # Called when a required load finds nothing evictable: the runtime releases pins it can do
        # without (a kept head graph) and returns whether it released any.
        self.on_pressure: Callable[[], bool] | None = None

    # ---- the access sequence -------------------------------------------------------------
    def begin_pass(self, sequence: Sequence[str]) -> None:
        """Announce the order in which units will be acquired until the next `begin_pass`."""
        self._sequence = list(sequence)
        self._positions = {}
        for pos, name in enumerate(self._sequence):
            self._positions.setdefault(name, []).append(pos)
        self._cursor = -1

    def next_use(self, name: str) -> int:
        """Position of `name`'s next use in the access sequence (past its end: the next pass's)."""
        return self._next_use(name)

    def upcoming(self) -> Iterator[str]:
        """The distinct units of the sequence after the cursor, in order of use, wrapping into the
        next pass (which repeats this one: the next step's forward, the next eval batch)."""
        seen: set[str] = set()
        n = len(self._sequence)
        for pos in range(self._cursor + 1, self._cursor + 1 + n):
            name = self._sequence[pos % n]
            if name not in seen:
                seen.add(name)
                yield name

    def advance(self, names: Sequence[str]) -> None:
        """Move the cursor past `names`' uses without acquiring them (a device tier holds them)."""
        for name in names:
            self._advance(name)

    def _next_use(self, name: str) -> int:
        positions = self._positions.get(name)
        if not positions:
            return 1 << 60  # not used by this pass at all
        for pos in positions:
            if pos > self._cursor:
                return pos
        # Next step repeats this pass: its first use comes after the end of this one.
        return len(self._sequence) + positions[0]

    def _advance(self, name: str) -> None:
        for pos in self._positions.get(name, ()):
            if pos > self._cursor:
                self._cursor = pos
                return

    # ---- acquire / release -----------------------------------------------------------------
    def acquire(self, names: Sequence[str]) -> None:
        """Make `names` resident with parameters bound, and pin them until `release`."""
        for name in names:
            self._advance(name)
        for name in names:
            self.units[name].pins += 1  # pin first, so making room for one never evicts another
        try:
            for name in names:
                self._make_resident(self.units[name])
        except BaseException:
            for name in names:
                self.units[name].pins -= 1
            raise
        self.prefetch()

    def pin_resident(self, name: str) -> None:
        """Make `name` resident, bound and writable for an update outside any segment (gradients a
        pass left pending), pinned until `release`. The access sequence's cursor does not move."""
        unit = self.units[name]
        unit.pins += 1
        try:
            self._make_resident(unit)
            self.ensure_writable([name])
        except BaseException:
            unit.pins -= 1
            raise

    def release(self, names: Sequence[str]) -> None:
        for name in names:
            unit = self.units[name]
            assert unit.pins > 0, f"unit {name} released more often than acquired"
            unit.pins -= 1
            if unit.pins == 0:
                self.rest(name)

    def rest(self, name: str) -> None:
        """`name`'s use is over for now (released, or its updates settled). In collective mode a
        unit not needed within the prefetch window goes down to its slice; otherwise nothing."""
        unit = self.units[name]
        if not self.collective or unit.state not in (UnitState.RESIDENT, UnitState.WRITING):
            return
        if not self._evictable(unit, allow_dirty=True) or name in self._window() or not self._slice_fits(unit):
            return
        self._demote(unit)

    def _slice_fits(self, unit: Unit) -> bool:
        """Is there budget for `unit`'s slice beside the whole unit while a demotion copies it?"""
        return self.weights_budget is None or self._resident_bytes() + unit.disk_nbytes <= self.weights_budget

    def _window(self) -> set[str]:
        """The units in use next and the `prefetch_depth` after them: the next `prefetch_depth` + 1
        distinct units of the sequence (collective mode keeps them whole, and prefetches no further)."""
        upcoming: set[str] = set()
        for name in self.upcoming():
            upcoming.add(name)
            if len(upcoming) > self.prefetch_depth:
                break
        return upcoming

    def _slice_span(self, unit: Unit) -> tuple[int, int]:
        return self.slice_rank * unit.disk_nbytes, unit.disk_nbytes

    def _demote(self, unit: Unit) -> None:
        """Whole unit -> its slice in memory (collective mode). A dirty unit's slice keeps its updates."""
        if unit.state is UnitState.WRITING:
            self._wait(unit)
            self._finish_write(unit)
        offset, size = self._slice_span(unit)
        slice_buf = self.pool.acquire(size)
        slice_buf[:size].copy_(unit.buffer[offset:offset + size])
        self._note_resident(extra=size)  # the copy's moment: the slice beside the whole unit
        if unit.bound:
            self._unbind(unit)
        self.pool.release(unit.buffer)
        unit.buffer = None
        unit.slice_buf = slice_buf
        unit.slice_dirty = unit.dirty
        unit.dirty = False
        unit.state = UnitState.SLICED
        self._note_resident()

    def _make_resident(self, unit: Unit) -> None:
        if unit.state in (UnitState.ON_DISK, UnitState.SLICED):
            self._start_load(unit, required=True)
        if unit.state is UnitState.LOADING:
            self._wait(unit)
            self._finish_load(unit)
        if not unit.bound and self.bind_params:
            self._bind(unit)

    def hold(self, name: str, blank: bool = False) -> torch.Tensor:
        """Pin `name` in host memory for a device copy and return its buffer, until `unhold`. The
        cursor does not move and nothing is bound. `blank=True`: the caller overwrites the whole
        buffer (a device -> host copy of updated bytes), so a unit on disk is not read."""
        unit = self.units[name]
        unit.pins += 1
        try:
            if blank and unit.state is UnitState.ON_DISK:
                self._make_room(unit.nbytes, before=self._next_use(name), required=True)
                if unit.state is UnitState.ON_DISK:
                    unit.buffer = self.pool.acquire(unit.nbytes)
                    unit.state = UnitState.RESIDENT
                    self._note_resident()
            if blank:
                self.ensure_writable([name])
            self._make_resident(unit)
        except BaseException:
            unit.pins -= 1
            raise
        return unit.buffer

    def unhold(self, name: str) -> None:
        unit = self.units[name]
        assert unit.pins > 0, f"unit {name} unheld more often than held"
        unit.pins -= 1

    # ---- loading ---------------------------------------------------------------------------
    def _start_load(self, unit: Unit, required: bool) -> bool:
        sliced = unit.state is UnitState.SLICED  # its slice, counted already, is freed once copied in
        if not self._make_room(unit.nbytes, before=self._next_use(unit.name), required=required):
            return False
        if unit.state is not (UnitState.SLICED if sliced else UnitState.ON_DISK):
            return False  # making room took it (a slice is evictable too): load it another time
        unit.buffer = self.pool.acquire(unit.nbytes)
        if sliced:  # gather the other ranks' slices from their memory: no disk read
            offset, size = self._slice_span(unit)
            unit.buffer[offset:offset + size].copy_(unit.slice_buf[:size])
            self.pool.release(unit.slice_buf)
            unit.slice_buf = None
            unit.dirty, unit.slice_dirty = unit.slice_dirty, False
            unit.state = UnitState.LOADING
            unit.future = self._reads.submit(self.store.gather_unit, unit.name, unit.buffer)
        else:
            unit.state = UnitState.LOADING
            record = unit.written  # a newer uncommitted generation wins over the committed one
            unit.future = self._reads.submit(self._read, unit.name, unit.buffer, record)
            # Counted when issued, not when done, so a step's figures do not depend on thread timing.
            self.stats.reads += 1
            self.stats.read_bytes += unit.disk_nbytes
        self._inflight.add(unit.name)
        self._note_resident()
        return True

    def _read(self, name: str, buffer: torch.Tensor, record) -> None:
        self.store.read_unit(name, buffer, record) if record is not None else self.store.read_unit(name, buffer)

    def _finish_load(self, unit: Unit) -> None:
        assert unit.future is not None
        try:
            unit.future.result()  # re-raises a read or checksum error in the compute thread
        except BaseException:
            self.pool.release(unit.buffer)  # the buffer holds nothing usable
            unit.buffer = None
            unit.state = UnitState.ON_DISK
            raise
        finally:
            unit.future = None
            self._inflight.discard(unit.name)
        unit.state = UnitState.RESIDENT

    def _bind(self, unit: Unit) -> None:
        assert unit.buffer is not None
        bind_views(unit, unit.buffer)
        unit.bound = True

    def _unbind(self, unit: Unit) -> None:
        unbind_views(unit)
        unit.bound = False

    def prefetch(self) -> None:
        """Start reads for the next units in the sequence while they fit (evicting only later-used units)."""
        if not self.collective:
            self._reap()
        started = 0
        window = self._window() if self.collective else None
        for name in self.upcoming():
            if started >= self.prefetch_depth:
                break
            if window is not None and name not in window:
                break  # collective mode: only the window is whole; what lies beyond rests as slices
            if self.covered is not None and self.covered(name):
                continue  # the device holds it: no host copy needed now
            unit = self.units[name]
            if unit.state not in (UnitState.ON_DISK, UnitState.SLICED):
                continue
            if not self._start_load(unit, required=False):
                break
            started += 1

    # ---- eviction --------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        """Bytes of units loading, resident or being written (what the weights budget caps)."""
        return self._resident_bytes()

    def _resident_bytes(self) -> int:
        return sum(u.disk_nbytes if u.state is UnitState.SLICED else u.nbytes
                   for u in self.units.values() if u.state is not UnitState.ON_DISK)

    def _note_resident(self, extra: int = 0) -> None:
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self._resident_bytes() + extra)
        if self.collective:
            self.stats.peak_slice_bytes = max(self.stats.peak_slice_bytes, self.sliced_bytes())

    def sliced_bytes(self) -> int:
        """Bytes of the slices held at rest (collective mode's SLICED units)."""
        return sum(u.disk_nbytes for u in self.units.values() if u.state is UnitState.SLICED)

    def _evictable(self, unit: Unit, allow_dirty: bool = False) -> bool:
        """May `unit` leave memory now? A dirty one only if its updates are complete and the caller
        accepts waiting for its write (`allow_dirty`: a load that is needed now)."""
        if unit.state is UnitState.SLICED:  # leaving memory writes a slice holding updates
            return unit.pins == 0 and (not unit.slice_dirty or allow_dirty)
        return (
            unit.state in (UnitState.RESIDENT, UnitState.WRITING)
            and unit.pins == 0
            and unit.pending_grads == 0
            and unit.held_grads == 0
            and unit.reducing == 0
            and (not unit.dirty or (allow_dirty and unit.settled))
        )

    def likely_evicted(self, name: str) -> bool:
        """Will Belady evict `name` before its next use? True when the units needed before then,
        with it, do not fit the budget. The runtime writes such a unit as soon as its update is
        complete, so the write overlaps compute instead of stalling the load that evicts it."""
        if self.weights_budget is None or self.collective:
            return False  # collective mode: an evicted unit keeps its slice, written at the commit
        needed = self.needed_before_next_use(name)
        return self.units[name].nbytes + sum(self.units[u].nbytes for u in needed) > self.weights_budget

    def needed_before_next_use(self, name: str) -> set[str]:
        """The other units the sequence uses from the cursor until `name`'s next use."""
        horizon = self._next_use(name)
        n = len(self._sequence)
        needed: set[str] = set()
        for pos in range(self._cursor + 1, min(horizon, self._cursor + 1 + n)):
            needed.add(self._sequence[pos % n])
        needed.discard(name)
        return needed

    def _make_room(self, nbytes: int, before: int, required: bool) -> bool:
        """Free budget for `nbytes`; evict only units next used after position `before`.

        For a required load every unpinned unit may go (it is needed now); for a
        prefetch only units needed later than the prefetched one, so prefetching
        never makes the future worse.
        """
        if self.weights_budget is None:
            return True
        while self._resident_bytes() + nbytes > self.weights_budget:
            candidates = [u for u in self.units.values() if self._evictable(u, allow_dirty=required)]
            covered = self.covered or (lambda name: False)
            if not required:
                candidates = [u for u in candidates if covered(u.name) or self._next_use(u.name) > before]
                if not self.collective:  # never block a prefetch (collective mode: timing must not decide)
                    candidates = [u for u in candidates if u.state is UnitState.RESIDENT]
            if not candidates:
                if not required:
                    return False
                busy = [u for u in self.units.values() if u.state is UnitState.LOADING and u.pins == 0]
                if busy:  # a prefetch holds the space: let it land, then reconsider
                    self._wait(busy[-1])
                    self._finish_load(busy[-1])
                    continue
                if self.on_pressure is not None and self.on_pressure():
                    continue  # the runtime gave up pins it could do without (kept graphs)
                # Last resort: a unit holding gradients not yet applied, or updated part-way through
                # this step. A loss whose uses of a weight come far apart in backward (two forwards)
                # would otherwise pin every unit. Its gradients stay in memory; it is written if
                # dirty, and read back when they are applied.
                holding = [u for u in self.units.values()
                           if u.state in (UnitState.RESIDENT, UnitState.WRITING, UnitState.SLICED) and u.pins == 0]
                if holding:
                    self._evict(max(holding, key=lambda u: self._next_use(u.name)))
                    continue
                held = [
                    f"{u.name} ({'pending gradient' if u.pending_grads else 'in use'})"
                    for u in self.units.values() if u.state is not UnitState.ON_DISK
                ]
                raise DoesNotFit(
                    f"weights budget {format_size(self.weights_budget, 'down')} cannot hold a unit of {format_size(nbytes, 'up')}"
                    + (f" beside {', '.join(held)}" if held else "")
                    + f"; raise the budget to at least {format_size(self._resident_bytes() + nbytes, 'up')}"
                )
            # Belady: the unit used farthest ahead goes; a copy the device tier covers goes first.
            victim = max(candidates, key=lambda u: (covered(u.name), self._next_use(u.name)))
            self._evict(victim)
        return True

    def _evict(self, unit: Unit) -> None:
        """Make room: drop `unit` from memory (collective mode: a whole unit goes down to its slice)."""
        if self.collective and unit.state in (UnitState.RESIDENT, UnitState.WRITING) and self._slice_fits(unit):
            self._demote(unit)
            return
        self._drop(unit)  # a full budget: the unit leaves memory whole (its slice written if dirty)

    def _drop(self, unit: Unit) -> None:
        """`unit` leaves memory; what it holds that the store lacks is written first."""
        if unit.state is UnitState.SLICED:
            if unit.slice_dirty:
                self._write_slice(unit)
            self.pool.release(unit.slice_buf)
            unit.slice_buf = None
            unit.state = UnitState.ON_DISK
            return
        if unit.dirty and unit.state is UnitState.RESIDENT:
            self.write_back(unit.name)  # its updates must reach the store before the bytes go
        if unit.state is UnitState.WRITING:
            self._wait(unit)
            self._finish_write(unit)
        if unit.bound:
            self._unbind(unit)
        self.pool.release(unit.buffer)
        unit.buffer = None
        unit.state = UnitState.ON_DISK

    # ---- write-back, commit, rollback ------------------------------------------------------
    def write_back(self, name: str) -> None:
        """Start writing an updated unit as this interval's uncommitted generation (`self.generation`)."""
        unit = self.units[name]
        assert unit.state is UnitState.RESIDENT and unit.buffer is not None
        unit.dirty = False
        unit.state = UnitState.WRITING
        unit.future = self._writes.submit(self._write, name, unit.buffer, self.generation)
        self._inflight.add(name)

    def _write_slice(self, unit: Unit) -> None:
        """Write a SLICED unit's slice (its updates) as this interval's generation, on this thread."""
        unit.written = self._write(unit.name, unit.slice_buf, self.generation, slice_only=True)
        unit.slice_dirty = False

    def flush(self) -> None:
        """Write every unit whose updates are not in the store yet, and wait for all writes (before a commit).

        Its waits are the commit's time, not counted in `stats.*waits_s` (the compute's waits)."""
        self._count_waits = False
        try:
            for unit in self.units.values():
                if unit.pending_grads or unit.held_grads or unit.reducing:
                    raise RuntimeError(f"internal error: unit {unit.name} holds gradients not applied at a commit")
                if unit.state is UnitState.SLICED and unit.slice_dirty:
                    self._write_slice(unit)
                    continue
                if unit.dirty and unit.state is UnitState.LOADING:  # a dirty slice being gathered whole
                    self._wait(unit)
                    self._finish_load(unit)
                if unit.dirty:
                    if not unit.settled or unit.state is UnitState.ON_DISK:
                        raise RuntimeError(f"internal error: unit {unit.name} has updates in memory that cannot be committed")
                    self.ensure_writable([unit.name])
                    self.write_back(unit.name)
            self.drain()
        finally:
            self._count_waits = True

    def _write(self, name: str, buffer: torch.Tensor, generation: int, slice_only: bool = False):
        write = self.store.write_slice if slice_only else self.store.write_unit
        record = write(name, buffer, generation)
        with self._lock:
            self.stats.writes += 1
            self.stats.write_bytes += self.units[name].disk_nbytes
        return record

    def _finish_write(self, unit: Unit) -> None:
        assert unit.future is not None
        try:
            unit.written = unit.future.result()
        except BaseException:
            unit.dirty = True  # the write failed; the bytes in memory are intact and still unwritten
            raise
        finally:
            unit.future = None
            self._inflight.discard(unit.name)
            unit.state = UnitState.RESIDENT

    def poll(self) -> None:
        """Called often during compute (the runtime calls it from every gradient hook): when a read or
        write has finished, prefetch again. A unit still being written cannot be evicted, so a
        prefetch that was blocked by one can start as soon as its write lands, not at the next acquire."""
        if self.collective:
            return  # prefetch at acquire only: the same points on every rank
        if self._inflight and any(self.units[n].future.done() for n in self._inflight):
            self.prefetch()

    def ensure_writable(self, names: Sequence[str]) -> None:
        """Wait for in-flight writes of `names`: their buffers are about to change."""
        for name in names:
            unit = self.units[name]
            if unit.state is UnitState.WRITING:
                self._wait(unit)
                self._finish_write(unit)

    def _reap(self) -> None:
        for name in list(self._inflight):
            unit = self.units[name]
            if unit.future is not None and unit.future.done():
                if unit.state is UnitState.WRITING:
                    self._finish_write(unit)
                elif unit.state is UnitState.LOADING:
                    self._finish_load(unit)

    def _wait(self, unit: Unit) -> None:
        assert unit.future is not None
        start = time.perf_counter()
        try:
            unit.future.result()
        except BaseException:
            pass  # raised again by _finish_load/_finish_write
        waited = time.perf_counter() - start
        if not self._count_waits:
            return
        if unit.state is UnitState.WRITING:
            self.stats.write_waits_s += waited
        else:
            self.stats.read_waits_s += waited

    def drain(self, raise_errors: bool = True) -> None:
        """Wait for every read and write in flight.

        With `raise_errors=False` (rollback, close) a failed read or write is
        only forgotten: it has been reported already, or its step is being
        dropped anyway, and the runtime must stay usable afterwards. (A failed
        read leaves its unit on disk, a failed write leaves it resident and dirty.)
        """
        for unit in self.units.values():
            if unit.future is None:
                continue
            self._wait(unit)
            try:
                if unit.state is UnitState.WRITING:
                    self._finish_write(unit)
                else:
                    self._finish_load(unit)
            except Exception:
                if raise_errors:
                    raise

    def evict_all(self) -> None:
        """Write nothing, drop every clean, unpinned unit from memory (before export or at rest)."""
        self.drain()
        for unit in self.units.values():
            if unit.state in (UnitState.RESIDENT, UnitState.SLICED) and self._evictable(unit):
                self._drop(unit)

    def written_records(self) -> dict[str, object]:
        """Records of units written since the last commit (what the next commit must name)."""
        return {u.name: u.written for u in self.units.values() if u.written is not None}

    def committed(self) -> None:
        """The store committed every written record: units are clean again."""
        for unit in self.units.values():
            unit.written = None
            unit.updated = False
            unit.dirty = False
            unit.settled = True

    def rollback(self) -> None:
        """Forget every update since the last commit: changed units are dropped and re-read."""
        self.drain(raise_errors=False)
        for unit in self.units.values():
            if unit.updated or unit.written is not None:
                unit.dirty = unit.slice_dirty = False  # dropped, not written
                if unit.state is not UnitState.ON_DISK:
                    unit.pins = 0
                    self._drop(unit)
                unit.updated = False
                unit.dirty = False
                unit.written = None
            unit.settled = True
            unit.pending_grads = unit.held_grads = unit.reducing = 0

    def close(self) -> None:
        try:
            self.drain(raise_errors=False)
        finally:
            self._reads.shutdown(wait=True)
            self._writes.shutdown(wait=True)
            for unit in self.units.values():
                if unit.state is not UnitState.ON_DISK:
                    unit.pins = 0
                    unit.pending_grads = unit.held_grads = unit.reducing = 0
                    if unit.bound:
                        self._unbind(unit)
                    for buf in (unit.buffer, unit.slice_buf):
                        if buf is not None:
                            self.pool.release(buf)
                    unit.buffer = unit.slice_buf = None
                    unit.state = UnitState.ON_DISK

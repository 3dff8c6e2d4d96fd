"""`--parallel shard`: every rank stores 1/W of every unit's bytes; a read gathers the unit.

A unit's flat bytes (its file layout: weights, then rule state, each 4 KiB-aligned) are cut into
W slices of S = align_up(ceil(N / W)) bytes; rank r owns [r S, (r + 1) S) (the last slice is
zero-padded). Each rank's working store holds its slices as one-tensor units (`SLICE`, uint8),
so WorkingStore itself is unchanged: checksums, generations, two-phase commits and crash
recovery are those of any store. The full layouts live in the store's meta (`shard`), committed
atomically with the slices they describe.

`ShardedStore` gives the runtime and the scheduler the interface of a WorkingStore of whole
units: `read_unit` reads this rank's slice into its place in the unit's buffer (W S bytes),
agrees with the other ranks that every slice read cleanly, and all-gathers the rest;
`write_unit` writes only this rank's slice. Every rank holds the same bytes in its gathered
buffers and applies the same (all-reduced) update to them, so the slices written stay one unit.

Reads are collectives: every rank must issue them in the same order. They run on one read
thread, on a process group of their own (`Parallel.gather_group`, never used by the compute
thread's gradient all-reduces), and the scheduler runs in collective mode (`Scheduler(
collective=True)`: no prefetch started by I/O timing), so every rank starts the same reads in
the same order.

Per rank, disk bytes and disk reads and writes are 1/W of one process's, and so are the weights
held at rest: the scheduler keeps a unit that is not in use (nor about to be) as this rank's
slice only (`UnitState.SLICED`), and `gather_unit` makes it whole again from the ranks' memory.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..errors import StoreError
from ..io import ALIGN, align_up, aligned_empty
from ..store import TensorSlot, UnitRecord, WorkingStore, layout, pack_tensors, tensor_views, zero_padding

SLICE = "__slice__"  # the one tensor of a slice unit


def slice_bytes(nbytes: int, world: int) -> int:
    """S: the bytes of one rank's slice of an `nbytes` unit (4 KiB-aligned, so reads stay direct)."""
    return align_up(max(ALIGN, math.ceil(nbytes / world)))


class ShardedStore:
    """A rank's slice store, presented as a store of whole units (see the module docstring)."""

    def __init__(self, inner: WorkingStore, parallel) -> None:
        self.inner = inner
        self.parallel = parallel
        self.rank, self.world = parallel.rank, parallel.world
        shard = inner.meta.get("shard")
        if not shard or shard.get("world_size") != self.world or shard.get("rank") != self.rank:
            raise StoreError(f"{inner.dir} is not rank {self.rank}'s slice store of a {self.world}-rank sharded run")
        self._layouts = {name: tuple(TensorSlot.from_json(t) for t in rec["tensors"])
                         for name, rec in shard["units"].items()}
        self._sizes = {name: int(rec["nbytes"]) for name, rec in shard["units"].items()}
        self._written: dict[tuple[str, int], UnitRecord] = {}  # whole-unit record -> slice record

    # ---- creation ---------------------------------------------------------------------------
    @staticmethod
    def create(work_dir: Path, units: Sequence[tuple[str, Sequence[tuple[str, str, tuple[int, ...], Callable]]]],
               meta: Mapping[str, Any], parallel, on_unit=None, io=None) -> "ShardedStore":
        """Create rank `parallel.rank`'s slice store. `units`: (unit, [(tensor, dtype string, shape,
        loader)]), the whole layout of every unit (state tensors included; a loader returns the
        tensor's initial value)."""
        world, rank = parallel.world, parallel.rank
        layouts = {name: layout([(t, dt, shape) for t, dt, shape, _ in tensors]) for name, tensors in units}

        def slice_loader(name: str, tensors) -> Callable[[], torch.Tensor]:
            def load() -> torch.Tensor:
                slots, nbytes = layouts[name]
                s = slice_bytes(nbytes, world)
                buf = aligned_empty(world * s)
                buf.zero_()
                pack_tensors(buf, slots, {t: loader() for t, _, _, loader in tensors})
                return buf[rank * s:(rank + 1) * s].clone()
            return load

        shard = {"world_size": world, "rank": rank,
                 "units": {name: {"nbytes": nbytes, "tensors": [t.to_json() for t in slots]}
                           for name, (slots, nbytes) in layouts.items()}}
        sources = [(name, [(SLICE, slice_loader(name, tensors))]) for name, tensors in units]
        inner = WorkingStore.create(work_dir, sources, {**meta, "shard": shard}, on_unit=on_unit, io=io)
        return ShardedStore(inner, parallel)

    # ---- the WorkingStore interface -----------------------------------------------------------
    @property
    def dir(self) -> Path:
        return self.inner.dir

    @property
    def closed(self) -> bool:
        return self.inner.closed

    @property
    def step(self) -> int:
        return self.inner.step

    @property
    def meta(self) -> dict[str, Any]:
        return self.inner.meta

    @property
    def units(self) -> dict[str, UnitRecord]:
        return {name: self._whole(rec) for name, rec in self.inner.units.items()}

    @property
    def max_unit_nbytes(self) -> int:
        return max(rec.nbytes for rec in self.units.values())

    def tensor_slots(self, name: str) -> tuple[TensorSlot, ...]:
        return self._layouts[name]

    def _whole(self, slice_rec: UnitRecord) -> UnitRecord:
        """The whole-unit record the runtime sees for a slice record."""
        name = slice_rec.name
        whole = UnitRecord(name, slice_rec.generation, slice_rec.file, self.world * slice_bytes(self._sizes[name], self.world),
                           slice_rec.checksum, self._layouts[name], slice_rec.checksum_alg)
        return whole

    def _slice_record(self, record: UnitRecord | None, name: str) -> UnitRecord:
        if record is None:
            return self.inner.units[name]
        return self._written.get((name, record.generation)) or self.inner.units[name]

    def read_unit(self, name: str, buf: torch.Tensor, record: UnitRecord | None = None, *, verify: bool = True) -> UnitRecord:
        """Read this rank's slice into its place in `buf` and gather the others' (collective)."""
        s = slice_bytes(self._sizes[name], self.world)
        mine = buf[self.rank * s:(self.rank + 1) * s]
        slice_rec = self._slice_record(record, name)
        error: BaseException | None = None
        try:
            self.inner.read_unit(name, mine, slice_rec, verify=verify)
        except BaseException as e:  # every rank must still take part in the gather below
            error = e
        ok = self.parallel.all_true(error is None, f"reading unit {name}", group=self.parallel.gather_group)
        if error is not None:
            raise error
        if not ok:
            raise StoreError(f"unit {name}: another rank failed to read its slice (its log names the file)")
        self.parallel.all_gather_into(buf[:self.world * s], mine, f"gathering unit {name}")
        return self._whole(slice_rec)

    def gather_unit(self, name: str, buf: torch.Tensor) -> None:
        """`buf` holds this rank's slice in its place (kept in memory at rest): gather the others'
        from their memory (collective; the same agreement as `read_unit`, with nothing to fail)."""
        s = slice_bytes(self._sizes[name], self.world)
        self.parallel.all_true(True, f"gathering unit {name}", group=self.parallel.gather_group)
        self.parallel.all_gather_into(buf[:self.world * s], buf[self.rank * s:(self.rank + 1) * s],
                                      f"gathering unit {name}")

    def write_slice(self, name: str, slice_buf: torch.Tensor, generation: int) -> UnitRecord:
        """Write this rank's slice, held apart from its unit (at rest), as generation `generation`."""
        s = slice_bytes(self._sizes[name], self.world)
        slice_rec = self.inner.write_unit(name, slice_buf[:s], generation)
        self._written[(name, generation)] = slice_rec
        return self._whole(slice_rec)

    def write_unit(self, name: str, buf: torch.Tensor, generation: int, tensors=None) -> UnitRecord:
        """Write this rank's slice of `buf` as generation `generation` (local: no collective)."""
        if tensors is not None and tuple(tensors) != self._layouts[name]:
            raise StoreError(f"unit {name}: a sharded store keeps the layout it was created with")
        s = slice_bytes(self._sizes[name], self.world)
        zero_padding(buf, self._layouts[name], self.world * s)  # every slice deterministic
        slice_rec = self.inner.write_unit(name, buf[self.rank * s:(self.rank + 1) * s], generation)
        whole = self._whole(slice_rec)
        self._written[(name, generation)] = slice_rec
        return whole

    def _slices(self, records: Mapping[str, UnitRecord]) -> dict[str, UnitRecord]:
        return {name: self._slice_record(rec, name) for name, rec in records.items()}

    def commit(self, step: int, records: Mapping[str, UnitRecord], meta: Mapping[str, Any] | None = None) -> None:
        self.inner.commit(step, self._slices(records), meta)
        self._written.clear()

    def prepare(self, step: int, records: Mapping[str, UnitRecord], meta: Mapping[str, Any] | None = None) -> None:
        self.inner.prepare(step, self._slices(records), meta)

    def finish_prepared(self) -> None:
        self.inner.finish_prepared()
        self._written.clear()

    def discard_uncommitted(self) -> int:
        self._written.clear()
        return self.inner.discard_uncommitted()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(tensor, value) of the committed generation, unit by unit, gathered (collective)."""
        for name, rec in self.units.items():
            buf = aligned_empty(rec.nbytes)
            self.read_unit(name, buf)
            yield from tensor_views(buf, self._layouts[name]).items()
            del buf

    def close(self) -> None:
        self.inner.close()


def iter_whole_tensors(stores: Sequence[WorkingStore]) -> Iterator[tuple[str, torch.Tensor]]:
    """(tensor, value) of every unit of a sharded run, reassembled from its ranks' slice stores
    (all opened here, in rank order; offline, no process group): `lomo-run export` of such a run."""
    world = len(stores)
    shard = stores[0].meta["shard"]
    for name, rec in shard["units"].items():
        nbytes = int(rec["nbytes"])
        s = slice_bytes(nbytes, world)
        buf = aligned_empty(world * s)
        for rank, store in enumerate(stores):
            store.read_unit(name, buf[rank * s:(rank + 1) * s])
        yield from tensor_views(buf, tuple(TensorSlot.from_json(t) for t in rec["tensors"])).items()
        del buf

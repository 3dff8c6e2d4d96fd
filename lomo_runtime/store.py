"""The working store: a model's units on disk, in generations, behind an atomically committed manifest.

Layout of a store directory::

    work_dir/
      lock                    flock'ed for the store's lifetime; holds the owner's pid
      manifest.json           the committed state: step, meta, one record per unit
      units/<unit>.g<N>.bin   one file per unit per generation

Invariants:

- Every tensor slot starts at a 4 KiB-aligned offset in its unit file and every
  unit file's size is a multiple of 4096, so a whole unit is read with one
  O_DIRECT request and no over-read. Padding bytes are zero.
- ``manifest.json`` names exactly one generation per unit; all of them belong
  to the committed step. A commit writes ``manifest.json.tmp``, fsyncs it,
  renames it over ``manifest.json`` and fsyncs the directory: after a crash at
  any instant the store holds either the old or the new step, never a mix.
- A generation file is written (and fsynced) before any manifest names it, and
  the file it supersedes is deleted only after the commit. Files that the
  committed manifest does not name (an uncommitted or dropped step, a crash
  between rename and cleanup) are deleted when the store is opened.
- Every unit read checks the file size and the checksum of the whole file
  against the manifest and names the unit and file on a mismatch. The checksum
  is computed once per write (``_write``, on the writer thread) and checked
  after each read (``read_unit``, on the prefetch thread), so it is on the path
  of every unit moved. Since version 3 it is CRC-32C (Castagnoli,
  the ``crc32c`` package: SSE4.2/ARMv8 instructions): 8.9-13.9 GB/s here on
  a 256 MiB buffer against 2.2-2.5 GB/s for zlib's CRC-32 (best of 5 on 2
  shared cores; ``crc32c.crc32c`` vs ``zlib.crc32`` on a ``memoryview``). A
  verified 256 MiB O_DIRECT ``read_unit`` runs at ~1.13 GB/s against ~1.30 GB/s
  unverified (with zlib it was ~0.85 against ~1.25). Both release the GIL on
  big buffers (crc32c since 2.5, from 32 KiB up: its default
  ``gil_release_mode=-1``), so the prefetch thread's check overlaps compute.
- Unit files' bytes move through an I/O engine (``io``, an ``IOBackend``: the posix
  O_DIRECT path by default, DeepSpeed's async I/O with ``--io-engine aio``,
  ``lomo_runtime.aio``). An engine that can fail silently (``silent_failures``)
  has every read checksummed even when a caller asks for ``verify=False``.
- Each unit record names its checksum algorithm (``checksum_alg``: "crc32c" or
  "crc32", zlib's). Records of version 1 and 2 manifests, which predate the
  field, are zlib CRC-32. A store opened at an older version keeps its
  committed files as they are: their records keep "crc32" through later
  commits (until the unit is rewritten), so nothing is re-read or re-hashed at
  open or commit, and a damaged old file is still caught by the algorithm it
  was written with. New generations are always CRC-32C; the manifest's
  top-level ``unit_checksum`` names that algorithm.
- The manifest carries a zlib CRC-32 of its own content (canonical JSON),
  checked on open: a manifest that parses but was changed is refused like a
  damaged unit file. (It is a few KiB; its speed does not matter, so it stays
  zlib in every version.)
- Two-phase commits (several ranks, each with its own store, ``lomo_runtime.dist``):
  ``prepare`` writes the next state as ``manifest.next.json`` (atomically, like
  a commit) and deletes nothing; once every rank has prepared, one commit
  record outside the stores names the step, and ``finish_prepared`` renames the
  prepared manifest over ``manifest.json``. ``open(committed_step=S)`` settles a
  crash between the phases: a prepared manifest at step S is finished, any
  other is deleted (its files go as unreferenced), so every rank is back at S.
- One process owns a store at a time: ``flock(LOCK_EX | LOCK_NB)`` on
  ``work_dir/lock``. The kernel drops the lock when its holder dies, so a killed
  run never leaves a stale lock. (A child forked while the store is open shares
  the lock until it exits.)
- Constructors touch nothing but the store they name: ``create`` refuses a
  non-empty directory that is not a store, and ``open`` deletes only files
  inside ``units/`` that match the generation-file pattern.
"""
from __future__ import annotations

import copy
import errno
import fcntl
import json
import math
import os
import re
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import crc32c
import torch

from .checkpoint.safetensors_file import DTYPES
from .errors import StoreError
from .io import ALIGN, IOBackend, align_up, aligned_empty, fault_point, get_backend

FORMAT = "lomo-run working store"
VERSION = 3
"""Manifest version written. 2: the manifest carries a CRC-32 of its own content (1 has none).
3: unit files are checksummed with CRC-32C and every record names its algorithm (1 and 2: zlib CRC-32).
All three are read."""
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
PREPARED = "manifest.next.json"  # phase one of a two-phase commit (prepare / finish_prepared)
LOCK = "lock"
UNITS_DIR = "units"

# The manifest spells dtypes as safetensors does; one table, owned by the checkpoint format.
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
"""torch dtype -> safetensors dtype string, the spelling the manifest uses."""

_UNIT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_GENERATION_FILE = re.compile(r"^(?P<unit>[A-Za-z0-9_][A-Za-z0-9_.\-]*)\.g(?P<gen>[0-9]+)\.bin$")

TensorLoader = Callable[[], torch.Tensor]
UnitSource = tuple[str, Sequence[tuple[str, TensorLoader]]]
UnitProgress = Callable[[str, int, int], None]
"""``on_unit(unit name, units done, bytes done)``."""

CHECKSUMS: dict[str, Callable[[Any], int]] = {"crc32": zlib.crc32, "crc32c": crc32c.crc32c}
"""Unit-file checksum algorithms by the name a record carries: zlib's CRC-32 (versions 1-2), CRC-32C."""
UNIT_CHECKSUM = "crc32c"
"""The algorithm new generations are written with."""
LEGACY_UNIT_CHECKSUM = "crc32"
"""The algorithm of every unit record in a version 1 or 2 manifest."""


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in its unit file: ``offset`` is 4 KiB-aligned, ``nbytes`` exact."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset, "nbytes": self.nbytes}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "TensorSlot":
        return TensorSlot(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]), int(d["offset"]), int(d["nbytes"]))


@dataclass(frozen=True)
class UnitRecord:
    """One generation of one unit: its file (relative to the store), size, checksum and layout.

    ``checksum_alg`` names the algorithm of ``checksum`` (a key of ``CHECKSUMS``):
    "crc32c" for files this version writes, "crc32" for files of version 1-2 stores.
    """

    name: str
    generation: int
    file: str
    nbytes: int
    checksum: int
    tensors: tuple[TensorSlot, ...]
    checksum_alg: str = UNIT_CHECKSUM

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "generation": self.generation,
            "file": self.file,
            "nbytes": self.nbytes,
            "checksum": self.checksum,
            "checksum_alg": self.checksum_alg,
            "tensors": [slot.to_json() for slot in self.tensors],
        }

    @staticmethod
    def from_json(d: Mapping[str, Any], default_alg: str | None = None) -> "UnitRecord":
        """Parse a record; ``default_alg`` is the algorithm of records that do not name one
        (versions 1-2: "crc32"; ``None``, for version 3, makes the field required)."""
        alg = str(d["checksum_alg"]) if default_alg is None or "checksum_alg" in d else default_alg
        if alg not in CHECKSUMS:
            raise ValueError(f"unit {d['name']}: unknown checksum algorithm {alg!r}")
        return UnitRecord(
            str(d["name"]),
            int(d["generation"]),
            str(d["file"]),
            int(d["nbytes"]),
            int(d["checksum"]),
            tuple(TensorSlot.from_json(t) for t in d["tensors"]),
            alg,
        )


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors spelling of a torch dtype ("F32", "BF16", ...)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored") from None


def layout(entries: Sequence[tuple[str, str, Sequence[int]]]) -> tuple[tuple[TensorSlot, ...], int]:
    """Lay tensors ``(name, dtype string, shape)`` out back to back, each at a 4 KiB boundary.

    Returns the slots and the unit's file size (a multiple of 4096). Padding costs
    at most 4095 bytes per tensor: for a Llama block (9 tensors) under 36 KiB.
    """
    slots: list[TensorSlot] = []
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name}: unknown dtype {dtype!r}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        slots.append(TensorSlot(name, dtype, tuple(int(s) for s in shape), offset, nbytes))
        offset = align_up(offset + nbytes)
    return tuple(slots), offset


def _check_slots(slots: Sequence[TensorSlot], where: str) -> int:
    """Validate a layout (aligned, ordered, disjoint, sizes matching dtype x shape); return the file size."""
    end = 0
    seen: set[str] = set()
    for slot in slots:
        if slot.name in seen:
            raise ValueError(f"{where}: tensor {slot.name} appears twice")
        seen.add(slot.name)
        if slot.dtype not in DTYPES:
            raise ValueError(f"{where}: tensor {slot.name} has unknown dtype {slot.dtype!r}")
        if slot.nbytes != math.prod(slot.shape) * DTYPES[slot.dtype].itemsize:
            raise ValueError(f"{where}: tensor {slot.name} is {slot.nbytes} bytes, its dtype and shape say otherwise")
        if slot.offset % ALIGN or slot.offset < end:
            raise ValueError(f"{where}: tensor {slot.name} at offset {slot.offset} is unaligned or overlaps")
        end = slot.offset + slot.nbytes
    return align_up(end)


def tensor_views(buf: torch.Tensor, slots: Sequence[TensorSlot]) -> dict[str, torch.Tensor]:
    """Typed, shaped views of a unit buffer (no copies): name -> tensor."""
    views: dict[str, torch.Tensor] = {}
    for slot in slots:
        raw = buf[slot.offset : slot.offset + slot.nbytes]
        views[slot.name] = raw.view(DTYPES[slot.dtype]).reshape(slot.shape)
    return views


def pack_tensors(buf: torch.Tensor, slots: Sequence[TensorSlot], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into their slots of ``buf`` (dtype and shape must match exactly) and zero the padding."""
    views = tensor_views(buf, slots)
    for slot in slots:
        src = tensors[slot.name]
        if DTYPE_NAMES.get(src.dtype) != slot.dtype or tuple(src.shape) != slot.shape:
            raise ValueError(f"tensor {slot.name}: got {src.dtype} {tuple(src.shape)}, slot is {slot.dtype} {slot.shape}")
        views[slot.name].copy_(src)
    zero_padding(buf, slots, _check_slots(slots, "pack_tensors"))


def zero_padding(buf: torch.Tensor, slots: Sequence[TensorSlot], nbytes: int) -> None:
    """Zero the bytes of `buf[:nbytes]` no slot covers."""
    start = 0
    for slot in slots:
        if slot.offset > start:
            buf[start : slot.offset].zero_()
        start = slot.offset + slot.nbytes
    if nbytes > start:
        buf[start:nbytes].zero_()


def checksum(data: bytes | bytearray | memoryview, alg: str = UNIT_CHECKSUM) -> int:
    """The unit-file checksum ``alg`` (a key of ``CHECKSUMS``) of a bytes-like ``data``, as an unsigned 32-bit int."""
    return CHECKSUMS[alg](data)


def _buffer_checksum(buf: torch.Tensor, nbytes: int, alg: str) -> int:
    """Checksum of ``buf[:nbytes]`` without a copy (a memoryview of the tensor's storage)."""
    if nbytes == 0:
        return 0  # both algorithms give 0 for no data; a 0-byte view of an empty tensor is skipped
    return checksum(memoryview(buf.numpy())[:nbytes], alg)


def _generation_file(unit: str, generation: int) -> str:
    return f"{UNITS_DIR}/{unit}.g{generation}.bin"


# ---------------------------------------------------------------- lock and files


def _acquire_lock(work: Path) -> int:
    """flock ``work/lock`` exclusively without waiting; write our pid into it; return the fd."""
    path = work / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(f"store {work} is in use by pid {holder}") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fault_point("fsync", path)
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> bool:
    try:
        fault_point("unlink", path)
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _unlink_unreferenced(path: Path) -> bool:
    """Delete a file no committed manifest names. Best effort: one that cannot be deleted now
    (EIO, a read-only remount) is harmless and goes at the next ``open``, so it never fails a step."""
    try:
        return _unlink(path)
    except OSError:
        return False


def _manifest_checksum(data: dict[str, Any]) -> str:
    """CRC-32 of the manifest's content in canonical JSON (sorted keys, no spaces): a flipped
    digit in the step, the meta or a unit's checksum is caught like a damaged unit file."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return f"{zlib.crc32(canonical):08x}"


def _read_manifest(work: Path, name: str = MANIFEST) -> dict[str, Any]:
    path = work / name
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"version {version!r}; this lomo-run reads versions {', '.join(map(str, READABLE_VERSIONS))}")
        if version >= 2:
            stored = data.pop("checksum", None)
            actual = _manifest_checksum(data)
            if stored != actual:
                raise ValueError(f"its checksum is {stored!r}, its content's is {actual!r}")
        if version >= 3 and data.get("unit_checksum") not in CHECKSUMS:
            raise ValueError(f"unit_checksum is {data.get('unit_checksum')!r}, not one of {sorted(CHECKSUMS)}")
        default_alg = None if version >= 3 else LEGACY_UNIT_CHECKSUM
        units = [UnitRecord.from_json(u, default_alg) for u in data["units"]]
        step = int(data["step"])
        meta = data.get("meta", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path} is damaged or not a lomo-run manifest: {e}") from e
    for rec in units:
        if rec.file != _generation_file(rec.name, rec.generation):
            raise StoreError(f"{path} is damaged: unit {rec.name} names file {rec.file!r}")
        try:
            nbytes = _check_slots(rec.tensors, f"unit {rec.name}")
        except ValueError as e:
            raise StoreError(f"{path} is damaged: {e}") from e
        if nbytes != rec.nbytes:
            raise StoreError(f"{path} is damaged: unit {rec.name} is {rec.nbytes} bytes, its layout needs {nbytes}")
    return {"step": step, "meta": meta, "units": units}


def _directory_state(work: Path) -> str:
    """"empty" (nothing, or only leftovers of a create that never committed), "store", or "foreign"."""
    names = set(os.listdir(work))
    if MANIFEST in names:
        try:
            _read_manifest(work)
            return "store"
        except StoreError:
            return "foreign"
    if not names <= {LOCK, UNITS_DIR, MANIFEST + ".tmp"}:
        return "foreign"
    units = work / UNITS_DIR
    if units.exists() and (not units.is_dir() or any(not _GENERATION_FILE.match(n) for n in os.listdir(units))):
        return "foreign"
    return "empty"


# ---------------------------------------------------------------- the store


class WorkingStore:
    """A model's units on disk with generations, checksums and atomic commits.

    Build one with ``WorkingStore.create`` or ``WorkingStore.open``; the
    constructor itself only records its arguments. ``write_unit`` and
    ``read_unit`` may run on background threads; ``commit`` and
    ``discard_uncommitted`` must not race with a ``write_unit`` of the same unit.
    """

    def __init__(self, work_dir: Path, lock_fd: int, direct: bool, io: IOBackend | None = None) -> None:
        self.dir = work_dir
        self.direct = direct
        # The engine that moves unit files' bytes (``lomo_runtime.aio.open_engine``): posix by default.
        self.io: IOBackend = io if io is not None else get_backend("posix")
        self._lock_fd: int | None = lock_fd
        self._state = threading.Lock()
        self._step = -1
        self._meta: dict[str, Any] = {}
        self._units: dict[str, UnitRecord] = {}
        # Written but not committed: unit -> generation -> record.
        self._pending: dict[str, dict[int, UnitRecord]] = {}
        # A prepared commit (two-phase): (step, units, meta, records) until finish_prepared.
        self._prepared: tuple | None = None

    # -- constructors --------------------------------------------------------

    @classmethod
    def create(
        cls,
        work_dir: str | os.PathLike,
        units: Sequence[UnitSource],
        meta: Mapping[str, Any],
        *,
        overwrite: bool = False,
        direct: bool = True,
        on_unit: UnitProgress | None = None,
        io: IOBackend | None = None,
    ) -> "WorkingStore":
        """Write a new store in ``work_dir`` from ``(unit name, [(tensor name, loader), ...])`` and commit it as step 0.

        Each loader is called once and returns the tensor to store (dtype as
        stored: convert in the loader). One unit is loaded and packed at a time,
        so peak memory is about twice the largest unit. ``meta`` (JSON-able: the
        model config, the source directory, ...) goes into the manifest.

        Every unit starts at generation 0, so ``step + 1`` is always a valid next
        generation for a store that commits every unit it writes.

        ``work_dir`` may be missing or empty (leftovers of a create that never
        committed count as empty and are deleted). A directory holding a store
        is replaced only with ``overwrite=True``: its manifest is deleted first,
        then its files, so a crash midway leaves an empty store directory, never
        a mix. Any other non-empty directory is refused with ``StoreError``.

        ``on_unit(name, units done, bytes done)`` is called after each unit file
        is written and fsynced (bytes: unit file sizes, padding included), so a
        caller can show progress: copying a 3.25 GiB model takes tens of seconds
        before the first step. No total is given: sizes are known only once a
        loader has run; a caller that knows the model (checkpoint headers x the
        stored dtype) gives its own total to the display. An exception from
        ``on_unit`` aborts the create like any other.

        From a ``lomo_runtime.checkpoint.Checkpoint`` (converting dtype in the loader
        if the run trains in another one)::

            WorkingStore.create(work_dir,
                [(u.name, [(t, functools.partial(ckpt.read_tensor, t)) for t in u.tensor_names])
                 for u in ckpt.units],
                {"config": ckpt.config, "source": str(ckpt.dir)})
        """
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        state = _directory_state(work)
        if state == "foreign":
            raise StoreError(f"{work} is not empty and is not a lomo-run store; choose an empty or new directory")
        if state == "store" and not overwrite:
            raise StoreError(f"{work} already holds a store; open it to resume, or create with overwrite=True to replace it")
        names = [name for name, _ in units]
        for name in names:
            if not _UNIT_NAME.match(name):
                raise ValueError(f"unit name {name!r} is not a plain file name")
        if len(set(names)) != len(names):
            raise ValueError("unit names must be unique")
        json.dumps(dict(meta))  # fail before writing anything if meta is not JSON-able

        store = cls(work, _acquire_lock(work), direct, io)
        try:
            if state == "store":
                _unlink(work / MANIFEST)  # from here on the old store is gone, by request
                _fsync_dir(work)
            store._delete_unreferenced()  # nothing is referenced yet: clears old and half-written files
            (work / UNITS_DIR).mkdir(exist_ok=True)
            generation = 0
            records: dict[str, UnitRecord] = {}
            done_bytes = 0
            for name, sources in units:
                loaded = {tensor_name: load() for tensor_name, load in sources}
                slots, nbytes = layout([(t, dtype_name(v.dtype), tuple(v.shape)) for t, v in loaded.items()])
                buf = aligned_empty(nbytes)
                pack_tensors(buf, slots, loaded)
                del loaded
                records[name] = store._write(name, buf, generation, slots)
                del buf
                if on_unit is not None:
                    done_bytes += records[name].nbytes
                    on_unit(name, len(records), done_bytes)
            store._publish(0, records, dict(meta))
            store._pending.clear()
            store._delete_unreferenced()
        except BaseException:
            store.discard_uncommitted()
            store.close()
            raise
        return store

    @classmethod
    def open(cls, work_dir: str | os.PathLike, *, direct: bool = True, committed_step: int | None = None,
             io: IOBackend | None = None) -> "WorkingStore":
        """Open an existing store: take its lock, load the manifest, check every unit file's
        size, and delete generation files the manifest does not name (an uncommitted step).

        ``committed_step``: the step a two-phase commit record names (several ranks). A prepared
        manifest at that step is finished first; one at another step is deleted. Without it a
        prepared manifest is always deleted (its step never became durable)."""
        work = Path(work_dir)
        if not (work / MANIFEST).is_file():
            raise StoreError(f"{work} is not a lomo-run store (no {MANIFEST})")
        store = cls(work, _acquire_lock(work), direct, io)
        try:
            if (work / PREPARED).is_file():
                prepared = _read_manifest(work, PREPARED)
                if committed_step is not None and prepared["step"] == committed_step:
                    os.replace(work / PREPARED, work / MANIFEST)
                    _fsync_dir(work)
                else:
                    _unlink(work / PREPARED)
            manifest = _read_manifest(work)
            if committed_step is not None and manifest["step"] != committed_step:
                raise StoreError(f"{work / MANIFEST} is at step {manifest['step']}, but the run's commit record "
                                 f"names step {committed_step}: this store belongs to another run or was changed")
            store._step = manifest["step"]
            store._meta = manifest["meta"]
            store._units = {rec.name: rec for rec in manifest["units"]}
            for rec in store._units.values():
                store._check_file(rec)
            store._delete_unreferenced()
        except BaseException:
            store.close()
            raise
        return store

    # -- state ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once ``close`` has released the lock (the store can no longer be read or committed)."""
        return self._lock_fd is None

    @property
    def step(self) -> int:
        """The committed step (0 right after ``create``)."""
        return self._step

    @property
    def meta(self) -> dict[str, Any]:
        """The committed ``meta`` (a copy)."""
        return copy.deepcopy(self._meta)

    @property
    def units(self) -> dict[str, UnitRecord]:
        """The committed record of each unit, in creation order (a copy)."""
        with self._state:
            return dict(self._units)

    @property
    def max_unit_nbytes(self) -> int:
        """The largest committed unit file: the staging buffer one unit read needs."""
        return max((rec.nbytes for rec in self.units.values()), default=0)

    def tensor_slots(self, name: str) -> tuple[TensorSlot, ...]:
        """The committed layout of unit ``name``."""
        return self._record(name).tensors

    # -- reads ---------------------------------------------------------------

    def read_unit(self, name: str, buf: torch.Tensor, record: UnitRecord | None = None, *, verify: bool = True) -> UnitRecord:
        """Read unit ``name`` (its committed generation, or ``record``) into ``buf[:nbytes]``.

        ``buf`` should come from ``aligned_empty``/``StagingPool`` so the read is
        direct. Checks the file size and (``verify``, and always with an engine that
        can fail silently: DeepSpeed aio) the checksum, by the algorithm the record
        names; a mismatch raises ``StoreError`` naming the unit and the file.
        Returns the record read.
        """
        rec = record if record is not None else self._record(name)
        path = self._check_file(rec)
        try:
            self.io.read_into(path, 0, buf, rec.nbytes, direct=self.direct)
        except StoreError as e:
            raise StoreError(f"unit {name}: {e}") from e
        if verify or getattr(self.io, "silent_failures", False):
            crc = _buffer_checksum(buf, rec.nbytes, rec.checksum_alg)
            if crc != rec.checksum:
                raise StoreError(
                    f"unit {name}: checksum mismatch in {path} ({rec.checksum_alg}: expected {rec.checksum:08x}, "
                    f"read {crc:08x}); the working store is damaged"
                )
        return rec

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(tensor name, tensor)`` of the committed generation, unit by unit (for export).

        Each unit is read into a fresh buffer and its tensors are views of it, so
        memory is one unit plus whatever the consumer keeps.
        """
        for name, rec in self.units.items():
            buf = aligned_empty(rec.nbytes)
            self.read_unit(name, buf, rec)
            yield from tensor_views(buf, rec.tensors).items()
            del buf

    # -- writes and commits --------------------------------------------------

    def write_unit(
        self, name: str, buf: torch.Tensor, generation: int, tensors: Sequence[TensorSlot] | None = None
    ) -> UnitRecord:
        """Write ``buf`` as generation ``generation`` of unit ``name`` (fsynced, not yet committed).

        ``generation`` must exceed the committed one. ``tensors`` gives a new
        layout (e.g. optimizer state beside the weights); default: the committed
        layout. The padding between slots in ``buf`` is zeroed. Safe to call from a
        background thread. Pass the returned record to ``commit``.
        """
        committed = self._record(name)
        if generation <= committed.generation:
            raise ValueError(f"unit {name}: generation {generation} is not newer than the committed {committed.generation}")
        slots = committed.tensors if tensors is None else tuple(tensors)
        return self._write(name, buf, generation, slots)

    def _write(self, name: str, buf: torch.Tensor, generation: int, slots: tuple[TensorSlot, ...]) -> UnitRecord:
        nbytes = _check_slots(slots, f"unit {name}")
        if buf.numel() < nbytes:
            raise ValueError(f"unit {name}: buffer holds {buf.numel()} bytes, the layout needs {nbytes}")
        zero_padding(buf, slots, nbytes)
        crc = _buffer_checksum(buf, nbytes, UNIT_CHECKSUM)
        rec = UnitRecord(name, generation, _generation_file(name, generation), nbytes, crc, slots, UNIT_CHECKSUM)
        with self._state:
            self._check_open()
            # Registered before the file exists, so discard_uncommitted also removes a half-written one.
            self._pending.setdefault(name, {})[generation] = rec
        self.io.write_file(self.dir / rec.file, buf, nbytes, direct=self.direct)
        return rec

    def commit(self, step: int, records: Mapping[str, UnitRecord], meta: Mapping[str, Any] | None = None) -> None:
        """Make ``step`` durable in one atomic act: units in ``records`` move to their new
        generation, the others keep theirs; ``meta`` replaces the stored meta when given.

        Afterwards the superseded files (and other uncommitted generations of the
        committed units) are deleted.
        """
        with self._state:
            self._check_open()
            new_units, new_meta = self._next_state(records, meta)
            old_units = self._units
            self._publish(step, new_units, new_meta)
            self._forget_superseded(old_units, records)

    def _publish(self, step: int, units: Mapping[str, UnitRecord], meta: dict[str, Any]) -> None:
        """Write ``manifest.json`` atomically and adopt it as the committed state."""
        try:
            self._write_manifest(MANIFEST, step, units, meta)
        except StoreError as e:
            # After the rename the new manifest is what the directory shows, only not surely
            # durable: adopt it, so that no clean-up of "uncommitted" files deletes what it names.
            if getattr(e, "renamed", False):
                self._adopt(step, units, meta)
            raise
        self._adopt(step, units, meta)

    def prepare(self, step: int, records: Mapping[str, UnitRecord], meta: Mapping[str, Any] | None = None) -> None:
        """Phase one of a two-phase commit: write ``step``'s manifest as ``manifest.next.json``
        (durable, atomic) without adopting it; the committed state and its files stay as they are
        until ``finish_prepared``. After a crash ``open(committed_step=...)`` decides."""
        with self._state:
            self._check_open()
            new_units, new_meta = self._next_state(records, meta)
            self._write_manifest(PREPARED, step, new_units, new_meta)
            self._prepared = (int(step), new_units, new_meta, dict(records))

    def finish_prepared(self) -> None:
        """Phase two, once the run's commit record names the prepared step: adopt it."""
        with self._state:
            self._check_open()
            if self._prepared is None:
                raise RuntimeError(f"store {self.dir}: finish_prepared() without prepare()")
            (step, new_units, new_meta, records), self._prepared = self._prepared, None
            target = self.dir / MANIFEST
            try:
                fault_point("rename", target)
                os.replace(self.dir / PREPARED, target)
                _fsync_dir(self.dir)
            except OSError as e:
                raise StoreError(f"commit of step {step} failed at {target}: {e.strerror or e}") from e
            old_units = self._units
            self._adopt(step, new_units, new_meta)
            self._forget_superseded(old_units, records)

    def _next_state(self, records: Mapping[str, UnitRecord], meta: Mapping[str, Any] | None):
        """The unit records and meta a commit of ``records`` makes (checked against what was written)."""
        new_units = dict(self._units)
        for name, rec in records.items():
            if name not in new_units or rec.name != name:
                raise ValueError(f"commit: record for {name!r} does not match a unit of this store")
            if rec != new_units[name] and self._pending.get(name, {}).get(rec.generation) != rec:
                raise ValueError(f"commit: unit {name} generation {rec.generation} was not written by write_unit")
            new_units[name] = rec
        return new_units, (self._meta if meta is None else dict(meta))

    def _forget_superseded(self, old_units: Mapping[str, UnitRecord], records: Mapping[str, UnitRecord]) -> None:
        """After a commit: delete the files it superseded and other uncommitted generations of its units."""
        for name, rec in records.items():
            if old_units[name].file != rec.file:
                _unlink_unreferenced(self.dir / old_units[name].file)
            for other in self._pending.pop(name, {}).values():
                if other.file != rec.file:
                    _unlink_unreferenced(self.dir / other.file)

    def _write_manifest(self, name: str, step: int, units: Mapping[str, UnitRecord], meta: dict[str, Any]) -> None:
        """Write a manifest as ``name`` atomically (tmp, fsync, rename, fsync dir). A failure raises
        StoreError; its ``renamed`` is True when only the final directory fsync failed."""
        data = {
            "format": FORMAT,
            "version": VERSION,
            "unit_checksum": UNIT_CHECKSUM,
            "step": int(step),
            "meta": meta,
            "units": [rec.to_json() for rec in units.values()],
        }
        data["checksum"] = _manifest_checksum(data)
        text = json.dumps(data, indent=1).encode()
        tmp = self.dir / (name + ".tmp")
        target = self.dir / UNITS_DIR  # what the failing call was working on, for the message
        renamed = False
        try:
            # The new unit files' directory entries must be durable before a manifest names them.
            _fsync_dir(target)
            target = tmp
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                fault_point("write", tmp)
                done = 0
                while done < len(text):
                    done += os.write(fd, text[done:])
                fault_point("fsync", tmp)
                os.fsync(fd)
            finally:
                os.close(fd)
            target = self.dir / name
            fault_point("rename", target)
            os.replace(tmp, target)
            renamed = True
            target = self.dir
            _fsync_dir(target)
        except OSError as e:
            # Before the rename the committed manifest is untouched; either way this process must stop.
            error = StoreError(f"commit of step {step} failed at {target}: {e.strerror or e}")
            error.renamed = renamed
            raise error from e

    def _adopt(self, step: int, units: Mapping[str, UnitRecord], meta: dict[str, Any]) -> None:
        """Take a published manifest as the committed state; its files are no longer pending."""
        for rec in units.values():
            gens = self._pending.get(rec.name)
            if gens is not None and gens.get(rec.generation) == rec:
                del gens[rec.generation]
        self._step = int(step)
        self._meta = meta
        self._units = dict(units)

    def discard_uncommitted(self) -> int:
        """Delete every generation written since the last commit (a dropped step); return how many."""
        with self._state:
            dropped = [rec for gens in self._pending.values() for rec in gens.values()]
            self._pending.clear()
        for rec in dropped:
            _unlink_unreferenced(self.dir / rec.file)
        return len(dropped)

    # -- housekeeping ----------------------------------------------------------

    def _record(self, name: str) -> UnitRecord:
        with self._state:
            self._check_open()
            try:
                return self._units[name]
            except KeyError:
                raise ValueError(f"store {self.dir} has no unit {name!r}") from None

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise StoreError(f"store {self.dir} is closed")

    def _check_file(self, rec: UnitRecord) -> Path:
        path = self.dir / rec.file
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise StoreError(f"unit {rec.name}: file {path} is missing from the working store") from None
        if size != rec.nbytes:
            raise StoreError(f"unit {rec.name}: file {path} holds {size} bytes, the manifest says {rec.nbytes}")
        return path

    def _generation_files(self) -> list[re.Match[str]]:
        units = self.dir / UNITS_DIR
        if not units.is_dir():
            return []
        return [m for m in map(_GENERATION_FILE.match, os.listdir(units)) if m]

    def _delete_unreferenced(self) -> int:
        """Delete generation files the committed manifest does not name, and a stale tmp manifest."""
        referenced = {Path(rec.file).name for rec in self._units.values()}
        deleted = 0
        for match in self._generation_files():
            if match.string not in referenced:
                deleted += _unlink_unreferenced(self.dir / UNITS_DIR / match.string)
        _unlink_unreferenced(self.dir / (MANIFEST + ".tmp"))
        _unlink_unreferenced(self.dir / (PREPARED + ".tmp"))
        return deleted

    def close(self) -> None:
        """Release the lock. Uncommitted generation files stay until the next ``open`` deletes them."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            try:
                os.ftruncate(fd, 0)
            except OSError as e:  # pragma: no cover - the lock still goes with the fd
                if e.errno != errno.EBADF:
                    raise
            finally:
                os.close(fd)  # closing the last fd of the open file drops the flock

    def __enter__(self) -> "WorkingStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._lock_fd is None else f"step {self._step}, {len(self._units)} units"
        return f"WorkingStore({str(self.dir)!r}, {state})"

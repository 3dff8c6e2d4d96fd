"""DeepSpeed async I/O (libaio) as an I/O engine for the working store: ``--io-engine aio``.

``AioIO`` has ``PosixIO``'s two calls (``read_into``, ``write_file``) and the
same contract: a read fills exactly the bytes asked for or raises
``StoreError``; a write is fsynced when it returns. ``open_engine("aio")``
builds or loads DeepSpeed's op (``AsyncIOBuilder().load()``) and registers the
engine as ``get_backend("aio")``; where the op cannot build it raises
``UserError`` with one line saying why (libaio's headers missing:
``apt-get install libaio-dev``).

Invariants:

- **No misaligned request is ever submitted.** DeepSpeed's aio reports success
  on a misaligned request and leaves the buffer wrong (reference/machine.md
  section 3): an unaligned file offset reads nothing, a byte count that is not
  a multiple of 512 drops its tail, with ``intra_op_parallelism`` N every
  thread's share (bytes / N) must be aligned too, and a locked buffer at an
  unaligned address reads zeros. Reading past EOF aborts the process
  (an ``assert`` in C++). So every request submitted has a 4 KiB-aligned file
  offset, a byte count that is a multiple of 4096 x N, a 4 KiB-aligned buffer
  address, and ends within the file; ``_submit`` checks all four and raises
  ``MisalignedRequest`` rather than submit. Callers route around it first: a
  request with an unaligned offset or buffer goes through ``lomo_runtime.io``
  (the posix path) whole; a byte count with a tail that is not a multiple of
  4096 x N takes aio for the aligned part and the posix path for the tail.
  ``io_stats()["aio_fallbacks"]`` counts the requests that took the posix
  path whole.
- **DeepSpeed checks nothing** (it ignores each libaio event's result), so
  the store verifies every unit read by its checksum whatever the engine
  (``silent_failures``), a write is preallocated with ``posix_fallocate`` so a
  full disk fails loudly before any block is submitted, and its size is
  checked after the fsync. What is left unreported is an I/O error on a
  single block of a write; the checksum catches it at the next read.
- Buffers DeepSpeed did not lock (the staging pool's mmap buffers on CPU) go
  through two 16 MiB page-locked bounce buffers per thread: chunk i is copied
  while chunk i+1 is in flight. (DeepSpeed's own bounce path allocates and
  locks a buffer the size of each request: 522 MiB/s against 1355 into a
  locked buffer, reference/machine.md.) A buffer from ``locked_empty``, or one
  pinned by CUDA (the staging pool's ``cudaHostRegister``), is read and
  written in place, one request per call. The bounce buffers are
  ``2 x bounce_bytes`` of locked host memory per thread that does I/O, freed
  with the thread.
- One ``aio_handle`` per thread (``wait()`` waits for every request of its
  handle, so two threads must not share one), created again after a fork.

Measured on this machine (``python tools/bench_io.py``: a 256 MiB file, cold
reads, fsynced writes, median of 3, ``benchmarks/bench_io.json``; 2 shared
cores, a virtio disk): posix 1525 MiB/s read, 1698 write; aio into locked
buffers 640-1050 read, 1200-1610 write over queue depths 4-128 and 1-2
threads; aio through the bounce buffers (the store's case on CPU) 550-920
read, 740-1260 write; ``dd`` with direct I/O 922 and 1043. So posix stays the
default here, and the probe records it (``io_engine``). The first build took
5.3 min here (7.5 min in reference/machine.md).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

import torch

from . import io as posix
from .errors import StoreError, UserError
from .io import ALIGN, IOBackend, PathOrFd, align_down, get_backend, register_backend

ENGINES = ("posix", "aio")
"""The values of ``--io-engine`` / ``io_engine``."""

BUILD_NOTICE = "building DeepSpeed async I/O (first use, several minutes)"
"""The line printed before the first ``AsyncIOBuilder().load()`` (7.5 min on 2 cores here)."""

LIBAIO_MISSING = ("--io-engine aio: DeepSpeed async I/O cannot build here: libaio's development files are "
                  "missing (Debian/Ubuntu: apt-get install libaio-dev; Fedora: dnf install libaio-devel)")

# DeepSpeed's defaults, and what reference/machine.md measured: 1 MiB blocks, 32 in flight.
DEFAULT_BLOCK_SIZE = 1 << 20
DEFAULT_QUEUE_DEPTH = 32
DEFAULT_INTRA_OP = 1
DEFAULT_BOUNCE_BYTES = 16 << 20


class MisalignedRequest(AssertionError):
    """A request that DeepSpeed would silently get wrong reached ``_submit`` (a bug: callers route it to posix)."""


# ---------------------------------------------------------------- the op: can it build, is it built, load it


def _quiet_accelerator() -> None:
    # Without a GPU, DeepSpeed warns on import that it fell back to the CPU accelerator.
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _builder() -> Any:
    _quiet_accelerator()
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except ImportError as e:
        raise UserError(f"--io-engine aio needs DeepSpeed, which does not import here ({e}); pip install deepspeed") from None
    return AsyncIOBuilder()


def unavailable_reason() -> str | None:
    """None when DeepSpeed's aio op can be built (or is built) here, else one line saying why not.
    Does not build anything (``is_compatible`` links a tiny test program against libaio: ~1 s)."""
    try:
        builder = _builder()
    except UserError as e:
        return str(e)
    if not builder.is_compatible(verbose=False):
        return LIBAIO_MISSING
    return None


def extension_dir(name: str) -> Path:
    """Where ``torch.utils.cpp_extension.load`` keeps the JIT build of ``name`` (without creating it)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        if torch.version.hip is not None:
            accel = f"rocm{torch.version.hip.replace('.', '')}"
        elif torch.version.cuda is not None:
            accel = f"cu{torch.version.cuda.replace('.', '')}"
        else:
            accel = "cpu"
        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{py}_{accel}")
    return Path(root) / name


def is_built() -> bool:
    """True when loading the op will not compile it: prebuilt into the DeepSpeed wheel, or JIT-built
    before (``async_io.so`` and the ``pin_memory.so`` it links against in the extensions cache)."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    if installed_ops.get("async_io", False):
        return True
    return all((extension_dir(n) / f"{n}.so").is_file() for n in ("async_io", "pin_memory"))


_MODULE: Any = None
_MODULE_LOCK = threading.Lock()


def load_op(progress: TextIO | None = None) -> Any:
    """DeepSpeed's aio extension module, built on first use (prints ``BUILD_NOTICE`` to
    ``progress``, default stderr, before a build). ``UserError`` with one line when it cannot build."""
    global _MODULE
    with _MODULE_LOCK:
        if _MODULE is not None:
            return _MODULE
        reason = unavailable_reason()
        if reason is not None:
            raise UserError(reason)
        if not is_built():
            stream = progress if progress is not None else sys.stderr
            print(BUILD_NOTICE, file=stream, flush=True)
        try:
            _MODULE = _builder().load(verbose=False)
        except Exception as e:  # a compiler or linker failure: one line, not ninja's log
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise UserError(f"--io-engine aio: building DeepSpeed async I/O failed: "
                            f"{lines[-1] if lines else type(e).__name__}") from None
        # DeepSpeed logs a warning about SSD write endurance on a process's first aio write. The
        # store writes the same bytes through either engine, so say nothing here that posix doesn't:
        # the flag it checks is the one it sets after warning once.
        try:
            import deepspeed.utils

            deepspeed.utils._deepspeed_nvme_write_warning_emitted = True
        except ImportError:  # a stand-in builder (tests) without DeepSpeed installed
            pass
        return _MODULE


def open_engine(name: str = "posix", progress: TextIO | None = None, **settings: int) -> IOBackend:
    """The I/O engine ``name`` ("posix" or "aio"); "aio" is loaded (built the first time) and
    registered as ``get_backend("aio")``. ``settings`` go to ``AioIO`` (queue depth, ...)."""
    if name not in ENGINES:
        raise UserError(f"--io-engine must be {' or '.join(ENGINES)}, got {name!r}")
    if name == "posix":
        return get_backend("posix")
    if not settings:
        try:
            return get_backend("aio")
        except UserError:
            pass
    engine = AioIO(load_op(progress), **settings)
    _reserve_locked(2 * engine.bounce_bytes)  # one thread's bounce buffers: refused here, not mid-step
    _release_locked(2 * engine.bounce_bytes)
    if not settings:
        register_backend("aio", engine)
    return engine


def probe_engines(directory: str, size: int = 256 * 2**20, runs: int = 3, pin: bool = False) -> dict[str, Any]:
    """For ``lomo-run probe``: which engine moves a unit faster here. Writes then reads (cold) a
    ``size``-byte file with each engine, alternating, ``runs`` times; compares the medians by the
    time a step spends on a unit (read twice, forward and backward, written once). Returns
    ``io_engine``, ``disk_read_bps.aio``/``disk_write_bps.aio`` and the posix medians beside them
    (None where aio was not measured: a probe's earlier figures do not outlive it), and
    ``io_engine_note``: how they were measured, or why aio was not. Never builds the
    op (that takes minutes): an unbuilt one is reported, not measured. ``pin``: staging buffers
    as the CUDA staging pool pins them (DeepSpeed then reads in place, with no bounce)."""
    import statistics
    import tempfile
    import time

    reason = unavailable_reason()
    if reason is None and not is_built():
        reason = "DeepSpeed async I/O is not built yet (run once with --io-engine aio to build it)"
    keys = [f"disk_{op}_bps.{name}" for name in ("posix", "aio") for op in ("read", "write")]
    if reason is not None:
        return {**dict.fromkeys(keys), "io_engine": "posix", "io_engine_note": reason}
    engines = {"posix": get_backend("posix"), "aio": open_engine("aio")}
    buf = posix.aligned_empty(size, pin=pin)
    buf.fill_(7)
    seconds: dict[str, dict[str, list[float]]] = {n: {"read": [], "write": []} for n in engines}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = os.path.join(tmp, "probe-engines.bin")
        for _ in range(runs):
            for name, engine in engines.items():
                start = time.perf_counter()
                engine.write_file(path, buf, size)
                seconds[name]["write"].append(time.perf_counter() - start)
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
                start = time.perf_counter()
                engine.read_into(path, 0, buf, size)
                seconds[name]["read"].append(time.perf_counter() - start)
    if pin:
        posix.unpin(buf)
    result: dict[str, Any] = {"io_engine_note": f"posix and aio measured: median of {runs}, {size >> 20} MiB, alternating"}
    step = {}
    for name in engines:
        read, write = (statistics.median(seconds[name][op]) for op in ("read", "write"))
        result[f"disk_read_bps.{name}"], result[f"disk_write_bps.{name}"] = size / read, size / write
        step[name] = 2 * read + write
    result["io_engine"] = min(step, key=step.get)
    return result


# ---------------------------------------------------------------- locked memory

_libc = ctypes.CDLL(None, use_errno=True)


_locked_bytes = 0  # locked by this module (bounce buffers, locked_empty) and not yet freed
_locked_guard = threading.Lock()


def _lock_allowance() -> int | None:
    """Bytes this process may lock (RLIMIT_MEMLOCK), or None: no limit, or CAP_IPC_LOCK (root here)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as status:
            caps = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
        if caps & (1 << 14):  # CAP_IPC_LOCK: the limit does not apply
            return None
    except (OSError, StopIteration, ValueError):
        pass
    return soft


def _reserve_locked(nbytes: int) -> None:
    """Account for ``nbytes`` about to be locked by DeepSpeed, which aborts the process (an
    ``assert`` on a null pointer) when ``mlock`` fails: refuse with a ``UserError`` instead where
    the locked-memory limit would be passed, and try the same lock on a scratch mapping first."""
    global _locked_bytes
    allowance = _lock_allowance()
    with _locked_guard:
        if allowance is not None and _locked_bytes + nbytes > allowance:
            raise UserError(f"--io-engine aio: locking {nbytes} more bytes of host memory would pass the "
                            f"locked-memory limit ({allowance} bytes, {_locked_bytes} in use); raise it "
                            "(ulimit -l) or use --io-engine posix")
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = ctypes.c_char.from_buffer(region)
        addr, size = ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(nbytes)
        try:
            if _libc.mlock(addr, size) != 0:
                err = ctypes.get_errno()
                raise UserError(f"--io-engine aio: cannot lock {nbytes} bytes of host memory ({os.strerror(err)}); "
                                "raise the locked-memory limit (ulimit -l) or use --io-engine posix")
            _libc.munlock(addr, size)
        finally:
            del view  # the mmap cannot close while a ctypes view of it exists
            region.close()
        _locked_bytes += nbytes


def _release_locked(nbytes: int) -> None:
    global _locked_bytes
    with _locked_guard:
        _locked_bytes -= nbytes


class _Lane:
    """One thread's aio handle and its two locked bounce buffers (allocated on first use)."""

    def __init__(self, op: Any, block_size: int, queue_depth: int, intra_op: int) -> None:
        self.pid = os.getpid()
        self.handle = op.aio_handle(block_size, queue_depth, False, False, intra_op)
        self.bounce: list[torch.Tensor] = []
        self.pending = 0

    def bounces(self, nbytes: int) -> list[torch.Tensor]:
        if not self.bounce:
            _reserve_locked(2 * nbytes)
            example = torch.empty(0, dtype=torch.uint8)
            self.bounce = [self.handle.new_cpu_locked_tensor(nbytes, example) for _ in range(2)]
            for buf in self.bounce:
                if buf.data_ptr() % ALIGN:
                    raise MisalignedRequest(f"DeepSpeed's locked buffer at {buf.data_ptr():#x} is not page-aligned")
        return self.bounce

    def __del__(self) -> None:
        # The thread is gone (or the engine dropped): unlock and free the bounce buffers.
        if self.pid == os.getpid() and self.pending == 0 and self.bounce:
            try:
                for buf in self.bounce:
                    self.handle.free_cpu_locked_tensor(buf)
                _release_locked(sum(buf.numel() for buf in self.bounce))
            except Exception:  # interpreter shutdown: the process's memory goes with it
                pass
        self.bounce = []


# ---------------------------------------------------------------- the engine


class AioIO:
    """The working store's reads and writes through DeepSpeed's ``aio_handle``: ``queue_depth``
    blocks of ``block_size`` bytes in flight per thread, ``intra_op`` threads per request."""

    silent_failures = True
    """DeepSpeed does not report a failed block: the store verifies every read's checksum."""

    def __init__(self, op: Any, *, block_size: int = DEFAULT_BLOCK_SIZE, queue_depth: int = DEFAULT_QUEUE_DEPTH,
                 intra_op: int = DEFAULT_INTRA_OP, bounce_bytes: int = DEFAULT_BOUNCE_BYTES) -> None:
        if block_size <= 0 or block_size % ALIGN:
            raise ValueError(f"block_size must be a positive multiple of {ALIGN}, got {block_size}")
        if queue_depth < 1 or intra_op < 1:
            raise ValueError(f"queue_depth and intra_op must be >= 1, got {queue_depth}, {intra_op}")
        self.grain = ALIGN * intra_op  # every request's byte count is a multiple: each thread's share is aligned
        if bounce_bytes < self.grain or bounce_bytes % self.grain:
            raise ValueError(f"bounce_bytes must be a positive multiple of {self.grain}, got {bounce_bytes}")
        self.op = op
        self.block_size, self.queue_depth, self.intra_op = block_size, queue_depth, intra_op
        self.bounce_bytes = bounce_bytes
        self._local = threading.local()
        self._direct_dirs: dict[str, bool] = {}

    def __repr__(self) -> str:
        return (f"AioIO(block_size={self.block_size}, queue_depth={self.queue_depth}, "
                f"intra_op={self.intra_op}, bounce_bytes={self.bounce_bytes})")

    def _lane(self) -> _Lane:
        lane = getattr(self._local, "lane", None)
        if lane is None or lane.pid != os.getpid():  # a forked child cannot use its parent's aio threads
            lane = self._local.lane = _Lane(self.op, self.block_size, self.queue_depth, self.intra_op)
        return lane

    def locked_empty(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 tensor of page-locked memory that DeepSpeed reads into in place (no bounce);
        free it with ``free_locked``."""
        _reserve_locked(max(nbytes, ALIGN))
        return self._lane().handle.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))

    def free_locked(self, buf: torch.Tensor) -> None:
        if self._lane().handle.free_cpu_locked_tensor(buf):
            _release_locked(max(buf.numel(), ALIGN))

    # -- the one place a request is submitted --------------------------------------------------

    def _submit(self, lane: _Lane, write: bool, buf: torch.Tensor, path: str, file_offset: int) -> None:
        """Submit one request, after checking everything DeepSpeed would get silently wrong."""
        nbytes = buf.numel()
        if file_offset % ALIGN or nbytes == 0 or nbytes % self.grain or buf.data_ptr() % ALIGN:
            raise MisalignedRequest(f"refusing a misaligned aio request: {nbytes} bytes at offset {file_offset} "
                                    f"of {path} into {buf.data_ptr():#x} (need multiples of {ALIGN}, "
                                    f"bytes of {self.grain})")
        if not write and file_offset + nbytes > os.stat(path).st_size:
            raise MisalignedRequest(f"refusing an aio read past the end of {path} (DeepSpeed would abort)")
        rc = (lane.handle.async_pwrite if write else lane.handle.async_pread)(buf, path, file_offset)
        if rc != 0:
            raise StoreError(f"{'write' if write else 'read'} of {path} at {file_offset}: DeepSpeed aio refused it ({rc})")
        lane.pending += 1

    def _wait(self, lane: _Lane) -> None:
        expected, lane.pending = lane.pending, 0
        done = lane.handle.wait()
        if done != expected:
            raise StoreError(f"DeepSpeed aio completed {done} requests, {expected} were submitted")

    def _transfer(self, write: bool, path: str, offset: int, buf: torch.Tensor, nbytes: int) -> None:
        """Move ``buf[:nbytes]`` to or from ``path`` at ``offset`` (all aligned: the callers' checks)."""
        lane = self._lane()
        target = buf[:nbytes]
        try:
            if lane.handle.is_pinned(target):  # locked by DeepSpeed or pinned by CUDA: in place
                self._submit(lane, write, target, path, offset)
                self._wait(lane)
                return
            bounce = lane.bounces(self.bounce_bytes)
            chunks = [(start, min(self.bounce_bytes, nbytes - start)) for start in range(0, nbytes, self.bounce_bytes)]
            if write:
                # Fill one bounce buffer while the other one's write is in flight.
                for i, (start, size) in enumerate(chunks):
                    stage = bounce[i % 2][:size]
                    stage.copy_(target[start:start + size])
                    if lane.pending:
                        self._wait(lane)
                    self._submit(lane, True, stage, path, offset + start)
                self._wait(lane)
            else:
                # Empty one bounce buffer while the next chunk is read into the other.
                start, size = chunks[0]
                self._submit(lane, False, bounce[0][:size], path, offset + start)
                for i, (start, size) in enumerate(chunks):
                    self._wait(lane)
                    if i + 1 < len(chunks):
                        nstart, nsize = chunks[i + 1]
                        self._submit(lane, False, bounce[(i + 1) % 2][:nsize], path, offset + nstart)
                    target[start:start + size].copy_(bounce[i % 2][:size])
        finally:
            if lane.pending:  # an error midway: nothing may stay in flight into a buffer we give back
                lane.pending = 0
                lane.handle.wait()

    # -- the IOBackend calls ---------------------------------------------------------------------

    def _aligned(self, path_or_fd: PathOrFd, offset: int, buf: torch.Tensor, nbytes: int, direct: bool) -> bool:
        return (direct and not isinstance(path_or_fd, int) and offset % ALIGN == 0
                and buf.data_ptr() % ALIGN == 0 and nbytes >= self.grain)

    def _direct_ok(self, path: str) -> bool:
        """Whether the file's filesystem takes O_DIRECT (DeepSpeed opens every file with it and fails
        the request where it is refused); asked once per directory."""
        folder = os.path.dirname(os.path.abspath(path))
        ok = self._direct_dirs.get(folder)
        if ok is None:
            try:
                os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
                ok = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    return True  # not a filesystem answer (missing file...): the request reports it
                ok = False
            self._direct_dirs[folder] = ok
        return ok

    def read_into(self, path_or_fd: PathOrFd, offset: int, buf: torch.Tensor, nbytes: int, direct: bool = True) -> int:
        """``lomo_runtime.io.read_into`` through aio: the aligned part by aio, an unaligned tail, or a
        request that cannot be aligned at all, by the posix path."""
        if offset < 0 or nbytes < 0:
            raise ValueError(f"offset and nbytes must be >= 0, got {offset}, {nbytes}")
        posix._byte_view(buf, nbytes, "read_into")
        if not self._aligned(path_or_fd, offset, buf, nbytes, direct):
            posix._STATS.add(aio_fallbacks=1)
            return posix.read_into(path_or_fd, offset, buf, nbytes, direct)
        path = os.fspath(path_or_fd)
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise StoreError(f"cannot open {path}: {e.strerror}") from e
        if offset + nbytes > size or not self._direct_ok(path):  # posix reports a short file (aio would abort)
            posix._STATS.add(aio_fallbacks=1)
            return posix.read_into(path, offset, buf, nbytes, direct)
        head = align_down(nbytes, self.grain)
        try:
            posix.fault_point("read", path)
        except OSError as e:
            raise StoreError(f"read of {path} at {offset} failed: {e.strerror}") from e
        self._transfer(False, path, offset, buf, head)
        posix._STATS.add(read_bytes=head, direct_read_bytes=head, aio_read_bytes=head, reads=1)
        if nbytes > head:
            posix.read_into(path, offset + head, buf[head:], nbytes - head, direct)
        return nbytes

    def write_file(self, path: PathOrFd, buf: torch.Tensor, nbytes: int, direct: bool = True) -> int:
        """``lomo_runtime.io.write_file`` through aio: created or truncated, preallocated, the aligned
        part written by aio and any tail buffered, fsynced, and its size checked."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        view = posix._byte_view(buf, nbytes, "write_file")
        if not self._aligned(path, 0, buf, nbytes, direct):
            posix._STATS.add(aio_fallbacks=1)
            return posix.write_file(path, buf, nbytes, direct)
        name = os.fspath(path)
        head = align_down(nbytes, self.grain)
        try:
            posix.fault_point("write", name)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise StoreError(f"write of {name} failed: {e.strerror}") from e
        try:
            os.posix_fallocate(fd, 0, nbytes)  # a full disk fails here, loudly, not block by block in aio
            if self._direct_ok(name):
                self._transfer(True, name, 0, buf, head)
            else:
                head = 0
                posix._STATS.add(aio_fallbacks=1)
            done = head
            while done < nbytes:
                done += os.pwrite(fd, view[done:nbytes], done)
            posix.fault_point("fsync", name)
            os.fsync(fd)
            written = os.fstat(fd).st_size
        except OSError as e:
            raise StoreError(f"write of {name} failed: {e.strerror}") from e
        finally:
            os.close(fd)
        if written != nbytes:
            raise StoreError(f"write of {name}: the file holds {written} bytes after the aio write, {nbytes} expected")
        posix._STATS.add(write_bytes=nbytes, direct_write_bytes=head, aio_write_bytes=head, writes=1)
        return nbytes

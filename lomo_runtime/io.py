"""Moving bytes between files and aligned host buffers: O_DIRECT with a buffered fallback.

Invariants:

- Every O_DIRECT request has a 4 KiB-aligned file offset, length and buffer
  address (``ALIGN = 4096``: the page size and the disk's physical block size
  here; its logical block size is 512). Anything that is not aligned goes
  through an ordinary buffered ``pread``/``pwrite`` instead, never a misaligned
  direct call: DeepSpeed's async I/O shows how such calls can fail silently.
- A read either fills exactly the bytes asked for or raises ``StoreError``
  naming the file. O_DIRECT reads of a file whose size is not a multiple of
  4096 come back short at EOF; that is expected and the tail is accepted when
  it covers the request.
- ``io_stats()`` counts the bytes the syscalls actually moved (a direct read of
  a request that is not a multiple of 4096 may read up to 4095 bytes more, into
  the buffer's padding), under a lock, so threads may read concurrently.
- Writes are durable when ``write_file`` returns (fsync). They are not atomic:
  the store gets atomicity from fresh file names plus a manifest rename.

Backends: ``PosixIO`` (this module's functions), and ``lomo_runtime.aio.AioIO``
(DeepSpeed's async I/O, ``--io-engine aio``), registered as ``get_backend("aio")``
once ``lomo_runtime.aio.open_engine`` has loaded it; it aligns every request the
same way and hands what it cannot align to this module.

Measured on this machine (reference/machine.md): O_DIRECT ``preadv`` into an
aligned torch buffer 1.25-1.34 GB/s, buffered cold reads 0.7-1.3 GB/s,
DeepSpeed aio 1.36-1.45 GB/s (after a 7.5 min JIT build).

Fault injection (tests only): ``FAULTS`` can make the Nth read, write, fsync,
rename or unlink of a matching file fail with an errno (ENOSPC, EIO, ...) or
stall, so tests can break the store at chosen points. It is armed in-process
with ``FAULTS.arm(spec)`` or, for a subprocess, with the environment variable
``LOMO_RUN_FAULTS`` (read once, at import). Disarmed, a fault point costs one
attribute test. See ``FaultInjector`` for the spec grammar.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, Union

import torch

from .errors import StoreError, UserError

ALIGN = 4096
"""Alignment of O_DIRECT offsets, lengths and buffer addresses, in bytes."""

# Linux moves at most 0x7ffff000 bytes (2 GiB - 4 KiB) per read/write call; stay
# well below and keep chunks 4 KiB-aligned so a direct transfer stays aligned.
_CHUNK = 1 << 30

PathOrFd = Union[str, os.PathLike, int]


def align_up(n: int, align: int = ALIGN) -> int:
    """Round ``n`` up to a multiple of ``align`` (default 4096)."""
    return -(-n // align) * align


def align_down(n: int, align: int = ALIGN) -> int:
    """Round ``n`` down to a multiple of ``align`` (default 4096)."""
    return (n // align) * align


def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A 1-D uint8 CPU tensor of ``align_up(nbytes)`` bytes whose ``data_ptr()`` is 4 KiB-aligned.

    Unpinned buffers are anonymous ``mmap`` regions: page-aligned, exactly
    ``align_up(nbytes)`` bytes of memory (no over-allocation), zero-filled,
    and unmapped when the last tensor viewing them is freed.

    ``pin=True`` asks for page-locked memory for fast host-to-device copies:
    the same exact-size mmap, registered with ``cudaHostRegister`` (not
    ``pin_memory=True``, whose caching host allocator rounds each request up
    to a power of two: a 129 MB pin costs 256 MB, pytorch#150517). It needs
    CUDA and raises ``UserError`` without it; ``unpin`` unregisters it before
    it is freed (the staging pool does, when it drops a buffer).
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    size = align_up(nbytes)
    if pin and not torch.cuda.is_available():
        raise UserError("pinned staging buffers need CUDA; this machine has none (use pin=False)")
    if size == 0:
        return torch.empty(0, dtype=torch.uint8)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # frombuffer keeps a reference to the mmap object, so the mapping lives as
    # long as any view of the tensor does.
    buf = torch.frombuffer(region, dtype=torch.uint8)
    if pin:
        rc = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 0))
        if rc != 0:
            raise UserError(f"cudaHostRegister of {size} bytes failed (CUDA error {rc}): "
                            "lower --host-memory-budget, or raise the locked-memory limit (ulimit -l)")
    return buf


def unpin(buf: torch.Tensor) -> None:
    """Undo ``aligned_empty(pin=True)``'s registration; call it once, before the buffer is freed."""
    if buf.numel():
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


# ---------------------------------------------------------------- statistics


@dataclass
class _Counters:
    lock: threading.Lock = field(default_factory=threading.Lock)
    read_bytes: int = 0
    write_bytes: int = 0
    direct_read_bytes: int = 0
    direct_write_bytes: int = 0
    reads: int = 0
    writes: int = 0
    direct_fallbacks: int = 0
    aio_read_bytes: int = 0
    aio_write_bytes: int = 0
    aio_fallbacks: int = 0

    def add(self, **deltas: int) -> None:
        with self.lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)


_STATS = _Counters()
_STAT_KEYS = (
    "read_bytes",
    "write_bytes",
    "direct_read_bytes",
    "direct_write_bytes",
    "reads",
    "writes",
    "direct_fallbacks",
    "aio_read_bytes",
    "aio_write_bytes",
    "aio_fallbacks",
)


def io_stats() -> dict[str, int]:
    """Totals since start (or the last ``reset_io_stats``): bytes read and written, how many
    of them went through O_DIRECT, call counts, and ``direct_fallbacks`` (direct was asked
    for but the filesystem, the alignment or the buffer forced the buffered path). With the
    aio engine (``lomo_runtime.aio``): the bytes it moved (counted in the totals and the direct
    bytes too) and ``aio_fallbacks``, the requests it handed to this module's path whole."""
    with _STATS.lock:
        return {key: getattr(_STATS, key) for key in _STAT_KEYS}


def reset_io_stats() -> None:
    """Zero the counters (tests and benchmarks; the runtime reports differences instead)."""
    with _STATS.lock:
        for key in _STAT_KEYS:
            setattr(_STATS, key, 0)


# ---------------------------------------------------------------- fault injection (tests only)

FAULTS_ENV = "LOMO_RUN_FAULTS"
"""Environment variable holding a fault spec, read once when this module is imported."""
FAULT_TRACE_ENV = "LOMO_RUN_FAULT_TRACE"
"""Environment variable naming a file to which every fault point appends a line (tests time kills by it)."""

FAULT_OPS = ("read", "write", "fsync", "rename", "unlink")


@dataclass
class FaultRule:
    """One armed fault: on matching calls number ``nth`` (1-based), and every later one when
    ``repeat``, raise ``OSError(error)`` or, when ``sleep`` is set, stall that long and go on."""

    op: str
    nth: int = 1
    repeat: bool = False
    error: int | None = errno.ENOSPC
    sleep: float | None = None
    match: str = ""
    seen: int = 0
    fired: int = 0

    def wants(self, op: str, name: str) -> bool:
        if op != self.op:
            return False
        if self.match.endswith("$"):
            return name.endswith(self.match[:-1])
        return self.match in name


class FaultInjector:
    """Test-only hook that breaks the I/O of this module and of the store's commit on request.

    Spec grammar (``arm`` and ``LOMO_RUN_FAULTS``): rules separated by commas, each
    ``OP:WHEN:ACTION[:MATCH]`` where

    - OP is one of ``read``, ``write`` (a unit file's data, or the manifest),
      ``fsync`` (a file or a directory), ``rename`` (the manifest), ``unlink``;
    - WHEN is ``N`` (the Nth matching call only), ``N+`` (the Nth and every later
      one: a disk that stays full) or ``*`` (every call);
    - ACTION is an errno name (``ENOSPC``, ``EIO``, ...) or ``sleep=SECONDS``;
    - MATCH, optional, is a substring the file's path must contain (``manifest``,
      ``block.1``, ``units``); a trailing ``$`` anchors it at the end (``/store$``).

    ``write:3:ENOSPC`` fails the third file write; ``rename:1+:EIO:manifest`` every
    commit; ``read:*:sleep=0.2`` slows every read. Counting is per rule, over the
    calls that match it. A fault raises ``OSError`` where the real call would, so
    it takes the same error path as a real failure.

    With ``LOMO_RUN_FAULT_TRACE=FILE`` every fault point appends ``B <seq> <pid> <op> <path>``
    when reached and ``A <seq>`` when it lets the real call go ahead (after any stall):
    a process killed during a stall leaves a ``B`` line without its ``A``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rules: list[FaultRule] = []
        self.trace_path: str | None = None
        self._trace_fd: int | None = None
        self._seq = 0
        self.active = False

    # -- arming ------------------------------------------------------------------

    def arm(self, spec: str) -> "FaultInjector":
        """Add the rules of ``spec`` (grammar above); ``ValueError`` on a malformed one."""
        rules = [self._parse(part.strip()) for part in spec.split(",") if part.strip()]
        with self._lock:
            self.rules.extend(rules)
            self._update()
        return self

    def trace_to(self, path: str | os.PathLike | None) -> None:
        """Append a line per fault point reached to ``path`` (None: stop tracing)."""
        with self._lock:
            if self._trace_fd is not None:
                os.close(self._trace_fd)
                self._trace_fd = None
            self.trace_path = None if path is None else os.fspath(path)
            if self.trace_path is not None:
                self._trace_fd = os.open(self.trace_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._update()

    def disarm(self) -> None:
        """Remove every rule and stop tracing."""
        with self._lock:
            self.rules.clear()
        self.trace_to(None)

    def load_env(self, environ: "os._Environ[str] | dict[str, str] | None" = None) -> "FaultInjector":
        """Replace the armed state with what ``LOMO_RUN_FAULTS``/``LOMO_RUN_FAULT_TRACE`` say
        (done at import; a test harness that forks workers calls it again in each child)."""
        env = os.environ if environ is None else environ
        self.disarm()
        if env.get(FAULTS_ENV):
            self.arm(env[FAULTS_ENV])
        if env.get(FAULT_TRACE_ENV):
            self.trace_to(env[FAULT_TRACE_ENV])
        return self

    @staticmethod
    def _parse(part: str) -> FaultRule:
        fields = part.split(":", 3)
        if len(fields) < 3:
            raise ValueError(f"fault {part!r}: expected OP:WHEN:ACTION[:MATCH]")
        op, when, action = fields[:3]
        match = fields[3] if len(fields) == 4 else ""
        if op not in FAULT_OPS:
            raise ValueError(f"fault {part!r}: op must be one of {', '.join(FAULT_OPS)}")
        if when == "*":
            nth, repeat = 1, True
        else:
            repeat = when.endswith("+")
            try:
                nth = int(when.rstrip("+"))
            except ValueError:
                raise ValueError(f"fault {part!r}: WHEN must be N, N+ or *") from None
            if nth < 1:
                raise ValueError(f"fault {part!r}: calls are counted from 1")
        if action.startswith("sleep="):
            return FaultRule(op, nth, repeat, error=None, sleep=float(action[len("sleep="):]), match=match)
        code = getattr(errno, action, None)
        if not isinstance(code, int):
            raise ValueError(f"fault {part!r}: {action!r} is neither an errno name nor sleep=SECONDS")
        return FaultRule(op, nth, repeat, error=code, match=match)

    def _update(self) -> None:
        self.active = bool(self.rules) or self._trace_fd is not None

    # -- the fault point -----------------------------------------------------------

    def hit(self, op: str, path: PathOrFd) -> None:
        """Called just before the real ``op`` on ``path``: trace it, then stall or raise if a rule says so."""
        name = _describe(path)
        fire: list[FaultRule] = []
        with self._lock:
            self._seq += 1
            seq = self._seq
            if self._trace_fd is not None:
                os.write(self._trace_fd, f"B {seq} {os.getpid()} {op} {name}\n".encode())
            for rule in self.rules:
                if rule.wants(op, name):
                    rule.seen += 1
                    if rule.seen == rule.nth or (rule.repeat and rule.seen > rule.nth):
                        rule.fired += 1
                        fire.append(rule)
        for rule in fire:
            if rule.sleep is not None:
                time.sleep(rule.sleep)
        for rule in fire:
            if rule.error is not None:
                raise OSError(rule.error, f"{os.strerror(rule.error)} (injected fault {op})", name)
        with self._lock:
            if self._trace_fd is not None:
                os.write(self._trace_fd, f"A {seq}\n".encode())


FAULTS = FaultInjector()
"""The process's fault injector: disarmed unless ``LOMO_RUN_FAULTS`` was set at import."""


def fault_point(op: str, path: PathOrFd) -> None:
    """A place where a real ``op`` on ``path`` is about to happen; raises ``OSError`` if a test armed a fault."""
    if FAULTS.active:
        FAULTS.hit(op, path)


# ---------------------------------------------------------------- file handles


def _describe(path_or_fd: PathOrFd) -> str:
    if isinstance(path_or_fd, int):
        try:
            return os.readlink(f"/proc/self/fd/{path_or_fd}")
        except OSError:
            return f"fd {path_or_fd}"
    return os.fspath(path_or_fd)


class _Handle:
    """One file opened for a single request: a direct fd when possible, a buffered fd on demand."""

    def __init__(self, path_or_fd: PathOrFd, flags: int, direct: bool, mode: int = 0o644) -> None:
        self.name = _describe(path_or_fd)
        self._owned: list[int] = []
        self._path = None if isinstance(path_or_fd, int) else os.fspath(path_or_fd)
        self._flags = flags
        self._mode = mode
        self._buffered: int | None = None
        self.direct_refused = False
        if isinstance(path_or_fd, int):
            self.fd = path_or_fd
            has_direct = bool(fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_DIRECT)
            self.direct = direct and has_direct
            if not has_direct:
                self._buffered = self.fd
            return
        self.direct = False
        if direct:
            try:
                self.fd = self._open(flags | os.O_DIRECT)
                self.direct = True
                return
            except StoreError as e:
                cause = e.__cause__
                if not isinstance(cause, OSError) or cause.errno != errno.EINVAL:
                    raise
                self.direct_refused = True  # EINVAL: this filesystem refuses O_DIRECT
        self.fd = self._open(flags)
        self._buffered = self.fd

    def _open(self, flags: int) -> int:
        try:
            fd = os.open(self._path, flags, self._mode)  # type: ignore[arg-type]
        except OSError as e:
            raise StoreError(f"cannot open {self.name}: {e.strerror}") from e
        self._owned.append(fd)
        return fd

    def buffered_fd(self) -> int:
        """A descriptor without O_DIRECT on the same file (for unaligned heads and tails)."""
        if self._buffered is None:
            if self._path is None:
                # A caller's O_DIRECT fd: reopen the same file without the flag.
                self._path = f"/proc/self/fd/{self.fd}"
            self._buffered = self._open(self._flags & ~(os.O_CREAT | os.O_TRUNC))
        return self._buffered

    def close(self) -> None:
        for fd in self._owned:
            os.close(fd)
        self._owned.clear()

    def __enter__(self) -> "_Handle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _byte_view(buf: torch.Tensor, need: int, what: str) -> memoryview:
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous() or buf.device.type != "cpu":
        raise ValueError(f"{what}: buffer must be a contiguous 1-D uint8 CPU tensor")
    if buf.numel() < need:
        raise ValueError(f"{what}: buffer holds {buf.numel()} bytes, {need} needed")
    return memoryview(buf.numpy())


# ---------------------------------------------------------------- reads


def _pread_loop(fd: int, view: memoryview, start: int, stop: int, file_offset: int, aligned: bool) -> int:
    """Read ``view[start:stop]`` from ``file_offset``; return bytes read. Stops at EOF, and, when
    ``aligned``, after a return that leaves the position unaligned (a direct read's EOF tail)."""
    done = 0
    while start + done < stop:
        end = min(stop, start + done + _CHUNK)
        n = os.preadv(fd, [view[start + done : end]], file_offset + done)
        if n == 0:
            break
        done += n
        if aligned and done % ALIGN:
            break
    return done


def read_into(path_or_fd: PathOrFd, offset: int, buf: torch.Tensor, nbytes: int, direct: bool = True) -> int:
    """Read bytes ``[offset, offset + nbytes)`` of a file into ``buf[:nbytes]``; return ``nbytes``.

    O_DIRECT is used when ``direct`` is true, the filesystem accepts it, ``offset``
    and ``buf.data_ptr()`` are 4 KiB-aligned: it reads the aligned superset
    ``align_up(nbytes)`` when ``buf`` has room (the extra bytes land in the
    buffer's padding; at EOF the read simply comes back short), otherwise the
    aligned part directly and the tail buffered. Everything else is read with a
    buffered ``preadv``. ``path_or_fd`` may be an open descriptor (with or
    without O_DIRECT), which is left open.

    Raises ``StoreError`` naming the file when it cannot be opened or holds
    fewer than ``offset + nbytes`` bytes.
    """
    if offset < 0 or nbytes < 0:
        raise ValueError(f"offset and nbytes must be >= 0, got {offset}, {nbytes}")
    view = _byte_view(buf, nbytes, "read_into")
    if nbytes == 0:
        return 0
    with _Handle(path_or_fd, os.O_RDONLY, direct) as handle:
        got = 0
        direct_bytes = 0
        fallback = direct and not handle.direct
        try:
            fault_point("read", handle.name)
        except OSError as e:
            raise StoreError(f"read of {handle.name} at {offset} failed: {e.strerror}") from e
        if handle.direct:
            if offset % ALIGN == 0 and buf.data_ptr() % ALIGN == 0:
                span = align_up(nbytes) if buf.numel() >= align_up(nbytes) else align_down(nbytes)
                try:
                    direct_bytes = _pread_loop(handle.fd, view, 0, span, offset, aligned=True)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise StoreError(f"read of {handle.name} at {offset} failed: {e.strerror}") from e
                    fallback = True
                got = min(direct_bytes, nbytes)
            else:
                fallback = True
        if got < nbytes:
            try:
                got += _pread_loop(handle.buffered_fd(), view, got, nbytes, offset + got, aligned=False)
            except OSError as e:
                raise StoreError(f"read of {handle.name} at {offset + got} failed: {e.strerror}") from e
        buffered_bytes = got - min(direct_bytes, nbytes)
        _STATS.add(
            read_bytes=direct_bytes + buffered_bytes,
            direct_read_bytes=direct_bytes,
            reads=1,
            direct_fallbacks=int(fallback),
        )
        if got != nbytes:
            raise StoreError(
                f"short read from {handle.name}: asked for {nbytes} bytes at offset {offset}, "
                f"got {got} (file truncated?)"
            )
    return nbytes


# ---------------------------------------------------------------- writes


def _pwrite_loop(fd: int, view: memoryview, start: int, stop: int, name: str) -> int:
    done = 0
    while start + done < stop:
        end = min(stop, start + done + _CHUNK)
        n = os.pwritev(fd, [view[start + done : end]], start + done)
        if n == 0:
            raise StoreError(f"write to {name} made no progress at offset {start + done}")
        done += n
        if done % ALIGN:
            break  # a short direct write; the caller finishes buffered
    return done


def write_file(path: PathOrFd, buf: torch.Tensor, nbytes: int, direct: bool = True) -> int:
    """Write ``buf[:nbytes]`` as the whole content of ``path`` (created or truncated), fsync; return ``nbytes``.

    With O_DIRECT (``direct``, filesystem support, aligned ``buf`` holding
    ``align_up(nbytes)`` bytes) the padded length is written, its padding
    ``buf[nbytes:align_up(nbytes)]`` first zeroed, and the file then truncated
    to ``nbytes``. Otherwise a buffered write. Not atomic: write to a fresh name
    and publish it by rename (the store does). Raises ``StoreError`` naming the file.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    view = _byte_view(buf, nbytes, "write_file")
    padded = align_up(nbytes)
    with _Handle(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, direct) as handle:
        direct_bytes = 0
        fallback = direct and not handle.direct
        try:
            fault_point("write", handle.name)
            if handle.direct:
                if buf.data_ptr() % ALIGN == 0 and buf.numel() >= padded:
                    if padded > nbytes:
                        buf[nbytes:padded].zero_()
                    try:
                        direct_bytes = _pwrite_loop(handle.fd, view, 0, padded, handle.name)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        fallback = True
                else:
                    fallback = True
            done = min(direct_bytes, nbytes)
            if done < nbytes:
                fd = handle.buffered_fd()
                while done < nbytes:
                    n = os.pwritev(fd, [view[done : min(nbytes, done + _CHUNK)]], done)
                    if n == 0:
                        raise StoreError(f"write to {handle.name} made no progress at offset {done}")
                    done += n
            if direct_bytes > nbytes:
                os.ftruncate(handle.fd, nbytes)
            fault_point("fsync", handle.name)
            os.fsync(handle.fd)
        except OSError as e:
            raise StoreError(f"write of {handle.name} failed: {e.strerror}") from e
        _STATS.add(
            write_bytes=direct_bytes + (nbytes - min(direct_bytes, nbytes)),
            direct_write_bytes=direct_bytes,
            writes=1,
            direct_fallbacks=int(fallback),
        )
    return nbytes


# ---------------------------------------------------------------- backends


class IOBackend(Protocol):
    """What the store and scheduler need from an I/O engine: these two calls, every request
    aligned as ``PosixIO`` aligns it. ``silent_failures`` (optional, default False): the engine
    may report success on a failed request, so its reads must always be checksummed."""

    def read_into(self, path_or_fd: PathOrFd, offset: int, buf: torch.Tensor, nbytes: int, direct: bool = True) -> int: ...

    def write_file(self, path: PathOrFd, buf: torch.Tensor, nbytes: int, direct: bool = True) -> int: ...


class PosixIO:
    """The default backend: ``os.preadv``/``os.pwritev`` with O_DIRECT where aligned."""

    silent_failures = False  # every syscall's result is checked

    def read_into(self, path_or_fd: PathOrFd, offset: int, buf: torch.Tensor, nbytes: int, direct: bool = True) -> int:
        return read_into(path_or_fd, offset, buf, nbytes, direct)

    def write_file(self, path: PathOrFd, buf: torch.Tensor, nbytes: int, direct: bool = True) -> int:
        return write_file(path, buf, nbytes, direct)


_BACKENDS: dict[str, IOBackend] = {"posix": PosixIO()}


def register_backend(name: str, backend: IOBackend) -> None:
    """Make ``backend`` available as ``get_backend(name)`` ("aio": ``lomo_runtime.aio.open_engine``)."""
    _BACKENDS[name] = backend


def get_backend(name: str = "posix") -> IOBackend:
    """The I/O backend registered under ``name``; ``UserError`` listing the known ones otherwise."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown I/O backend {name!r}; available: {', '.join(sorted(_BACKENDS))}") from None


FAULTS.load_env()  # test-only faults for a subprocess: LOMO_RUN_FAULTS, LOMO_RUN_FAULT_TRACE

"""Aligned I/O and the staging pool: direct reads agree with plain reads byte for byte,
byte accounting is exact, and both hold up under concurrent use."""
from __future__ import annotations

import errno
import os
import random
import threading

import pytest
import torch

from lomo_runtime import io as lio
from lomo_runtime.errors import DoesNotFit, StoreError, UserError
from lomo_runtime.io import ALIGN, align_up, aligned_empty, io_stats, read_into, reset_io_stats, write_file
from lomo_runtime.staging import StagingPool

# 3 MiB + 1234 bytes: a file whose size is not a multiple of 4096, so direct reads
# that reach EOF come back short.
FILE_SIZE = 3 * 1024 * 1024 + 1234


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    data = random.Random(0).randbytes(FILE_SIZE)
    path = tmp_path_factory.mktemp("io") / "data.bin"
    path.write_bytes(data)
    return str(path), data


def _buffered_reference(path: str, offset: int, nbytes: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        return f.read(nbytes)


def test_align_helpers() -> None:
    assert [align_up(n) for n in (0, 1, 4095, 4096, 4097)] == [0, 4096, 4096, 4096, 8192]
    assert lio.align_down(8191) == 4096


@pytest.mark.parametrize("nbytes", [0, 1, 100, 4095, 4096, 4097, 1 << 20, (1 << 20) + 3])
def test_aligned_empty_is_aligned_and_rounded(nbytes: int) -> None:
    buf = aligned_empty(nbytes)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    assert buf.numel() == align_up(nbytes)
    if buf.numel():
        assert buf.data_ptr() % ALIGN == 0
        buf.fill_(7)  # writable all the way
        assert int(buf[-1]) == 7


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_pinned_buffers_need_cuda() -> None:
    with pytest.raises(UserError, match="CUDA"):
        aligned_empty(4096, pin=True)
    with pytest.raises(UserError, match="CUDA"):
        StagingPool(None, pin=True)


def test_direct_reads_match_buffered_reads(data_file: tuple[str, bytes]) -> None:
    path, data = data_file
    rng = random.Random(1)
    cases: list[tuple[int, int]] = []
    for _ in range(150):
        aligned = rng.random() < 0.7
        offset = rng.randrange(0, FILE_SIZE // ALIGN) * ALIGN if aligned else rng.randrange(0, FILE_SIZE)
        kind = rng.random()
        if kind < 0.2:  # exactly to EOF
            nbytes = FILE_SIZE - offset
        elif kind < 0.4:  # whole pages
            nbytes = min(FILE_SIZE - offset, rng.randrange(1, 64) * ALIGN)
        else:  # anything
            nbytes = rng.randrange(0, min(FILE_SIZE - offset, 300_000) + 1)
        cases.append((offset, nbytes))
    cases += [(0, FILE_SIZE), (FILE_SIZE - 1234, 1234), (FILE_SIZE - 1, 1), (align_up(FILE_SIZE) - ALIGN, 1234)]

    reset_io_stats()
    for offset, nbytes in cases:
        expected = data[offset : offset + nbytes]
        assert _buffered_reference(path, offset, nbytes) == expected
        # A rounded buffer (direct superset read), an exact-size aligned view (direct
        # body + buffered tail), and the buffered path.
        for buf, direct in (
            (aligned_empty(nbytes), True),
            (aligned_empty(nbytes)[:nbytes], True),
            (torch.empty(nbytes + 1, dtype=torch.uint8)[1:], True),  # misaligned: falls back
            (aligned_empty(nbytes), False),
        ):
            assert read_into(path, offset, buf, nbytes, direct=direct) == nbytes
            assert bytes(buf[:nbytes].numpy()) == expected, (offset, nbytes, direct)
    stats = io_stats()
    assert stats["direct_read_bytes"] > 0  # the aligned cases really went direct
    assert stats["reads"] == 4 * len(cases) - sum(1 for _, n in cases if n == 0) * 4


def test_reads_from_open_descriptors(data_file: tuple[str, bytes]) -> None:
    path, data = data_file
    for flags in (os.O_RDONLY, os.O_RDONLY | os.O_DIRECT):
        fd = os.open(path, flags)
        try:
            for offset, nbytes in ((0, 5000), (8192, FILE_SIZE - 8192), (123, 4096)):
                buf = aligned_empty(nbytes)
                read_into(fd, offset, buf, nbytes)
                assert bytes(buf[:nbytes].numpy()) == data[offset : offset + nbytes]
        finally:
            os.close(fd)


def test_read_past_eof_names_the_file(data_file: tuple[str, bytes]) -> None:
    path, _ = data_file
    for offset, direct in ((FILE_SIZE - 1000, True), (align_up(FILE_SIZE) - ALIGN, True), (FILE_SIZE - 10, False)):
        buf = aligned_empty(8192)
        with pytest.raises(StoreError, match="short read from .*data.bin"):
            read_into(path, offset, buf, 8192, direct=direct)
    with pytest.raises(StoreError, match="cannot open .*missing.bin"):
        read_into(path + ".missing.bin", 0, aligned_empty(1), 1)


def test_buffer_too_small_is_refused(data_file: tuple[str, bytes]) -> None:
    with pytest.raises(ValueError, match="buffer holds"):
        read_into(data_file[0], 0, aligned_empty(4096), 4097)


def test_filesystem_refusing_o_direct_falls_back(data_file: tuple[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = data_file
    real_open = os.open

    def refusing_open(p: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    reset_io_stats()
    buf = aligned_empty(10_000)
    read_into(path, 4096, buf, 10_000)
    assert bytes(buf[:10_000].numpy()) == data[4096:14096]
    write_file(path + ".copy", buf, 10_000)
    stats = io_stats()
    assert stats["direct_fallbacks"] == 2 and stats["direct_read_bytes"] == 0 and stats["direct_write_bytes"] == 0
    assert stats["read_bytes"] == 10_000 and stats["write_bytes"] == 10_000


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 4097, (1 << 20) + 3])
@pytest.mark.parametrize("direct", [True, False])
def test_write_file_round_trip(tmp_path: "os.PathLike[str]", nbytes: int, direct: bool) -> None:
    payload = random.Random(nbytes).randbytes(nbytes)
    buf = aligned_empty(nbytes)
    buf[:nbytes] = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if nbytes else buf[:0]
    if buf.numel() > nbytes:
        buf[nbytes:] = 0xAB  # garbage padding must not reach the file
    path = os.path.join(tmp_path, "out.bin")
    reset_io_stats()
    assert write_file(path, buf, nbytes, direct=direct) == nbytes
    assert os.path.getsize(path) == nbytes
    with open(path, "rb") as f:
        assert f.read() == payload
    stats = io_stats()
    assert stats["writes"] == 1
    assert stats["direct_write_bytes"] == (align_up(nbytes) if direct else 0)
    # Rewriting a shorter content truncates the old one.
    write_file(path, buf, nbytes // 2, direct=direct)
    assert os.path.getsize(path) == nbytes // 2


def test_io_stats_are_exact_under_threads(data_file: tuple[str, bytes]) -> None:
    path, data = data_file
    reset_io_stats()
    nbytes = 64 * 1024  # whole pages: every byte counted goes direct, no over-read

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        buf = aligned_empty(nbytes)
        for _ in range(50):
            offset = rng.randrange(0, (FILE_SIZE - nbytes) // ALIGN) * ALIGN
            read_into(path, offset, buf, nbytes)
            assert bytes(buf.numpy()) == data[offset : offset + nbytes]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = io_stats()
    assert stats["reads"] == 200
    assert stats["read_bytes"] == stats["direct_read_bytes"] == 200 * nbytes


def test_backend_table() -> None:
    assert isinstance(lio.get_backend(), lio.PosixIO)
    with pytest.raises(UserError, match="posix"):
        lio.get_backend("deepspeed-aio")


# ---------------------------------------------------------------- staging pool


def test_staging_pool_accounting_is_exact() -> None:
    pool = StagingPool(capacity_bytes=None)
    a = pool.acquire(1)  # charged one page
    b = pool.acquire(10_000)  # 3 pages
    assert a.data_ptr() % ALIGN == 0 and b.data_ptr() % ALIGN == 0
    assert (a.numel(), b.numel()) == (4096, 12288)
    assert pool.bytes_in_use == pool.bytes_allocated == pool.peak_bytes == 16384
    pool.release(b)
    assert (pool.bytes_in_use, pool.bytes_allocated) == (4096, 16384)
    c = pool.acquire(12_000)  # same rounded size: the cached buffer comes back
    assert c.data_ptr() == b.data_ptr() and pool.allocations == 2
    pool.release(a)
    pool.release(c)
    assert pool.bytes_in_use == 0 and pool.bytes_allocated == 16384
    assert pool.trim() == 16384 and pool.bytes_allocated == 0
    assert pool.peak_bytes == 16384
    pool.reset_peak()
    assert pool.peak_bytes == 0
    assert pool.acquire(0).numel() == 0 and pool.bytes_in_use == 0


def test_staging_pool_steady_state_allocates_nothing() -> None:
    pool = StagingPool(capacity_bytes=1 << 20)
    sizes = [100_000, 50_000, 100_000, 7]
    for _ in range(10):
        bufs = [pool.acquire(n) for n in sizes]
        for buf in bufs:
            pool.release(buf)
    assert pool.allocations == len(sizes)
    assert pool.peak_bytes == sum(align_up(n) for n in sizes)


def test_staging_pool_capacity() -> None:
    pool = StagingPool(capacity_bytes=5 * ALIGN)
    a = pool.acquire(3 * ALIGN)
    with pytest.raises(DoesNotFit, match="staging pool"):
        pool.acquire(3 * ALIGN)
    pool.release(a)
    # The cached 3-page buffer is dropped to make room for a 4-page one.
    b = pool.acquire(4 * ALIGN)
    assert pool.bytes_allocated == 4 * ALIGN and pool.peak_bytes == 4 * ALIGN
    pool.release(b)


def test_staging_pool_rejects_foreign_and_double_release() -> None:
    pool = StagingPool(None)
    with pytest.raises(ValueError):
        pool.release(aligned_empty(4096))
    buf = pool.acquire(4096)
    pool.release(buf)
    with pytest.raises(ValueError):
        pool.release(buf)
    assert pool.bytes_in_use == 0 and pool.bytes_allocated == 4096


def test_staging_pool_is_thread_safe() -> None:
    capacity = 64 * ALIGN
    pool = StagingPool(capacity_bytes=capacity)
    sizes = [ALIGN, 2 * ALIGN, 3 * ALIGN + 5, 8 * ALIGN]
    errors: list[BaseException] = []

    def worker(tag: int) -> None:
        rng = random.Random(tag)
        try:
            for _ in range(400):
                buf = pool.acquire(rng.choice(sizes))
                buf.fill_(tag)  # a buffer handed to two threads at once would be overwritten
                assert pool.bytes_in_use <= capacity
                assert bool((buf == tag).all())
                pool.release(buf)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i + 1,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.bytes_in_use == 0
    assert pool.peak_bytes <= capacity
    # The pool's own totals match what its free lists really hold.
    assert pool.bytes_allocated == sum(b.numel() for bufs in pool._free.values() for b in bufs)

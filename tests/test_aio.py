"""The DeepSpeed async-I/O engine (`lomo_runtime.aio`, `--io-engine aio`).

Tests that move bytes through DeepSpeed need its op built. They skip, saying why,
where libaio's headers are missing or the op was never built: its first build
takes ~7.5 minutes on 2 cores, so the suite never starts one unless asked
(`LOMO_RUN_TEST_AIO=1`). The tests of the fallback (the op cannot build: exit 2
with one line; the build notice; the build failing) run everywhere.
"""
from __future__ import annotations

import io as stdio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lomo_runtime import aio
from lomo_runtime.errors import StoreError, UserError
from lomo_runtime.io import ALIGN, FAULTS, align_up, aligned_empty, io_stats, reset_io_stats
from lomo_runtime.rules import SGD
from lomo_runtime.runtime import Runtime
from lomo_runtime.store import WorkingStore

from helpers import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
OPT_IN = "LOMO_RUN_TEST_AIO"


@pytest.fixture(scope="module")
def engine() -> aio.AioIO:
    """The registered aio engine (queue depth 32, one thread), or a skip saying why there is none."""
    reason = aio.unavailable_reason()
    if reason is not None:
        pytest.skip(f"DeepSpeed async I/O unavailable here: {reason}")
    if not aio.is_built() and os.environ.get(OPT_IN) != "1":
        pytest.skip(f"DeepSpeed async I/O is not built yet (its first build takes ~7.5 min); "
                    f"set {OPT_IN}=1 to build it and run these tests")
    return aio.open_engine("aio")


@pytest.fixture(scope="module")
def engine2(engine: aio.AioIO) -> aio.AioIO:
    """Two threads per request (each thread's share must be aligned too) and small bounce buffers,
    so a unit of a few hundred KiB goes through several bounce chunks."""
    return aio.open_engine("aio", intra_op=2, bounce_bytes=64 * 1024)


class SubmitSpy:
    """Wraps `AioIO._submit`, recording every request that reaches DeepSpeed."""

    def __init__(self, engine: aio.AioIO, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requests: list[tuple[bool, int, int, int]] = []  # (write, file offset, bytes, buffer address)
        real = engine._submit

        def spy(lane, write, buf, path, file_offset):
            self.requests.append((write, file_offset, buf.numel(), buf.data_ptr()))
            return real(lane, write, buf, path, file_offset)

        monkeypatch.setattr(engine, "_submit", spy)
        self.grain = engine.grain

    def all_aligned(self) -> bool:
        return all(off % ALIGN == 0 and n % self.grain == 0 and n > 0 and ptr % ALIGN == 0
                   for _, off, n, ptr in self.requests)


def _data_file(path: Path, nbytes: int, seed: int = 0) -> bytes:
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    raw = data.numpy().tobytes()
    path.write_bytes(raw)
    return raw


def _units(seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    sizes = {"embed": [(300, 17)], "block.0": [(64, 64), (64,), (3,)], "big": [(5 * 2**20 + 3,)]}
    return [(name, [(f"{name}.t{i}", (lambda s=shape: torch.randn(s, generator=g)))
                    for i, shape in enumerate(shapes)]) for name, shapes in sizes.items()]


# ---------------------------------------------------------------- the store through aio


def test_store_round_trip_through_aio(engine: aio.AioIO, engine2: aio.AioIO, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights written and read back through aio equal the originals, equal what the posix engine
    reads, every request submitted was aligned, and a corrupted byte is caught by the checksum."""
    spy = SubmitSpy(engine, monkeypatch)
    reset_io_stats()
    originals: dict[str, torch.Tensor] = {}

    def remember(units):
        for _, sources in units:
            for i, (name, load) in enumerate(sources):
                sources[i] = (name, (lambda n=name, f=load: originals.setdefault(n, f())))
        return units

    store = WorkingStore.create(tmp_path / "store", remember(_units()), {"m": 1}, io=engine)
    assert store.io is engine
    read_back = dict(store.iter_tensors())
    store.close()
    assert read_back.keys() == originals.keys()
    for name, tensor in originals.items():
        assert torch.equal(read_back[name], tensor), name
    stats = io_stats()
    total = sum(rec.nbytes for rec in WorkingStore.open(tmp_path / "store").units.values())
    assert stats["aio_write_bytes"] == total and stats["aio_read_bytes"] == total
    assert stats["aio_fallbacks"] == 0
    assert spy.requests and spy.all_aligned()
    assert {n for _, _, n, _ in spy.requests} >= {engine.bounce_bytes}  # the 20 MiB unit went through 16 MiB chunks

    with WorkingStore.open(tmp_path / "store") as posix_store:  # the default engine reads aio's files
        assert all(torch.equal(t, originals[n]) for n, t in posix_store.iter_tensors())
    with WorkingStore.open(tmp_path / "store", io=engine2) as two:  # and two threads per request
        assert all(torch.equal(t, originals[n]) for n, t in two.iter_tensors())

    unit = tmp_path / "store" / "units" / "block.0.g0.bin"
    raw = bytearray(unit.read_bytes())
    raw[5000] ^= 0x01
    unit.write_bytes(bytes(raw))
    with WorkingStore.open(tmp_path / "store", io=engine) as store:
        buf = aligned_empty(store.units["block.0"].nbytes)
        with pytest.raises(StoreError, match="block.0: checksum mismatch"):
            store.read_unit("block.0", buf, verify=False)  # aio can fail silently: always verified


def test_locked_buffer_is_read_in_place(engine: aio.AioIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbytes = 3 * 2**20
    raw = _data_file(tmp_path / "f.bin", nbytes)
    spy = SubmitSpy(engine, monkeypatch)
    buf = engine.locked_empty(nbytes)
    try:
        engine.read_into(tmp_path / "f.bin", 0, buf, nbytes)
        assert buf.numpy().tobytes() == raw
        assert spy.requests == [(False, 0, nbytes, buf.data_ptr())]  # one request, no bounce
    finally:
        engine.free_locked(buf)


# ---------------------------------------------------------------- the alignment guard


@pytest.mark.parametrize("case", ["offset", "buffer", "tail", "tail-two-threads", "past-eof"])
def test_misaligned_requests_take_the_posix_path(case: str, engine: aio.AioIO, engine2: aio.AioIO, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed returns success on these and leaves the buffer wrong (or aborts, past EOF): each
    one is read correctly here, and nothing misaligned reaches DeepSpeed."""
    size = 2**20 + 4096 + 100
    raw = _data_file(tmp_path / "f.bin", size, seed=1)
    eng = engine2 if case == "tail-two-threads" else engine
    spy = SubmitSpy(eng, monkeypatch)
    reset_io_stats()
    if case == "offset":
        offset, nbytes, buf = 100, 2**20, aligned_empty(2**20)
    elif case == "buffer":
        offset, nbytes, buf = 0, 2**20, aligned_empty(2**20 + ALIGN)[1:]  # one byte past a page
    elif case in ("tail", "tail-two-threads"):
        offset, nbytes, buf = 0, size, aligned_empty(size)  # 1 MiB + 4096 + 100: a tail of 100 (4196) bytes
    else:
        offset, nbytes, buf = 0, size + 4096, aligned_empty(size + 4096)
        with pytest.raises(StoreError, match="short read"):
            eng.read_into(tmp_path / "f.bin", offset, buf, nbytes)
        assert spy.requests == [] and io_stats()["aio_fallbacks"] == 1
        return
    eng.read_into(tmp_path / "f.bin", offset, buf, nbytes)
    assert buf[:nbytes].numpy().tobytes() == raw[offset:offset + nbytes]
    assert spy.all_aligned()
    if case in ("offset", "buffer"):
        assert spy.requests == [] and io_stats()["aio_fallbacks"] == 1
    else:
        head = (nbytes // eng.grain) * eng.grain
        assert io_stats()["aio_read_bytes"] == head and sum(n for _, _, n, _ in spy.requests) == head


def test_submit_refuses_a_misaligned_request(engine: aio.AioIO, tmp_path: Path) -> None:
    _data_file(tmp_path / "f.bin", 2 * 2**20)
    lane = engine._lane()
    buf = aligned_empty(2 * 2**20)
    path = str(tmp_path / "f.bin")
    for bad_buf, offset in ((buf[:2**20], 512), (buf[:2**20 + 512], 0), (buf[4096 + 1:4096 + 1 + 2**20], 0),
                            (buf, 4096)):  # offset, bytes, address, past EOF
        with pytest.raises(aio.MisalignedRequest):
            engine._submit(lane, False, bad_buf, path, offset)
        assert lane.pending == 0


def test_aio_write_is_exact_and_fsynced(engine: aio.AioIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbytes = 40 * 2**20 + 4096 + 7  # several bounce chunks, an aligned head and a 4103-byte tail
    src = aligned_empty(nbytes)
    src[:nbytes] = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    reset_io_stats()
    target = tmp_path / "out.bin"
    target.write_bytes(b"x" * (nbytes + 9999))  # an existing longer file is truncated
    engine.write_file(target, src, nbytes)
    assert target.read_bytes() == src[:nbytes].numpy().tobytes()
    assert synced, "the aio write was not fsynced"
    assert io_stats()["aio_write_bytes"] == (nbytes // ALIGN) * ALIGN


def test_injected_faults_reach_the_aio_engine(engine: aio.AioIO, tmp_path: Path) -> None:
    buf = aligned_empty(ALIGN * 4)
    FAULTS.arm("write:1:ENOSPC")
    try:
        with pytest.raises(StoreError, match="No space left"):
            engine.write_file(tmp_path / "f.bin", buf, ALIGN * 4)
    finally:
        FAULTS.disarm()


def test_locked_memory_is_refused_not_aborted_and_freed_with_its_thread(engine: aio.AioIO, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed aborts the process when mlock fails: past the locked-memory limit the engine
    refuses with a UserError first. Bounce buffers are freed when their thread ends."""
    import gc
    import threading

    with monkeypatch.context() as patch:
        patch.setattr(aio, "_lock_allowance", lambda: 2**20)
        with pytest.raises(UserError, match="locked-memory limit"):
            aio.open_engine("aio", bounce_bytes=4 * 2**20)
    raw = _data_file(tmp_path / "f.bin", 2**20)
    before = aio._locked_bytes
    other = aio.open_engine("aio", bounce_bytes=256 * 1024)
    seen = {}

    def read() -> None:
        buf = aligned_empty(2**20)
        other.read_into(tmp_path / "f.bin", 0, buf, 2**20)
        seen["ok"] = buf.numpy().tobytes() == raw
        seen["locked"] = aio._locked_bytes - before

    worker = threading.Thread(target=read)
    worker.start()
    worker.join()
    gc.collect()
    assert seen == {"ok": True, "locked": 2 * 256 * 1024}
    assert aio._locked_bytes == before


# ---------------------------------------------------------------- training through aio


def test_training_through_aio_equals_posix(engine: aio.AioIO, tmp_path: Path) -> None:
    """A streamed run (a budget of two of the four units, so every unit is read and written each step)
    ends with the same weights, bit for bit, through either engine."""
    model_dir = make_tiny_model(tmp_path, "llama", tied=True, sharded=True)
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    weights = {}
    for name in ("posix", "aio"):
        reset_io_stats()
        with Runtime(model_dir, SGD(lr=0.05), work_dir=tmp_path / name, weights_budget="70KB",
                     commit_every=1, io_engine=name) as rt:
            for ids in batches:
                assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped
            weights[name] = {k: v.clone() for k, v in rt.iter_weights()}
        stats = io_stats()
        if name == "aio":
            assert stats["aio_read_bytes"] > 0 and stats["aio_write_bytes"] > 0 and stats["aio_fallbacks"] == 0
        else:
            assert stats["aio_read_bytes"] == 0
    assert weights["aio"].keys() == weights["posix"].keys()
    for key, tensor in weights["posix"].items():
        assert torch.equal(weights["aio"][key], tensor), key


def test_probe_names_the_faster_engine(engine: aio.AioIO, tmp_path: Path) -> None:
    found = aio.probe_engines(str(tmp_path), size=8 * 2**20)
    assert found["io_engine"] in ("posix", "aio") and "posix and aio measured" in found["io_engine_note"]
    assert all(found[f"disk_{op}_bps.{name}"] > 0 for name in ("posix", "aio") for op in ("read", "write"))


# ---------------------------------------------------------------- where the op cannot build (everywhere)


def test_probe_without_aio_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(aio, "unavailable_reason", lambda: aio.LIBAIO_MISSING)
    found = aio.probe_engines(str(tmp_path))
    assert found["io_engine"] == "posix" and found["io_engine_note"] == aio.LIBAIO_MISSING
    assert found["disk_read_bps.aio"] is None  # overwrites an earlier probe's figures


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(UserError, match="--io-engine must be posix or aio"):
        aio.open_engine("spdk")


def test_build_notice_comes_before_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    stream = stdio.StringIO()

    class FakeBuilder:
        def load(self, verbose: bool = False):
            events.append(f"load after: {stream.getvalue()!r}")
            return "module"

    monkeypatch.setattr(aio, "_MODULE", None)
    monkeypatch.setattr(aio, "unavailable_reason", lambda: None)
    monkeypatch.setattr(aio, "is_built", lambda: False)
    monkeypatch.setattr(aio, "_builder", FakeBuilder)
    assert aio.load_op(stream) == "module"
    assert stream.getvalue() == aio.BUILD_NOTICE + "\n"
    assert events == [f"load after: {aio.BUILD_NOTICE + chr(10)!r}"]


def test_a_failed_build_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    class BrokenBuilder:
        def load(self, verbose: bool = False):
            raise RuntimeError("ninja: build stopped\nError building extension 'async_io'")

    monkeypatch.setattr(aio, "_MODULE", None)
    monkeypatch.setattr(aio, "unavailable_reason", lambda: None)
    monkeypatch.setattr(aio, "is_built", lambda: True)
    monkeypatch.setattr(aio, "_builder", BrokenBuilder)
    with pytest.raises(UserError) as err:
        aio.load_op(stdio.StringIO())
    assert "\n" not in str(err.value) and "Error building extension 'async_io'" in str(err.value)


def _train_cmd(model: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", "from lomo_runtime.cli import main; main()", "train", "--model", str(model),
            "--data", str(data), "--out", str(out), "--steps", "1", "--seq-len", "16", "--io-engine", "aio"]


@pytest.fixture
def job(tmp_path: Path) -> tuple[Path, Path]:
    from fault_harness import make_job

    made = make_job(tmp_path / "job")
    return made["model"], made["data"]


def test_train_aio_without_libaio_exits_2_with_one_line(job: tuple[Path, Path], tmp_path: Path) -> None:
    """Where the op cannot build, `train --io-engine aio` says why in one line (libaio-dev missing:
    `apt-get install libaio-dev`) and exits 2. On a machine that has libaio-dev the child is told
    the op cannot build (a stub `is_compatible`)."""
    model, data = job
    cmd = _train_cmd(model, data, tmp_path / "out")
    expected = aio.unavailable_reason()  # no DeepSpeed at all, or no libaio
    if expected is None:
        expected = aio.LIBAIO_MISSING
        stub = ("import deepspeed.ops.op_builder as b; b.AsyncIOBuilder.is_compatible = lambda self, verbose=False: False; "
                "from lomo_runtime.cli import main; main()")
        cmd[2] = stub
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].endswith(expected), proc.stderr
    assert not (tmp_path / "out" / "store" / "manifest.json").exists()  # failed before any store work


def test_config_refuses_an_unknown_engine() -> None:
    from lomo_runtime.config import merge

    with pytest.raises(UserError, match="--io-engine"):
        merge({"model": "m", "data": "d", "out": "o", "io_engine": "io_uring"}).validate()
    assert align_up(1) == ALIGN  # the grain everything above is aligned to

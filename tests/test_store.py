"""The working store: bit-exact round trips, generations and commits, checksums, the lock,
cleanup of uncommitted files, and a crash test that SIGKILLs commits at random instants."""
from __future__ import annotations

import json
import os
import random
import signal
import time
import zlib
from pathlib import Path
from typing import Callable

import crc32c
import pytest
import torch

from fault_harness import store_report
from lomo_runtime.errors import StoreError
from lomo_runtime.io import ALIGN, aligned_empty
from lomo_runtime.store import (
    VERSION,
    TensorSlot,
    UnitRecord,
    WorkingStore,
    checksum,
    layout,
    pack_tensors,
    tensor_views,
)


def _loaders(tensors: dict[str, torch.Tensor]) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    return [(name, (lambda t=t: t)) for name, t in tensors.items()]


def _model() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed": {"model.embed_tokens.weight": torch.randn(50, 16, generator=g)},
        "block.0": {
            "model.layers.0.q.weight": torch.randn(16, 16, generator=g).bfloat16(),
            "model.layers.0.norm.weight": torch.randn(16, generator=g).half(),
            "model.layers.0.count": torch.tensor(3, dtype=torch.int64),  # 0-dim
            "model.layers.0.mask": torch.rand(5, 3, generator=g) > 0.5,
            "model.layers.0.empty": torch.empty(0, 4),
        },
        "head": {"lm_head.weight": torch.randn(1000, 3, generator=g).double()},
    }


def _create(work: Path, model: dict[str, dict[str, torch.Tensor]] | None = None, **kw: object) -> WorkingStore:
    model = model or _model()
    units = [(name, _loaders(tensors)) for name, tensors in model.items()]
    return WorkingStore.create(work, units, {"config": {"model_type": "llama"}, "source": "/nowhere"}, **kw)


def _read_all(store: WorkingStore) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in store.iter_tensors()}


def _bump(store: WorkingStore, name: str, generation: int, delta: float = 1.0) -> UnitRecord:
    rec = store.units[name]
    buf = aligned_empty(rec.nbytes)
    store.read_unit(name, buf)
    for t in tensor_views(buf, rec.tensors).values():
        if t.is_floating_point():
            t.add_(delta)
    return store.write_unit(name, buf, generation)


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    model = _model()
    with _create(tmp_path / "store", model) as store:
        assert store.step == 0
        assert store.meta == {"config": {"model_type": "llama"}, "source": "/nowhere"}
        assert list(store.units) == ["embed", "block.0", "head"]
        got = _read_all(store)
        for unit, tensors in model.items():
            rec = store.units[unit]
            assert rec.nbytes % ALIGN == 0
            assert os.path.getsize(store.dir / rec.file) == rec.nbytes
            assert all(slot.offset % ALIGN == 0 for slot in store.tensor_slots(unit))
            for name, expected in tensors.items():
                assert got[name].dtype == expected.dtype and got[name].shape == expected.shape
                assert torch.equal(got[name].reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))
        slots = {s.name: s for s in store.tensor_slots("block.0")}
        assert slots["model.layers.0.q.weight"].dtype == "BF16"
        assert slots["model.layers.0.mask"].dtype == "BOOL"
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["step"] == 0 and manifest["units"][0]["file"] == "units/embed.g0.bin"


def test_commit_and_reopen(tmp_path: Path) -> None:
    work = tmp_path / "store"
    with _create(work) as store:
        before = _read_all(store)
        rec = _bump(store, "block.0", generation=1)
        store.commit(1, {"block.0": rec}, meta={"config": {}, "note": "after step 1"})
        assert store.step == 1
    with WorkingStore.open(work) as store:
        assert store.step == 1 and store.meta["note"] == "after step 1"
        assert {n: r.generation for n, r in store.units.items()} == {"embed": 0, "block.0": 1, "head": 0}
        after = _read_all(store)
    for name, t in before.items():
        if name.startswith("model.layers.0.") and t.is_floating_point():
            assert torch.equal(after[name], t + 1)
        else:
            assert torch.equal(after[name], t)


@pytest.mark.parametrize("recorded", [0, 1])
def test_a_crash_between_prepare_and_finish_is_settled_by_the_commit_record(tmp_path: Path, recorded: int) -> None:
    """Two-phase commit (several ranks): a store prepared at step 1 and never finished opens at the
    step the run's record names: 1 finishes the prepared manifest, 0 drops it with its files."""
    work = tmp_path / "store"
    with _create(work) as store:
        before = _read_all(store)
        rec = _bump(store, "block.0", generation=1)
        store.prepare(1, {"block.0": rec}, meta={"config": {}, "note": "step 1"})
        assert store.step == 0 and (work / "manifest.next.json").exists()
        assert {"block.0.g0.bin", "block.0.g1.bin"} <= set(os.listdir(work / "units"))  # both kept until decided
    with WorkingStore.open(work, committed_step=recorded) as store:
        assert store.step == recorded and not (work / "manifest.next.json").exists()
        after = _read_all(store)
        assert store.units["block.0"].generation == recorded
        assert set(os.listdir(work / "units")) >= {f"block.0.g{recorded}.bin"}
        assert f"block.0.g{1 - recorded}.bin" not in os.listdir(work / "units")
    changed = after["model.layers.0.q.weight"].float() - before["model.layers.0.q.weight"].float()
    assert bool((changed == 0).all()) == (recorded == 0)
    with pytest.raises(StoreError, match="commit record names step 5"):
        WorkingStore.open(work, committed_step=5)


def test_finish_prepared_adopts_the_step_and_deletes_what_it_superseded(tmp_path: Path) -> None:
    work = tmp_path / "store"
    with _create(work) as store:
        rec = _bump(store, "embed", generation=2)
        store.prepare(1, {"embed": rec})
        store.finish_prepared()
        assert store.step == 1 and store.units["embed"].generation == 2
        assert "embed.g0.bin" not in os.listdir(work / "units") and not (work / "manifest.next.json").exists()
    with WorkingStore.open(work) as store:
        assert store.step == 1


def test_old_generation_deleted_only_after_commit(tmp_path: Path) -> None:
    with _create(tmp_path / "store") as store:
        units_dir = store.dir / "units"
        rec = _bump(store, "embed", generation=5)
        assert {"embed.g0.bin", "embed.g5.bin"} <= set(os.listdir(units_dir))
        assert store.units["embed"].generation == 0  # not referenced until commit
        store.commit(1, {"embed": rec})
        assert "embed.g0.bin" not in os.listdir(units_dir)
        assert "embed.g5.bin" in os.listdir(units_dir)


def test_uncommitted_generations_are_cleaned(tmp_path: Path) -> None:
    work = tmp_path / "store"
    with _create(work) as store:
        before = _read_all(store)
        _bump(store, "head", generation=1)
        _bump(store, "embed", generation=1)
        assert store.discard_uncommitted() == 2
        assert sorted(os.listdir(work / "units")) == ["block.0.g0.bin", "embed.g0.bin", "head.g0.bin"]
        _bump(store, "head", generation=2)  # then "crash": closed without commit
        (work / "manifest.json.tmp").write_text("{half a manifest")
    assert "head.g2.bin" in os.listdir(work / "units")
    with WorkingStore.open(work) as store:
        assert sorted(os.listdir(work / "units")) == ["block.0.g0.bin", "embed.g0.bin", "head.g0.bin"]
        assert not (work / "manifest.json.tmp").exists()
        assert store.step == 0
        after = _read_all(store)
    assert all(torch.equal(after[n], t) for n, t in before.items())


def test_commit_keeps_latest_of_several_pending_generations(tmp_path: Path) -> None:
    with _create(tmp_path / "store") as store:
        _bump(store, "embed", generation=1)
        rec = _bump(store, "embed", generation=2, delta=2.0)
        store.commit(2, {"embed": rec})
        assert sorted(f for f in os.listdir(store.dir / "units") if f.startswith("embed")) == ["embed.g2.bin"]


def test_layout_can_change(tmp_path: Path) -> None:
    with _create(tmp_path / "store") as store:
        w = _read_all(store)["model.embed_tokens.weight"]
        exp_avg = torch.full_like(w, 0.5)
        slots, nbytes = layout([(n, "F32", tuple(w.shape)) for n in ("model.embed_tokens.weight", "exp_avg")])
        buf = aligned_empty(nbytes)
        pack_tensors(buf, slots, {"model.embed_tokens.weight": w, "exp_avg": exp_avg})
        rec = store.write_unit("embed", buf, 1, tensors=slots)
        store.commit(1, {"embed": rec})
        got = _read_all(store)
        assert torch.equal(got["exp_avg"], exp_avg) and torch.equal(got["model.embed_tokens.weight"], w)
        bad = (TensorSlot("x", "F32", (4,), 100, 16),)  # unaligned offset
        with pytest.raises(ValueError, match="unaligned"):
            store.write_unit("embed", buf, 2, tensors=bad)


def test_checksum_mismatch_names_unit_and_file(tmp_path: Path) -> None:
    work = tmp_path / "store"
    with _create(work) as store:
        rec = store.units["head"]
        path = work / rec.file
    with open(path, "r+b") as f:  # flip one bit in the middle of lm_head
        f.seek(rec.nbytes // 2)
        byte = f.read(1)
        f.seek(rec.nbytes // 2)
        f.write(bytes([byte[0] ^ 1]))
    with WorkingStore.open(work) as store:
        buf = aligned_empty(rec.nbytes)
        with pytest.raises(StoreError, match=r"unit head: checksum mismatch in .*units/head\.g0\.bin \(crc32c: "):
            store.read_unit("head", buf)
        with pytest.raises(StoreError, match="unit head"):
            _read_all(store)
    os.truncate(path, rec.nbytes - ALIGN)
    with pytest.raises(StoreError, match=r"unit head: file .*head\.g0\.bin holds"):
        WorkingStore.open(work)


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


def _downgrade(work: Path, version: int) -> None:
    """Rewrite a closed store's manifest as lomo-run wrote it at ``version`` 1 or 2: zlib CRC-32
    unit checksums, no algorithm names, and (version 2) a CRC-32 of the canonical content."""
    path = work / "manifest.json"
    data = json.loads(path.read_text())
    del data["checksum"], data["unit_checksum"]
    data["version"] = version
    for unit in data["units"]:
        del unit["checksum_alg"]
        unit["checksum"] = zlib.crc32((work / unit["file"]).read_bytes())
    if version >= 2:
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        data["checksum"] = f"{zlib.crc32(canonical):08x}"
    path.write_text(json.dumps(data, indent=1))


def test_unit_checksum_is_crc32c() -> None:
    assert checksum(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert checksum(b"123456789", "crc32") == 0xCBF43926  # zlib's CRC-32, for version 1-2 stores
    assert checksum(b"") == 0


def test_new_store_names_crc32c_and_its_checksums_are_crc32c(tmp_path: Path) -> None:
    work = tmp_path / "store"
    _create(work).close()
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["version"] == VERSION == 3 and manifest["unit_checksum"] == "crc32c"
    for unit in manifest["units"]:
        data = (work / unit["file"]).read_bytes()
        assert unit["checksum_alg"] == "crc32c" and unit["checksum"] == crc32c.crc32c(data) != zlib.crc32(data)
    assert store_report(work)["named"] == {"embed.g0.bin", "block.0.g0.bin", "head.g0.bin"}


@pytest.mark.parametrize("version", [1, 2])
def test_old_store_with_zlib_checksums_opens_reads_and_catches_damage(tmp_path: Path, version: int) -> None:
    work = tmp_path / "store"
    with _create(work) as store:
        before = _read_all(store)
    _downgrade(work, version)
    store_report(work)  # the harness checks version-1/2 files with zlib too
    with WorkingStore.open(work) as store:
        assert {rec.checksum_alg for rec in store.units.values()} == {"crc32"}
        after = _read_all(store)  # verified: a crc32c check of these files would fail
        rec = store.units["head"]
    assert all(torch.equal(after[n], t) for n, t in before.items())
    _flip_byte(work / rec.file, rec.nbytes // 2)
    with WorkingStore.open(work) as store:
        with pytest.raises(StoreError, match=r"unit head: checksum mismatch in .*units/head\.g0\.bin \(crc32: "):
            store.read_unit("head", aligned_empty(rec.nbytes))


def test_commit_on_an_opened_version_2_store_keeps_each_files_algorithm(tmp_path: Path) -> None:
    """The first commit writes a version-3 manifest: the rewritten unit is CRC-32C, the units it did
    not touch keep their zlib CRC-32 (their files are not re-read), and all of them still verify."""
    work = tmp_path / "store"
    with _create(work) as store:
        before = _read_all(store)
    _downgrade(work, 2)
    with WorkingStore.open(work) as store:
        store.commit(1, {"block.0": _bump(store, "block.0", generation=1)})
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["version"] == 3 and manifest["unit_checksum"] == "crc32c"
    assert {u["name"]: u["checksum_alg"] for u in manifest["units"]} == {"embed": "crc32", "block.0": "crc32c", "head": "crc32"}
    assert store_report(work)["step"] == 1
    with WorkingStore.open(work) as store:
        assert {n: r.checksum_alg for n, r in store.units.items()} == {"embed": "crc32", "block.0": "crc32c", "head": "crc32"}
        after = _read_all(store)
        recs = store.units
    for name, t in before.items():
        bumped = name.startswith("model.layers.0.") and t.is_floating_point()
        assert torch.equal(after[name], t + 1 if bumped else t), name
    for unit, alg in (("embed", "crc32"), ("block.0", "crc32c")):
        _flip_byte(work / recs[unit].file, 7)
        with WorkingStore.open(work) as store:
            with pytest.raises(StoreError, match=rf"unit {unit}: checksum mismatch in .* \({alg}: "):
                store.read_unit(unit, aligned_empty(recs[unit].nbytes))
        _flip_byte(work / recs[unit].file, 7)  # undo, so the next unit is the only damage


def test_version_3_record_must_name_a_known_algorithm(tmp_path: Path) -> None:
    from lomo_runtime.store import _manifest_checksum

    work = tmp_path / "store"
    _create(work).close()
    path = work / "manifest.json"
    good = json.loads(path.read_text())
    for damage, message in (("md5", "unknown checksum algorithm 'md5'"), (None, "checksum_alg")):
        data = json.loads(json.dumps(good))
        del data["checksum"]
        if damage is None:
            del data["units"][1]["checksum_alg"]
        else:
            data["units"][1]["checksum_alg"] = damage
        data["checksum"] = _manifest_checksum(data)
        path.write_text(json.dumps(data))
        with pytest.raises(StoreError, match=f"is damaged or not a lomo-run manifest: .*{message}"):
            WorkingStore.open(work)


def test_create_reports_each_unit_written(tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    with _create(tmp_path / "store", on_unit=lambda *args: calls.append(args)) as store:
        sizes = [rec.nbytes for rec in store.units.values()]
    assert [c[0] for c in calls] == ["embed", "block.0", "head"]
    assert [c[1] for c in calls] == [1, 2, 3]
    assert [c[2] for c in calls] == [sum(sizes[:i]) for i in (1, 2, 3)]
    assert {len(c) for c in calls} == {3}  # (unit, units done, bytes done)


def test_misuse_is_refused(tmp_path: Path) -> None:
    with _create(tmp_path / "store") as store:
        buf = aligned_empty(store.units["embed"].nbytes)
        with pytest.raises(ValueError, match="not newer"):
            store.write_unit("embed", buf, 0)
        with pytest.raises(ValueError, match="no unit"):
            store.write_unit("nope", buf, 1)
        forged = UnitRecord("embed", 9, "units/embed.g9.bin", 0, 0, ())
        with pytest.raises(ValueError, match="not written"):
            store.commit(1, {"embed": forged})
    with pytest.raises(StoreError, match="closed"):
        store.read_unit("embed", buf)


def test_create_refuses_foreign_and_existing(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="not empty and is not a lomo-run store"):
        _create(foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"
    with pytest.raises(StoreError, match="not a lomo-run store"):
        WorkingStore.open(foreign)

    work = tmp_path / "store"
    with _create(work) as store:
        store.commit(1, {"head": _bump(store, "head", generation=7)})
    with pytest.raises(StoreError, match="already holds a store"):
        _create(work)
    model = _model()
    model["embed"]["model.embed_tokens.weight"] += 1
    with _create(work, model, overwrite=True) as store:
        assert torch.equal(_read_all(store)["model.embed_tokens.weight"], model["embed"]["model.embed_tokens.weight"])
        assert len(os.listdir(work / "units")) == 3  # the old store's files are gone
        assert store.step == 0 and {r.generation for r in store.units.values()} == {0}


def test_create_reuses_leftovers_of_a_crashed_create(tmp_path: Path) -> None:
    work = tmp_path / "store"
    (work / "units").mkdir(parents=True)
    (work / "lock").write_text("12345\n")
    (work / "units" / "embed.g0.bin").write_bytes(b"half")

    def broken() -> torch.Tensor:
        raise RuntimeError("loader failed")

    with pytest.raises(RuntimeError):
        WorkingStore.create(work, [("embed", [("w", lambda: torch.ones(3))]), ("head", [("x", broken)])], {})
    with _create(work) as store:
        assert store.step == 0 and sorted(os.listdir(work / "units")) == ["block.0.g0.bin", "embed.g0.bin", "head.g0.bin"]


# ---------------------------------------------------------------- the lock


def test_second_open_fails_at_once(tmp_path: Path) -> None:
    work = tmp_path / "store"
    store = _create(work)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=f"store .* is in use by pid {os.getpid()}"):
        WorkingStore.open(work)
    assert time.monotonic() - t0 < 1.0
    store.close()
    WorkingStore.open(work).close()


def test_lock_of_a_killed_holder_is_released(tmp_path: Path) -> None:
    work = tmp_path / "store"
    _create(work).close()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: hold the store, say so, wait to be killed
        try:
            os.close(ready_r)
            held = WorkingStore.open(work)  # noqa: F841 - kept alive until the kill
            os.write(ready_w, b"1")
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        with pytest.raises(StoreError, match=f"in use by pid {pid}"):
            WorkingStore.open(work)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
    with WorkingStore.open(work) as store:  # the kernel dropped the dead holder's flock
        assert store.step == 0


# ---------------------------------------------------------------- crash test

CRASH_UNITS = {  # unit -> tensor numels: ~3 MiB per generation in 5 files
    "embed": [131072],
    "block.0": [65536, 1000, 65536],
    "block.1": [65536, 1000, 65536],
    "block.2": [65536, 1000, 65536],
    "head": [4097, 131072],
}


def _version(version: int) -> dict[str, dict[str, torch.Tensor]]:
    return {
        unit: {f"{unit}.t{i}": torch.arange(n, dtype=torch.float32) + 1000.0 * version + i for i, n in enumerate(numels)}
        for unit, numels in CRASH_UNITS.items()
    }


def _commit_in_child(work: Path, step: int, bufs: dict[str, torch.Tensor]) -> int:
    """Fork a child that opens the store, writes every unit as generation ``step`` and commits ``step``."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            store = WorkingStore.open(work)
            records = {name: store.write_unit(name, buf, generation=step) for name, buf in bufs.items()}
            store.commit(step, records)
            store.close()
            code = 0
        finally:
            os._exit(code)
    return pid


def test_sigkill_during_commit_leaves_old_or_new_step(tmp_path: Path) -> None:
    """SIGKILL a committing process at random instants, 30 times: the store must always
    reopen at the old or the new step, every checksum valid, every tensor that step's."""
    work = tmp_path / "store"
    versions = {0: _version(0)}
    with WorkingStore.create(work, [(u, _loaders(t)) for u, t in versions[0].items()], {}) as store:
        slots = {u: store.tensor_slots(u) for u in CRASH_UNITS}

    def buffers_for(step: int) -> dict[str, torch.Tensor]:
        versions[step] = _version(step)
        bufs = {}
        for unit, tensors in versions[step].items():
            buf = aligned_empty(sum(s.nbytes for s in slots[unit]) + ALIGN * len(slots[unit]))
            pack_tensors(buf, slots[unit], tensors)
            bufs[unit] = buf
        return bufs

    def check(expected_steps: tuple[int, ...]) -> int:
        with WorkingStore.open(work) as store:
            assert store.step in expected_steps
            referenced = {Path(r.file).name for r in store.units.values()}
            assert set(os.listdir(work / "units")) == referenced
            for unit, rec in store.units.items():
                assert rec.generation == store.step
                buf = aligned_empty(rec.nbytes)
                store.read_unit(unit, buf)  # verifies size and CRC-32C
                for name, t in tensor_views(buf, rec.tensors).items():
                    assert torch.equal(t, versions[store.step][unit][name]), (unit, name, store.step)
            return store.step

    # Uninterrupted commits tell how long the kill window is (about 50 ms here: five
    # ~0.6 MiB files written and fsynced, then the manifest; the fastest of three,
    # since one slow fsync can take ten times that).
    window = float("inf")
    step = 0
    for _ in range(3):
        bufs = buffers_for(step + 1)
        t0 = time.monotonic()
        pid = _commit_in_child(work, step + 1, bufs)
        assert os.waitpid(pid, 0)[1] == 0
        window = min(window, time.monotonic() - t0)
        step = check((step + 1,))

    rng = random.Random(1234)
    outcomes = {"old": 0, "new": 0}
    deadline = time.monotonic() + 25.0
    for _ in range(30):
        if time.monotonic() > deadline:
            break
        bufs = buffers_for(step + 1)
        pid = _commit_in_child(work, step + 1, bufs)
        time.sleep(rng.uniform(0.0, window))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        new_step = check((step, step + 1))
        outcomes["new" if new_step == step + 1 else "old"] += 1
        # Steer the window so kills land on both sides of the manifest rename.
        window *= 0.85 if new_step == step + 1 else 1.15
        step = new_step
        for old in [k for k in versions if k < step]:
            del versions[old]
    assert sum(outcomes.values()) >= 10, outcomes
    print(f"commit window {window * 1000:.0f} ms; kills that left the old step / the new step: {outcomes}")

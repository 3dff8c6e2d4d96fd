"""Corruption and concurrency: damaged unit files are caught by their checksum or size and
named; nothing is trained on them. A second run on the same output is refused at once;
the lock of a killed run is no obstacle.

The CLI cases run `lomo_runtime.cli.main` in this process (fast); the lock cases fork
real `lomo-run train` children from the fault suite's fork server.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from fault_harness import Zygote, assert_same_weights, make_job, store_report, train_argv, train_in_process, weights
from lomo_runtime.errors import StoreError
from lomo_runtime.rules import SGD
from lomo_runtime.runtime import Runtime
from lomo_runtime.scheduler import UnitState
from lomo_runtime.store import VERSION


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_job(tmp_path_factory.mktemp("corruption"))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _unit_file(out: Path, unit: str) -> Path:
    (path,) = (out / "store" / "units").glob(f"{unit}.g*.bin")
    return path


DAMAGE = {
    # how, what the message must say
    "flip-in-tensor": (lambda p: _flip(p, 100), "checksum mismatch"),
    "flip-in-padding": (lambda p: _flip(p, p.stat().st_size - 1), "checksum mismatch"),
    "truncated": (lambda p: os.truncate(p, p.stat().st_size - 4096), "bytes, the manifest says"),
    "missing": (lambda p: p.unlink(), "is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_unit_file_is_named_and_nothing_trains(job, tmp_path: Path, capsys, damage: str) -> None:
    out = tmp_path / "out"
    assert train_in_process(job, out, "--steps", "3") == 0
    capsys.readouterr()
    path = _unit_file(out, "block.1")
    DAMAGE[damage][0](path)
    manifest = (out / "store" / "manifest.json").read_bytes()
    damaged = path.read_bytes() if path.exists() else None
    metrics = (out / "metrics.jsonl").read_bytes()

    assert train_in_process(job, out, "--steps", "6", "--resume") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, err
    assert "unit block.1" in errors[0] and str(path) in errors[0] and DAMAGE[damage][1] in errors[0], errors[0]
    # Nothing trained: the manifest, the damaged file and the metrics are as they were.
    assert (out / "store" / "manifest.json").read_bytes() == manifest
    assert (path.read_bytes() if path.exists() else None) == damaged
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_damaged_manifest_is_refused(job, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert train_in_process(job, out, "--steps", "2") == 0
    capsys.readouterr()
    manifest = out / "store" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:200])
    assert train_in_process(job, out, "--steps", "4", "--resume") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{manifest} is damaged" in err


def test_manifest_checksum_catches_a_changed_digit(job, tmp_path: Path, capsys) -> None:
    """A manifest that still parses but says something else (here: the step) is refused too."""
    out = tmp_path / "out"
    assert train_in_process(job, out, "--steps", "2") == 0
    capsys.readouterr()
    manifest = out / "store" / "manifest.json"
    text = manifest.read_text()
    assert '"step": 2,' in text
    manifest.write_text(text.replace('"step": 2,', '"step": 3,', 1))
    assert train_in_process(job, out, "--steps", "4", "--resume") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{manifest} is damaged" in err and "checksum" in err


def test_version_1_manifest_without_checksum_still_resumes(job, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert train_in_process(job, out, "--steps", "2") == 0
    manifest = out / "store" / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["checksum"]
    data["version"] = 1
    manifest.write_text(json.dumps(data))
    assert train_in_process(job, out, "--steps", "3", "--resume") == 0
    assert json.loads(manifest.read_text())["version"] == VERSION  # the next commit writes the current version


def test_corruption_during_a_run_stops_it_before_any_update(job, tmp_path: Path) -> None:
    """A unit file damaged between steps (bit rot, a stray writer): its next read fails, the
    step raises, and the store stays at the last commit."""
    ids = torch.randint(4, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    work = tmp_path / "store"
    rt = Runtime(job["model"], SGD(lr=0.05), work_dir=work, weights_budget="70KB", commit_every=1)
    try:
        rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        assert rt.step == 1
        victim = next(u for u in rt.scheduler.units.values() if u.state is UnitState.ON_DISK)
        path = work / rt.store.units[victim.name].file
        _flip(path, 64)
        with pytest.raises(StoreError, match=rf"unit {victim.name}: checksum mismatch in {path}"):
            rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        assert rt.store.step == 1
    finally:
        try:
            rt.close()
        except StoreError:
            pass  # closing re-raises the failed read; the store is closed all the same
    _flip(path, 64)  # undo the damage: the store is exactly the step-1 commit
    assert store_report(work)["step"] == 1


# ---------------------------------------------------------------- the lock


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def test_second_train_on_the_same_output_fails_at_once(job, zygote: Zygote, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert zygote.run(train_argv(job, out, "--steps", "2", "--threads", "1"), {}, tmp_path / "a.log")[0] == 0
    # The first run stalls in its first read after opening the store: it holds the lock.
    trace = tmp_path / "trace"
    first = zygote.start(train_argv(job, out, "--steps", "4", "--threads", "1", "--resume"),
                         {"LOMO_RUN_FAULTS": "read:1:sleep=60", "LOMO_RUN_FAULT_TRACE": str(trace)}, tmp_path / "b.log")
    try:
        deadline = time.monotonic() + 60
        # Wait for the stalled read itself: the trace also logs the store's open (an unlink), which
        # comes before the run has written its own config.yaml.
        while time.monotonic() < deadline and not (trace.exists() and " read " in trace.read_text()):
            time.sleep(0.01)
        assert " read " in trace.read_text(), "the first run never reached its first read"
        config = (out / "config.yaml").read_bytes()  # the running run's resolved settings
        second = _run_cli_second(job, out, tmp_path)
        assert second.returncode == 2, second.stderr
        assert f"is in use by pid {first}" in second.stderr and "Traceback" not in second.stderr
        clobbered = (out / "config.yaml").read_bytes() != config
    finally:
        os.kill(first, signal.SIGKILL)
        assert zygote.wait() == -signal.SIGKILL
    assert not clobbered, "the refused run must leave the running one's files alone"


def _run_cli_second(job, out: Path, tmp_path: Path):
    from fault_harness import run_cli

    return run_cli(train_argv(job, out, "--steps", "4", "--threads", "1", "--lr", "0.01", "--resume"))


def test_stale_lock_of_a_killed_run_is_cleared(job, zygote: Zygote, tmp_path: Path) -> None:
    out = tmp_path / "out"
    reference = tmp_path / "reference"
    assert zygote.run(train_argv(job, reference, "--steps", "4", "--threads", "1"), {}, tmp_path / "r.log")[0] == 0
    trace = tmp_path / "trace"
    pid = zygote.start(train_argv(job, out, "--steps", "4", "--threads", "1"),
                       {"LOMO_RUN_FAULTS": "rename:3:sleep=60", "LOMO_RUN_FAULT_TRACE": str(trace)}, tmp_path / "a.log")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (trace.exists() and " rename " in trace.read_text()[-200:]):
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    assert zygote.wait() == -signal.SIGKILL
    lock = out / "store" / "lock"
    assert lock.read_text().strip() == str(pid)  # the dead run's pid is still in the lock file
    code, output = zygote.run(train_argv(job, out, "--steps", "4", "--threads", "1", "--resume"), {}, tmp_path / "b.log")
    assert code == 0, output
    assert_same_weights(weights(out / "model"), weights(reference / "model"), "after a stale lock")
    # A lock file naming a live process that holds no flock is no lock either.
    lock.write_text(f"{os.getpid()}\n")
    code, output = zygote.run(train_argv(job, out, "--steps", "5", "--threads", "1", "--resume"), {}, tmp_path / "c.log")
    assert code == 0, output

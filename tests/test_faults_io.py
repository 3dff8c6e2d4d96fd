"""Disk full and I/O errors: ENOSPC/EIO injected into write-back, reads and every act of a commit.

Each case arms ``LOMO_RUN_FAULTS`` in a `lomo-run train` process and expects:

- a non-zero exit (2: a ``StoreError``, the user must act: free space, check the disk)
  with one ``error:`` line naming the file and the errno's text, no traceback;
- the store at the last committed step, every file it names intact (size, checksum);
  files of the failed step are never named by the manifest;
- ``--resume`` without the fault completes and ends bit-identical to an
  uninterrupted run, every step logged once.

Counting, for the tiny model (4 units) at a 70 KB weights budget: creating the store
writes 4 unit files and commits step 0; every step writes back the 4 units and commits
once. A commit is: fsync units/, write and fsync manifest.json.tmp, rename it, fsync the
store directory.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from fault_harness import (
    Zygote,
    assert_same_weights,
    error_lines,
    logged_steps,
    make_job,
    run_cli,
    store_report,
    train_argv,
    weights,
)
from lomo_runtime.errors import StoreError
from lomo_runtime.io import FAULTS, FaultInjector, aligned_empty, read_into, write_file

STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("faults-io")
    job = make_job(root / "job")
    proc = run_cli(train_argv(job, root / "reference", "--steps", str(STEPS), "--threads", "1"))
    assert proc.returncode == 0, proc.stderr
    zygote = Zygote()
    yield {"job": job, "expected": weights(root / "reference" / "model"), "zygote": zygote}
    zygote.close()


# (id, fault spec, committed step left behind, text the error names, errno text)
CASES = [
    ("create-unit-write-enospc", "write:2:ENOSPC:/units/", None, "block.0.g0.bin", "No space left on device"),
    ("writeback-enospc", "write:14:ENOSPC:/units/", 1, ".g2.bin", "No space left on device"),
    ("writeback-fsync-eio", "fsync:15:EIO:/units/", 1, ".g2.bin", "Input/output error"),
    ("disk-stays-full", "write:13+:ENOSPC:/units/", 1, ".g2.bin", "No space left on device"),
    ("read-eio", "read:7:EIO:/units/", None, "/units/", "Input/output error"),
    ("commit-units-dir-fsync-eio", "fsync:3:EIO:/units$", 1, "/units", "Input/output error"),
    ("commit-manifest-write-enospc", "write:3:ENOSPC:manifest.json.tmp", 1, "manifest.json.tmp", "No space left on device"),
    ("commit-manifest-fsync-eio", "fsync:4:EIO:manifest.json.tmp", 2, "manifest.json.tmp", "Input/output error"),
    ("commit-rename-eio", "rename:3:EIO", 1, "manifest.json", "Input/output error"),
    # After the rename the new manifest is in place: the step counts as committed, and its
    # files must survive the failed process's clean-up.
    ("commit-dir-fsync-eio", "fsync:3:EIO:/store$", 2, "/store", "Input/output error"),
    ("create-commit-dir-fsync-eio", "fsync:1:EIO:/store$", 0, "/store", "Input/output error"),
]


@pytest.mark.parametrize("spec,step,names,errtext", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_io_fault_fails_cleanly_and_resume_matches(setup, tmp_path: Path, spec: str, step: int | None,
                                                   names: str, errtext: str) -> None:
    job, zygote = setup["job"], setup["zygote"]
    out = tmp_path / "out"
    code, output = zygote.run(train_argv(job, out, "--steps", str(STEPS), "--threads", "1"),
                              {"LOMO_RUN_FAULTS": spec}, tmp_path / "faulty.log")
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [l for l in error_lines(output) if l.startswith("error:")]
    assert len(errors) == 1, output
    assert names in errors[0] and errtext in errors[0], errors[0]

    store = out / "store"
    if (store / "manifest.json").exists():
        report = store_report(store)  # every file the manifest names: right size, right checksum
        if step is not None:
            assert report["step"] == step, report
        # Files the failed step wrote are never named by the manifest.
        assert all(f".g{report['step'] + 1}." not in name for name in report["named"])
        # A failure after the rename committed a step whose metrics line was never written;
        # resume recovers it from the manifest.
        assert logged_steps(out) in (list(range(1, report["step"] + 1)), list(range(1, report["step"])))
    else:
        assert step is None  # died before the first commit: nothing to resume, start again

    resume = ["--resume"] if (store / "manifest.json").exists() else []
    code, output = zygote.run(train_argv(job, out, "--steps", str(STEPS), "--threads", "1", *resume), {},
                              tmp_path / "resume.log")
    assert code == 0, output
    assert_same_weights(weights(out / "model"), setup["expected"], spec)
    assert logged_steps(out) == list(range(1, STEPS + 1))
    report = store_report(store)
    assert report["step"] == STEPS and not report["leftovers"] and not report["tmp_manifest"]


def test_failed_cleanup_after_commit_does_not_fail_the_run(setup, tmp_path: Path) -> None:
    """Deleting a superseded generation is housekeeping: an EIO there leaves a file for the
    next open to delete, never a failed step."""
    job, zygote = setup["job"], setup["zygote"]
    out = tmp_path / "out"
    code, output = zygote.run(train_argv(job, out, "--steps", str(STEPS), "--threads", "1"),
                              {"LOMO_RUN_FAULTS": "unlink:2+:EIO:/units/"}, tmp_path / "run.log")
    assert code == 0, output
    assert_same_weights(weights(out / "model"), setup["expected"], "unlink faults")
    assert store_report(out / "store")["leftovers"]  # superseded files stayed ...
    from lomo_runtime.store import WorkingStore

    WorkingStore.open(out / "store").close()  # ... until the next open
    assert not store_report(out / "store")["leftovers"]


def test_partial_file_of_the_next_generation_is_never_used(setup, tmp_path: Path) -> None:
    """A full-sized file of garbage under the next generation's name (a write that crashed
    or failed) is deleted on resume, never read as the unit."""
    job, zygote = setup["job"], setup["zygote"]
    out = tmp_path / "out"
    code, output = zygote.run(train_argv(job, out, "--steps", "3", "--threads", "1"), {}, tmp_path / "a.log")
    assert code == 0, output
    units = out / "store" / "units"
    for path in list(units.iterdir()):
        unit, gen = path.name.rsplit(".g", 1)
        planted = units / f"{unit}.g{int(gen.removesuffix('.bin')) + 1}.bin"
        planted.write_bytes(os.urandom(path.stat().st_size))
    code, output = zygote.run(train_argv(job, out, "--steps", str(STEPS), "--threads", "1", "--resume"), {},
                              tmp_path / "b.log")
    assert code == 0, output
    assert_same_weights(weights(out / "model"), setup["expected"], "planted garbage generations")


# ---------------------------------------------------------------- the injector itself


def test_fault_spec_grammar_and_counting(tmp_path: Path) -> None:
    faults = FaultInjector().arm("write:2:ENOSPC:a, read:2+:EIO, fsync:*:sleep=0:x$")
    assert [(r.op, r.nth, r.repeat, r.error, r.sleep, r.match) for r in faults.rules] == [
        ("write", 2, False, 28, None, "a"), ("read", 2, True, 5, None, ""), ("fsync", 1, True, None, 0.0, "x$")]
    faults.hit("write", "b")          # does not match: not counted
    faults.hit("write", "a1")         # first match
    with pytest.raises(OSError) as err:
        faults.hit("write", "a2")     # second match fails
    assert err.value.errno == 28 and err.value.filename == "a2"
    faults.hit("write", "a3")         # only the second
    faults.hit("read", "r")
    for _ in range(3):
        with pytest.raises(OSError):
            faults.hit("read", "r")   # second and every later
    faults.hit("fsync", "dir/x")
    faults.hit("fsync", "x/dir")      # anchored: does not match, does not stall
    assert [r.fired for r in faults.rules] == [1, 3, 1]
    for bad in ("write:0:EIO", "write:x:EIO", "scribble:1:EIO", "write:1:ENOTANERRNO", "write:1"):
        with pytest.raises(ValueError):
            FaultInjector().arm(bad)
    env = {"LOMO_RUN_FAULTS": "rename:1:EIO", "LOMO_RUN_FAULT_TRACE": str(tmp_path / "trace")}
    faults = FaultInjector().load_env(env)
    with pytest.raises(OSError):
        faults.hit("rename", "m")
    faults.hit("unlink", "u")
    faults.disarm()
    assert not faults.active
    assert (tmp_path / "trace").read_text().split("\n")[:3] == [f"B 1 {os.getpid()} rename m", f"B 2 {os.getpid()} unlink u", "A 2"]


def test_io_layer_reports_injected_faults_as_store_errors(tmp_path: Path) -> None:
    buf = aligned_empty(8192)
    path = tmp_path / "f.bin"
    try:
        FAULTS.arm("write:1:ENOSPC:f.bin")
        with pytest.raises(StoreError, match=r"write of .*f\.bin failed: No space left on device"):
            write_file(path, buf, 8192)
        FAULTS.disarm()
        write_file(path, buf, 8192)
        FAULTS.arm("read:1:EIO:f.bin")
        with pytest.raises(StoreError, match=r"read of .*f\.bin at 0 failed: Input/output error"):
            read_into(path, 0, buf, 8192)
        assert read_into(path, 0, buf, 8192) == 8192
    finally:
        FAULTS.disarm()

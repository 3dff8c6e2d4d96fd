"""Crashes: SIGKILL training at chosen and random moments, resume each time, end bit-identical.

The kill points are chosen, not hoped for. Each run arms a stall
(``LOMO_RUN_FAULTS="OP:*:sleep=S:MATCH"``) on one kind of I/O and traces every fault
point to a file; the test waits until the child has reached that point k times
(k random), then kills it inside the stall, i.e. right before the real call. The
targets cover a step end to end:

    read        a unit being read (prefetch or on demand)
    write       a unit file just created, no bytes in it yet
    fsync       a unit file written, not yet fsynced
    commit-*    fsync of units/, the manifest tmp empty, the tmp full but not fsynced,
                the rename, the directory fsync after the rename (step visible, not yet durable)
    unlink      clean-up of superseded generations after a commit
    random      a uniform time after start: startup, store create/open, compute, anything

After each kill the store is inspected without opening it (the manifest's files all
have the right size and checksum; the committed step never goes back), then the next
run resumes (or starts afresh, when the kill came before the first commit). At the
end the run completes and its model must equal an uninterrupted run's bit for bit,
with every step logged exactly once in metrics.jsonl.
"""
from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from fault_harness import (
    Zygote,
    assert_same_weights,
    logged_steps,
    make_job,
    run_cli,
    store_report,
    train_argv,
    weights,
)

STEPS = 300  # more than the kill phase reaches (a few steps of progress per kill)
STALL_S = 0.12  # a stall is long enough for the test to see its trace line and kill inside it

# (label, op, match): the fault points a kill is aimed at.
TARGETS = [
    ("read", "read", "/units/"),
    ("write", "write", "/units/"),
    ("fsync", "fsync", "/units/"),
    ("commit-fsync-units-dir", "fsync", "/units$"),
    ("commit-tmp-empty", "write", "manifest.json.tmp"),
    ("commit-tmp-written", "fsync", "manifest.json.tmp"),
    ("commit-rename", "rename", "/manifest.json"),
    ("commit-renamed", "fsync", "/store$"),
    ("unlink", "unlink", "/units/"),
    ("random", None, None),
    ("random", None, None),
]
ROUNDS = 5  # 5 x 11 = 55 kills


def _matches(op: str, path: str, want_op: str, match: str) -> bool:
    if op != want_op:
        return False
    return path.endswith(match[:-1]) if match.endswith("$") else match in path


class Trace:
    """Follows a fault trace file: ``B seq pid op path`` when a fault point is reached,
    ``A seq`` when the real call goes ahead."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.begun: dict[int, tuple[str, str]] = {}
        self.after: set[int] = set()
        self._partial = b""

    def poll(self) -> list[tuple[int, str, str]]:
        """New ``B`` lines since the last poll: (seq, op, path)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            parts = line.decode().split(" ", 4)
            if parts[0] == "B":
                seq, op, path = int(parts[1]), parts[3], parts[4]
                self.begun[seq] = (op, path)
                new.append((seq, op, path))
            elif parts[0] == "A":
                self.after.add(int(parts[1]))
        return new

    def open_points(self) -> list[tuple[str, str]]:
        """Fault points reached whose real call never went ahead (where the kill landed)."""
        self.poll()
        return [self.begun[s] for s in sorted(self.begun) if s not in self.after]


def _kill_at(zygote: Zygote, argv: list[str], env: dict[str, str], trace: Trace, log: Path,
             target: tuple[str, str | None, str | None], rng: random.Random) -> tuple[int, list[tuple[str, str]]]:
    """Start a run, kill it at ``target``; return its exit status (-9 when killed) and open fault points."""
    label, op, match = target
    pid = zygote.start(argv, env, log)
    deadline = time.monotonic() + 60
    if op is None:
        # From the first fault point on (store create or open, then training), a uniform time
        # of up to ~20 steps: mostly compute, with the I/O and commits in between.
        while time.monotonic() < deadline and not trace.poll() and Path(f"/proc/{pid}").exists():
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.25))
    else:
        skip = rng.randrange(4)  # hit the (skip+1)-th such call: different units and steps
        seen = 0
        while time.monotonic() < deadline:
            hits = [h for h in trace.poll() if _matches(h[1], h[2], op, match)]
            seen += len(hits)
            if seen > skip:
                time.sleep(rng.uniform(0.0, STALL_S / 3))
                break
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.002)
        else:
            raise AssertionError(f"{label}: the run never reached {op} {match}; log:\n{log.read_text()}")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    code = zygote.wait()
    return code, trace.open_points()


@pytest.mark.slow
@pytest.mark.parametrize("commit_every", [1, 3])
def test_sigkill_at_every_phase_then_resume_is_bit_identical(tmp_path: Path, commit_every: int) -> None:
    """With --commit-every 3 a kill also lands between commits, after units were evicted and
    written to the uncommitted generation: resume replays up to two steps from the last commit."""
    job = make_job(tmp_path / "job")
    reference = tmp_path / "reference"
    # The reference commits every step: how often a run commits must not change what it computes.
    proc = run_cli(train_argv(job, reference, "--steps", str(STEPS), "--threads", "1"))
    assert proc.returncode == 0, proc.stderr
    expected = weights(reference / "model")

    out = tmp_path / "killed"
    store = out / "store"
    rng = random.Random(20240611)
    landed: Counter[str] = Counter()
    leftovers_seen = 0
    committed = -1
    kills = 0
    zygote = Zygote()
    try:
        plan = [t for _ in range(ROUNDS) for t in TARGETS]
        for cycle, target in enumerate(plan):
            label, op, match = target
            resume = (store / "manifest.json").exists()
            argv = train_argv(job, out, "--steps", str(STEPS), "--threads", "1", "--commit-every", str(commit_every),
                              *(["--resume"] if resume else []))
            trace_file = tmp_path / f"trace-{cycle}.txt"
            env = {"LOMO_RUN_FAULT_TRACE": str(trace_file)}
            if op is not None:
                env["LOMO_RUN_FAULTS"] = f"{op}:*:sleep={STALL_S}:{match}"
            log = tmp_path / f"run-{cycle}.log"
            code, open_points = _kill_at(zygote, argv, env, Trace(trace_file), log, target, rng)
            assert code == -signal.SIGKILL, f"cycle {cycle} ({label}): run ended by itself with {code}:\n{log.read_text()}"
            kills += 1
            if op is not None:
                # The kill landed inside the stall of the aimed-at call (threads may have others open).
                assert any(_matches(o, p, op, match) for o, p in open_points), (cycle, label, open_points)
                landed[label] += 1
            else:
                landed["random: in " + (open_points[-1][0] if open_points else "compute/other")] += 1
            if (store / "manifest.json").exists():
                report = store_report(store)  # every named file intact, checked without opening the store
                assert report["step"] >= committed, f"cycle {cycle} ({label}): the committed step went back"
                committed = report["step"]
                leftovers_seen += bool(report["leftovers"] or report["tmp_manifest"])
        # Finish the run, undisturbed.
        argv = train_argv(job, out, "--steps", str(STEPS), "--threads", "1", "--commit-every", str(commit_every),
                          "--resume")
        code, output = zygote.run(argv, {}, tmp_path / "final.log")
        assert code == 0, output
    finally:
        zygote.close()

    assert kills >= 50
    assert_same_weights(weights(out / "model"), expected, f"after {kills} kills")
    assert logged_steps(out) == list(range(1, STEPS + 1))
    report = store_report(store)
    assert report["step"] == STEPS and not report["leftovers"]
    assert leftovers_seen > 0  # some kills did leave partial or uncommitted files for resume to clear
    print(f"{kills} kills, last committed step before the final run {committed}; landed: {dict(landed)}; "
          f"kills that left uncommitted files behind: {leftovers_seen}")

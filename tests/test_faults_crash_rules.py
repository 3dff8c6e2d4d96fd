"""Crash and resume beyond fp32 SGD: AdamW, AdaLomo, bf16 with stochastic rounding and fp32 master
weights, and gradient accumulation killed between micro-batches.

Each configuration trains the fault suite's tiny job (tests/fault_harness.py) with
`--commit-every 2` under a weights budget of the embedding plus one block (the rule's state,
master weights and accumulation buffers stream with the units, so every step evicts, writes
and re-reads them). The run is SIGKILLed twice at chosen points, each time resumed with
`--resume`, and then finishes; its exported model must equal an uninterrupted run's bit for
bit, and every step must be logged exactly once.

The kill points are exact, not timed: a fork server (like `fault_harness.Zygote`) patches the
child's `Runtime` so the child SIGKILLs itself

- ``apply:N``: right after the N-th fused update of the process, in the middle of a step's
  backward (units of that step updated in memory, some written to the uncommitted generation);
- ``backward:N``: right after the N-th `Runtime.backward` call returns; with
  `--grad-accum-steps 2` an odd N is the first micro-batch of a step: between micro-batches,
  with the accumulated gradient in the units' buffers and nothing applied yet.

Both land between commits (steps 2k+1), so resume must replay from an older commit.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fault_harness import REPO, ZYGOTE_LOOP, ZYGOTE_PRELUDE, Zygote, assert_same_weights, logged_steps, make_job, store_report, train_argv, weights

STEPS = 8
PARAMS = 20  # tensors of the tiny tied Llama: one fused update each per step

_SERVER = ZYGOTE_PRELUDE + r"""


def arm_kill(spec):
    what, n = spec.split(":")
    n = int(n)
    name = {"backward": "backward", "apply": "_apply"}[what]
    cls = lomo_runtime.runtime.Runtime
    original = getattr(cls, name)
    calls = [0]

    def patched(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            sys.stdout.flush(); sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(cls, name, patched)


def before_main(req):
    if req["env"].get("LOMO_TEST_KILL"):
        arm_kill(req["env"]["LOMO_TEST_KILL"])
""" + ZYGOTE_LOOP


class KillServer(Zygote):
    """`fault_harness.Zygote` whose children honour LOMO_TEST_KILL=apply:N | backward:N."""

    def __init__(self) -> None:  # noqa: D107 - same protocol as Zygote, another child script
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"fork server did not start: {ready!r}")


@pytest.fixture(scope="module")
def server():
    s = KillServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return make_job(tmp_path_factory.mktemp("crash-rules") / "job", examples=80)


# (id, extra train flags, first kill, second kill). Budgets: the embedding plus one block, state included.
CASES = [
    ("adamw", ["--rule", "adamw", "--weight-decay", "0.1", "--lr", "0.01", "--weights-budget", "196608"],
     f"apply:{2 * PARAMS + 7}", "backward:3"),
    ("adalomo", ["--rule", "adalomo", "--lr", "0.01", "--weights-budget", "139264"],
     f"apply:{2 * PARAMS + 13}", "backward:3"),
    ("bf16-sr-master", ["--dtype", "bf16", "--stochastic-rounding", "--master-weights", "--lr", "0.01",
                        "--weights-budget", "110592"],
     f"apply:{2 * PARAMS + 5}", "backward:3"),
    # backward:5 is the first micro-batch of the process's third step (steps 3, 4, 5 after resuming at 2).
    ("accumulation", ["--grad-accum-steps", "2", "--weights-budget", "131072"], "backward:5", "backward:3"),
    ("accumulation-adamw-clip", ["--grad-accum-steps", "2", "--rule", "adamw", "--lr", "0.01",
                                 "--clip-grad-norm", "0.5", "--weights-budget", "262144"],
     f"apply:{2 * PARAMS + 9}", "backward:3"),
]


def _argv(job, out: Path, extra: list[str], resume: bool) -> list[str]:
    return train_argv(job, out, "--steps", str(STEPS), "--threads", "1", "--commit-every", "2", *extra,
                      *(["--resume"] if resume else []))


@pytest.mark.parametrize("extra,first,second", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_killed_twice_then_resumed_is_bit_identical(server, job, tmp_path: Path, extra, first, second) -> None:
    reference = tmp_path / "reference"
    code, output = server.run(_argv(job, reference, extra, resume=False), {}, tmp_path / "reference.log")
    assert code == 0, output
    expected = weights(reference / "model")
    assert logged_steps(reference) == list(range(1, STEPS + 1))

    out = tmp_path / "killed"
    committed = []
    for i, kill in enumerate((first, second)):
        resume = (out / "store" / "manifest.json").exists()
        code, output = server.run(_argv(job, out, extra, resume), {"LOMO_TEST_KILL": kill}, tmp_path / f"kill{i}.log")
        assert code == -signal.SIGKILL, f"kill {kill}: the run ended by itself with {code}:\n{output}"
        report = store_report(out / "store")  # every file the manifest names intact
        committed.append(report["step"])
        # The kill came between commits, after at least one commit of this process's work.
        assert 0 < report["step"] < STEPS, report
        assert logged_steps(out)[-1] >= report["step"]
        if kill.startswith("apply"):
            # Mid-backward, under a budget that streams: evicted units of the interval were written to
            # the uncommitted generation, which the resume must discard.
            assert report["leftovers"], report
    assert committed[1] >= committed[0]
    code, output = server.run(_argv(job, out, extra, resume=True), {}, tmp_path / "final.log")
    assert code == 0, output
    assert_same_weights(weights(out / "model"), expected, f"killed at {first} and {second}, resumed")
    assert logged_steps(out) == list(range(1, STEPS + 1))
    report = store_report(out / "store")
    assert report["step"] == STEPS and not report["leftovers"]
    manifest = json.loads((out / "store" / "manifest.json").read_text())
    state_keys = {t["name"].split("::")[1] for u in manifest["units"] for t in u["tensors"] if "::" in t["name"]}
    print(f"committed at the kills: {committed}; state streamed with the units: {sorted(state_keys)}")

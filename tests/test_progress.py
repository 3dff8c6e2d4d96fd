"""Progress display and the crash-safe metrics file."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_model
from lomo_runtime.checkpoint import Checkpoint, export_hf
from lomo_runtime.errors import UserError
from lomo_runtime.progress import MetricsWriter, Progress, WorkProgress, read_metrics
from lomo_runtime.sizes import format_size
from lomo_runtime.store import WorkingStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- progress line


def test_non_tty_prints_a_line_every_n_steps() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(10, stream=stream, every=4, is_tty=False, clock=clock)
    for step in range(1, 11):
        clock.now += 2.0
        progress.update(step, loss=1.0 / step, tokens=500)
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 4/10", "step 8/10", "step 10/10"]
    assert "\r" not in stream.getvalue()


def test_line_shows_loss_rate_memory_and_eta() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(100, stream=stream, every=1, is_tty=False, clock=clock)
    clock.now += 40.0  # 4 steps in 40 s: 10 s/step, 96 steps left -> 960 s
    for step in range(1, 5):
        progress.update(step, loss=2.5, tokens=1000, peak_bytes=3 * 1024**3)
    last = stream.getvalue().splitlines()[-1]
    assert last == "step 4/100 | loss 2.5000 | 100 tok/s | peak 3 GiB | eta 16m00s"


def test_eta_counts_only_steps_of_this_process_after_resume() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(100, start_step=50, stream=stream, every=1, is_tty=False, clock=clock)
    clock.now += 10.0
    progress.update(51, loss=1.0, tokens=10)
    assert stream.getvalue().rstrip().endswith("eta 8m10s")  # 49 steps left at 10 s each


def test_peak_defaults_to_process_rss() -> None:
    stream = io.StringIO()
    progress = Progress(1, stream=stream, is_tty=False)
    progress.update(1, loss=1.0, tokens=1)
    peak = stream.getvalue().split(" | ")[3]
    assert peak.startswith("peak ") and peak != "peak 0 B"


def test_tty_redraws_in_place_and_close_ends_line() -> None:
    stream = io.StringIO()
    progress = Progress(4, stream=stream, is_tty=True, clock=FakeClock())
    progress.update(1, loss=1.0, tokens=1)
    progress.update(2, loss=1.0, tokens=1)
    progress.write("eval loss 0.9")
    progress.close()
    out = stream.getvalue()
    assert out.count("\r") == 2 and "[##########..........]" in out
    assert out.endswith("\neval loss 0.9\n")


def test_not_a_tty_detected_from_stream() -> None:
    assert Progress(10, stream=io.StringIO()).is_tty is False


# --------------------------------------------------------------------------- long work (store creation, export)

MiB = 1024**2


def test_work_progress_prints_at_most_every_interval_then_a_summary() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = WorkProgress("creating working store", 1200 * MiB, stream=stream, min_interval_s=2.0,
                            is_tty=False, clock=clock)
    for unit in range(10):  # one 120 MiB unit every 0.5 s: 240 MiB/s
        clock.now += 0.5
        progress.update((unit + 1) * 120 * MiB, f"block.{unit}")
    progress.close()
    progress.close()  # idempotent
    assert stream.getvalue().splitlines() == [
        "creating working store: 480 MiB / 1.17 GiB (40%), 240 MiB/s, ETA 3s (block.3)",
        "creating working store: 960 MiB / 1.17 GiB (80%), 240 MiB/s, ETA 1s (block.7)",
        "creating working store: 1.17 GiB in 5s (240 MiB/s)",
    ]


def test_work_progress_without_total_shows_bytes_and_rate() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = WorkProgress("exporting", stream=stream, min_interval_s=1.0, is_tty=False, clock=clock)
    clock.now += 4.0
    progress.update(3 * 1024**3)
    assert stream.getvalue() == "exporting: 3 GiB, 768 MiB/s\n"


def test_work_progress_total_given_late_and_clamped() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = WorkProgress("exporting", stream=stream, min_interval_s=0.0, is_tty=False, clock=clock)
    clock.now += 1.0
    progress.update(100 * MiB, total_bytes=400 * MiB)
    clock.now += 1.0
    progress.update(404 * MiB)  # a caller's total a few MiB short: never over 100%, never a negative ETA
    assert stream.getvalue().splitlines() == [
        "exporting: 100 MiB / 400 MiB (25%), 100 MiB/s, ETA 3s",
        "exporting: 404 MiB / 400 MiB (100%), 202 MiB/s, ETA 0s",
    ]


def test_short_work_prints_nothing() -> None:
    stream, clock = io.StringIO(), FakeClock()
    with WorkProgress("creating working store", 10 * MiB, stream=stream, is_tty=False, clock=clock) as progress:
        clock.now += 0.25
        progress.update(10 * MiB, "head")
    assert stream.getvalue() == ""


def test_work_longer_than_the_interval_prints_the_summary() -> None:
    stream, clock = io.StringIO(), FakeClock()
    with WorkProgress("creating working store", 10 * MiB, stream=stream, is_tty=False, clock=clock,
                      min_interval_s=2.0):
        clock.now += 2.5
    assert stream.getvalue() == "creating working store: 0 B in 2s (0 B/s)\n"


def test_work_progress_redraws_in_place_on_a_tty() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = WorkProgress("creating working store", 2 * MiB, stream=stream, is_tty=True, clock=clock)
    for done in (1, 2):
        clock.now += 2.0
        progress.update(done * MiB)
    progress.close()
    out = stream.getvalue()
    assert out.count("\r") == 3 and out.count("\n") == 1 and out.endswith("\x1b[K\n")
    assert out.split("\r")[-1] == "creating working store: 2 MiB in 4s (512 KiB/s)\x1b[K\n"


def test_store_creation_and_export_feed_the_display(tmp_path: Path) -> None:
    """The calls the trainer makes: ``on_unit`` of ``WorkingStore.create`` and ``on_tensor`` of
    ``export_hf`` drive a ``WorkProgress`` to its total."""
    ckpt = Checkpoint.open(make_tiny_model(tmp_path, "llama", tied=True))
    units = [(u.name, [(t, (lambda t=t: ckpt.read_tensor(t))) for t in u.tensor_names]) for u in ckpt.units]
    stream = io.StringIO()
    created = WorkProgress("creating working store", ckpt.nbytes, stream=stream, min_interval_s=0.0, is_tty=False)
    store = WorkingStore.create(tmp_path / "store", units, {}, on_unit=lambda name, n, done: created.update(done, name))
    created.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(ckpt.units) + 1 and lines[-2].endswith("(head)")
    assert created.done_bytes == sum(rec.nbytes for rec in store.units.values()) >= ckpt.nbytes

    calls: list[tuple[str, int, int, int]] = []
    exported = WorkProgress("exporting", stream=stream, min_interval_s=0.0, is_tty=False)

    def on_tensor(name: str, n: int, done: int, total: int) -> None:
        calls.append((name, n, done, total))
        exported.update(done, name, total_bytes=total)

    with store:
        export_hf(tmp_path / "out", ckpt.config, store.iter_tensors(), None, max_shard_bytes="30KB", on_tensor=on_tensor)
    exported.close()
    assert [c[1] for c in calls] == list(range(1, len(ckpt.tensors) + 1))
    assert calls[-1][2] == calls[-1][3] == ckpt.nbytes  # a single-dtype model: the estimate is exact
    assert all(total == ckpt.nbytes for *_, total in calls)
    assert stream.getvalue().splitlines()[-1].startswith(f"exporting: {format_size(ckpt.nbytes)} in ")


# --------------------------------------------------------------------------- metrics.jsonl


def test_write_then_read(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        writer.write({"step": 1, "loss": 2.0, "tokens": 10})
        writer.write({"step": 2, "loss": torch.tensor(1.5), "tokens": 10})
    assert read_metrics(path) == [{"step": 1, "loss": 2.0, "tokens": 10}, {"step": 2, "loss": 1.5, "tokens": 10}]


def test_non_finite_values_are_written_as_null(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        writer.write({"step": 1, "loss": float("nan"), "grad_norm": torch.tensor(float("inf"))})
    assert path.read_text() == '{"step": 1, "loss": null, "grad_norm": null}\n'


def test_record_without_step_is_refused(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path / "metrics.jsonl") as writer, pytest.raises(ValueError, match="step"):
        writer.write({"loss": 1.0})


def test_reader_skips_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]


def test_reader_rejects_damage_before_the_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(UserError, match=f"{path}:2: damaged metrics line"):
        read_metrics(path)


def test_writer_cuts_a_crash_fragment_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    with MetricsWriter(path) as writer:
        writer.write({"step": 2})
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_truncate_after_step_drops_uncommitted_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        for step in range(1, 6):
            writer.write({"step": step})
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # and a crash mid-line
    with MetricsWriter(path, truncate_after_step=3) as writer:
        writer.write({"step": 4, "resumed": True})
    assert read_metrics(path) == [{"step": 1}, {"step": 2}, {"step": 3}, {"step": 4, "resumed": True}]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_truncate_after_step_on_missing_file_creates_it(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path / "metrics.jsonl", truncate_after_step=0) as writer:
        writer.write({"step": 1})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1}]


_WRITER_LOOP = """
import sys
from lomo_runtime.progress import MetricsWriter
writer = MetricsWriter(sys.argv[1])
step = 0
while True:
    step += 1
    writer.write({"step": step, "loss": 1.0 / step, "note": "x" * 200})
    if step == 50:
        print("ready", flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_writer_leaves_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    repo = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER_LOOP, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    records = read_metrics(path)
    assert len(records) >= 50
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    for line in path.read_text().splitlines()[:-1]:
        json.loads(line)


def test_a_long_step_prints_where_it_is(tmp_path: Path, monkeypatch) -> None:
    """Inside a step past PROGRESS_AFTER_S the runtime prints one line per PROGRESS_EVERY_S,
    naming the phase and unit; a library user without a progress stream gets nothing."""
    import torch

    from helpers import make_tiny_model
    from lomo_runtime import SGD, Runtime

    model_dir = make_tiny_model(tmp_path, "llama", tied=True)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(Runtime, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(Runtime, "PROGRESS_EVERY_S", 0.0)
    stream = io.StringIO()
    with Runtime(model_dir, SGD(lr=0.01), work_dir=tmp_path / "w", progress_stream=stream) as rt:
        rt.backward(rt.model(input_ids=ids, labels=ids).loss)
    lines = stream.getvalue().splitlines()
    assert any("step 1: forward" in l and "(block.0)" in l for l in lines), lines
    assert any("step 1: backward" in l and "(embed)" in l for l in lines), lines
    with Runtime(model_dir, SGD(lr=0.01), work_dir=tmp_path / "quiet") as rt:  # no stream: silent
        rt.backward(rt.model(input_ids=ids, labels=ids).loss)

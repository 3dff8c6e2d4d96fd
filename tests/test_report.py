"""`lomo-run report OUT_DIR`: the PNG, the JSON summary's figures, bad input, and a real tiny run."""
from __future__ import annotations

import json
import random
import statistics
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import make_tiny_model, save_char_tokenizer
from lomo_runtime.cli import main

MiB = 2**20
PHASES = ("forward_s", "backward_s", "read_wait_s", "write_wait_s", "commit_s")

# Kept steps 1..5: 1-2 with every phase field, 3 with some, 4 with none, 5 a line written back after
# a crash (no timing). One dropped attempt (logged under the last committed step, 2), eval lines with
# and without a loss, and the final eval lines the trainer appends.
LINES: list[dict[str, Any]] = [
    {"step": 1, "loss": 3.0, "tokens": 64, "lr": 0.05, "step_time_s": 0.5, "tokens_per_s": 128.0,
     "peak_host_bytes": 100 * MiB, "peak_device_bytes": 100 * MiB, "weights_resident_peak_bytes": 20 * MiB,
     "forward_s": 0.2, "backward_s": 0.2, "read_wait_s": 0.03, "write_wait_s": 0.02, "commit_s": 0.05,
     "committed": True, "dropped": False, "dropped_total": 0, "eval_loss": 3.1},
    {"step": 2, "loss": 2.5, "tokens": 64, "step_time_s": 0.4, "peak_host_bytes": 110 * MiB,
     "weights_resident_peak_bytes": 22 * MiB, "forward_s": 0.15, "backward_s": 0.15, "read_wait_s": 0.01,
     "write_wait_s": 0.0, "commit_s": 0.0, "committed": False, "dropped": False},
    {"step": 2, "loss": None, "tokens": 64, "step_time_s": 0.3, "peak_host_bytes": 130 * MiB,
     "dropped": True, "dropped_total": 1, "dropped_reason": "non-finite loss"},
    {"step": 3, "loss": 2.2, "tokens": 64, "step_time_s": 0.6, "peak_host_bytes": 120 * MiB,
     "weights_resident_peak_bytes": 21 * MiB, "forward_s": 0.25, "commit_s": 0.1, "committed": True,
     "dropped": False, "eval_loss": 2.4},
    {"step": 3, "eval_loss": 2.35},
    {"step": 4, "loss": 2.1, "tokens": 64, "step_time_s": 0.8, "peak_host_bytes": 118 * MiB, "dropped": False},
    {"step": 5, "loss": 2.0, "tokens": 64, "loss_tokens": 60, "lr": 0.05, "recovered": True},
    {"step": 5, "final_eval_loss": 2.05},
    {"step": 5, "final_eval_accuracy": 0.5, "final_eval_choice_loss": 1.2},
]
PLAN = {"fits": True, "model_type": "llama", "device": "cpu", "dtype": "fp32", "rule": "sgd", "seq_len": 32,
        "batch_size": 2, "peak_host_bytes": 125 * MiB, "peak_device_bytes": 125 * MiB,
        "memory": {"framework_bytes": 90 * MiB, "weights_resident_bytes": 24 * MiB, "staging_bytes": 24 * MiB}}


def write_run(out: Path, lines: list[dict[str, Any]] = LINES, plan: dict[str, Any] | str | None = PLAN) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if plan is not None:
        (out / "plan.json").write_text(plan if isinstance(plan, str) else json.dumps(plan))
    return out


def run_report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", *args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def png_size(path: Path) -> tuple[int, int]:
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert blob[12:16] == b"IHDR"
    return struct.unpack(">II", blob[16:24])


def assert_png(path: Path) -> None:
    import matplotlib.image

    width, height = png_size(path)
    assert 600 <= width <= 4000 and 600 <= height <= 4000, (width, height)
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01  # something was drawn


def test_report_figures_match_the_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write_run(tmp_path / "run")
    code, stdout, stderr = run_report(capsys, str(out))
    assert code == 0, stderr
    assert stderr == ""
    assert_png(out / "report.png")
    summary = json.loads((out / "report.json").read_text())

    kept = [r for r in LINES if "loss" in r and not r.get("dropped")]
    timed = [r for r in kept if "step_time_s" in r]
    training = [r for r in LINES if "loss" in r]
    assert summary["steps"] == len(kept) == 5
    assert (summary["first_step"], summary["last_step"]) == (1, 5)
    assert summary["dropped"] == 1 and summary["dropped_steps"] == [3]
    assert summary["recovered"] == 1
    assert summary["first_loss"] == 3.0 and summary["final_loss"] == 2.0
    assert summary["eval_loss"] == 2.35  # the last eval: by step, then in file order
    assert summary["final_eval_loss"] == 2.05 and summary["final_eval_accuracy"] == 0.5
    assert summary["median_step_time_s"] == pytest.approx(statistics.median(r["step_time_s"] for r in timed))
    rates = [r.get("tokens_per_s", r["tokens"] / r["step_time_s"]) for r in timed]
    assert summary["median_tokens_per_s"] == pytest.approx(statistics.median(rates))
    measured = max(r["peak_host_bytes"] for r in training if "peak_host_bytes" in r)
    assert measured == 130 * MiB  # the dropped attempt's peak counts: that memory was used
    assert summary["peak_host_bytes_measured"] == measured
    assert summary["peak_host_bytes_planned"] == PLAN["peak_host_bytes"]
    assert summary["peak_host_ratio"] == pytest.approx(measured / PLAN["peak_host_bytes"])
    assert summary["weights_resident_peak_bytes_measured"] == 22 * MiB
    assert summary["weights_resident_bytes_planned"] == 24 * MiB
    assert summary["weights_resident_ratio"] == pytest.approx(22 / 24)
    total = sum(r["step_time_s"] for r in timed)
    assert summary["total_step_time_s"] == pytest.approx(total)
    assert summary["phase_breakdown"] is True
    shares = summary["phase_share"]
    for phase in PHASES:
        assert shares[phase] == pytest.approx(sum(r.get(phase, 0.0) for r in timed) / total), phase
    other = sum(r["step_time_s"] - sum(r.get(p, 0.0) for p in PHASES) for r in timed)
    assert shares["other"] == pytest.approx(other / total)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert summary["committed_steps"] == 2
    assert summary["plan"] is True and summary["warnings"] == []

    # The text summary carries the same figures.
    assert "5 kept" in stdout and "1 dropped" in stdout
    assert "median 0.55 s" in stdout
    assert f"measured/planned {measured / PLAN['peak_host_bytes']:.3f}" in stdout
    assert "forward" in stdout and "other" in stdout


def test_output_flag_and_no_phase_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = [{k: v for k, v in r.items() if k not in PHASES and k not in ("committed", "tokens_per_s")} for r in LINES]
    out = write_run(tmp_path / "run", bare)
    png = tmp_path / "plots" / "mine.png"
    code, stdout, stderr = run_report(capsys, str(out), "--output", str(png), "--json")
    assert code == 0, stderr
    assert_png(png)
    assert not (out / "report.png").exists()
    summary = json.loads((tmp_path / "plots" / "mine.json").read_text())
    assert json.loads(stdout) == summary
    assert summary["phase_breakdown"] is False and summary["phase_share"] is None
    assert summary["committed_steps"] is None  # no line says, so nothing is claimed
    timed = [r for r in bare if "loss" in r and not r.get("dropped") and "step_time_s" in r]
    # Without tokens_per_s the rate is tokens / step_time_s.
    assert summary["median_tokens_per_s"] == pytest.approx(statistics.median(r["tokens"] / r["step_time_s"] for r in timed))


def test_text_summary_says_when_phases_are_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write_run(tmp_path / "run", [{k: v for k, v in r.items() if k not in PHASES} for r in LINES])
    code, stdout, stderr = run_report(capsys, str(out))
    assert code == 0, stderr
    assert "not recorded" in stdout and "step_time_s only" in stdout


@pytest.mark.parametrize("plan_text,why", [("{not json", "not readable JSON"), ('["a list"]', "peak_host_bytes"),
                                           ('{"peak_host_bytes": "lots"}', "peak_host_bytes"), (None, "no plan")])
def test_missing_or_damaged_plan_warns_and_plots_without_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            plan_text: str | None, why: str) -> None:
    out = write_run(tmp_path / "run", plan=plan_text)
    code, stdout, stderr = run_report(capsys, str(out))
    assert code == 0, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and str(out / "plan.json") in lines[0], stderr
    assert why in lines[0]
    assert_png(out / "report.png")
    summary = json.loads((out / "report.json").read_text())
    assert summary["plan"] is False and summary["peak_host_bytes_planned"] is None and summary["peak_host_ratio"] is None
    assert summary["peak_host_bytes_measured"] == 130 * MiB
    assert "no plan" in stdout


def _no_dir(tmp: Path) -> tuple[Path, str]:
    return tmp / "missing", str(tmp / "missing")


def _no_metrics(tmp: Path) -> tuple[Path, str]:
    (tmp / "run").mkdir()
    return tmp / "run", str(tmp / "run" / "metrics.jsonl")


def _empty_metrics(tmp: Path) -> tuple[Path, str]:
    out = write_run(tmp / "run", [])
    return out, str(out / "metrics.jsonl")


def _only_evals(tmp: Path) -> tuple[Path, str]:
    out = write_run(tmp / "run", [r for r in LINES if "loss" not in r])
    return out, str(out / "metrics.jsonl")


def _damaged_line(tmp: Path) -> tuple[Path, str]:
    out = write_run(tmp / "run")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = '{"step": 3, "loss": 2.\n'
    (out / "metrics.jsonl").write_text("".join(lines))
    return out, f"{out / 'metrics.jsonl'}:3"


def _a_file(tmp: Path) -> tuple[Path, str]:
    (tmp / "file").write_text("x")
    return tmp / "file", str(tmp / "file")


@pytest.mark.parametrize("make", [_no_dir, _no_metrics, _empty_metrics, _only_evals, _damaged_line, _a_file],
                         ids=["no-dir", "no-metrics", "empty-metrics", "only-eval-lines", "damaged-line", "not-a-dir"])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], make) -> None:
    out, named = make(tmp_path)
    code, stdout, stderr = run_report(capsys, str(out))
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], stderr
    assert not (Path(out) / "report.png").exists() if Path(out).is_dir() else True


def test_output_must_be_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write_run(tmp_path / "run")
    code, _, stderr = run_report(capsys, str(out), "--output", str(tmp_path / "r.pdf"))
    assert code == 2 and "--output" in stderr and len(stderr.strip().splitlines()) == 1


def test_truncated_last_line_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A crash mid-write leaves an unterminated tail; the report reads what was written whole."""
    out = write_run(tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.')
    code, _, stderr = run_report(capsys, str(out))
    assert code == 0, stderr
    assert json.loads((out / "report.json").read_text())["last_step"] == 5


def test_library_call_and_cli_import_stay_light(tmp_path: Path) -> None:
    from lomo_runtime.report import write_report

    summary = write_report(write_run(tmp_path / "run"))
    assert summary["steps"] == 5 and Path(summary["png"]).exists()
    # Registering the commands (what `lomo-run --help` does) must not import matplotlib.
    probe = "import sys; from lomo_runtime.cli import _register; _register(); print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_report_on_a_real_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_tiny_model(tmp_path, arch="llama", tied=True, sharded=True)
    save_char_tokenizer(model)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    rng = random.Random(0)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(12))}) + "\n"
                            for _ in range(100)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "4",
              "--eval-every", "2", "--seq-len", "32", "--batch-size", "2", "--lr", "0.05",
              "--weights-budget", "70KB", "--seed", "3", "--threads", "1"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    capsys.readouterr()

    code, stdout, stderr = run_report(capsys, str(out))
    assert code == 0, stderr
    assert stderr == ""
    assert_png(out / "report.png")
    summary = json.loads((out / "report.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    plan = json.loads((out / "plan.json").read_text())
    assert summary["steps"] == 4 and summary["dropped"] == 0
    assert summary["final_loss"] == pytest.approx(steps[-1]["loss"])
    assert summary["eval_loss"] == pytest.approx([r["eval_loss"] for r in steps if "eval_loss" in r][-1])
    assert summary["median_step_time_s"] == pytest.approx(statistics.median(r["step_time_s"] for r in steps))
    measured = max(r["peak_host_bytes"] for r in steps)
    assert summary["peak_host_bytes_measured"] == measured
    assert summary["peak_host_bytes_planned"] == plan["peak_host_bytes"]
    assert summary["peak_host_ratio"] == pytest.approx(measured / plan["peak_host_bytes"])
    assert 0.3 < summary["peak_host_ratio"] < 3  # the planner is meant to be within 10%; this only checks the wiring
    assert summary["weights_resident_bytes_planned"] == plan["memory"]["weights_resident_bytes"]
    # Whether the phase fields have landed in the trainer or not, the shares (if any) add up to the step time.
    if summary["phase_share"] is not None:
        assert sum(summary["phase_share"].values()) >= 0.99
    assert "peak host" in stdout

"""`lomo-run train` end to end: outputs, resume after SIGKILL, bad input."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fault_harness import make_job

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_job(tmp_path_factory.mktemp("job"))


def _train_cmd(job: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-c", "from lomo_runtime.cli import main; main()", "train",
        "--model", str(job["model"]), "--data", str(job["data"]), "--out", str(out),
        "--seq-len", "32", "--batch-size", "2", "--lr", "0.05", "--weights-budget", "70KB", "--seed", "3",
        "--threads", "1", *extra,
    ]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_train_writes_metrics_plan_and_loadable_model(job: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    proc = _run(_train_cmd(job, out, "--steps", "6"))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "tokens", "step_time_s", "peak_host_bytes", "peak_device_bytes", "io_read_bytes", "io_write_bytes"):
        assert key in steps[0], key
    assert steps[-1]["loss"] < steps[0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (out / "config.yaml").exists()


def test_kill_9_then_resume_matches_uninterrupted_run(job: dict[str, Path], tmp_path: Path) -> None:
    steps = "25"
    reference = tmp_path / "reference"
    proc = _run(_train_cmd(job, reference, "--steps", steps))
    assert proc.returncode == 0, proc.stderr
    expected = _weights(reference / "model")

    rng = random.Random(7)
    for attempt in range(3):
        out = tmp_path / f"killed-{attempt}"
        child = subprocess.Popen(_train_cmd(job, out, "--steps", steps), cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait until training has committed at least one step, then kill at a random moment.
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        child.send_signal(signal.SIGKILL)
        child.wait()
        resumed = _run(_train_cmd(job, out, "--steps", steps, "--resume"))
        assert resumed.returncode == 0, resumed.stderr
        got = _weights(out / "model")
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), f"attempt {attempt}: {name} differs after resume"
        steps_logged = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
        assert steps_logged == list(range(1, int(steps) + 1))


@pytest.mark.parametrize(
    "extra,code,message",
    [
        (("--steps", "0"), 2, "--steps"),
        (("--lr", "-1"), 2, "--lr"),
        (("--seq-len", "100000"), 2, "maximum positions"),
        (("--memory-budget", "lots"), 2, "memory-budget"),
        (("--weights-budget", "4KB", "--steps", "1"), 3, "raise it to at least"),
        (("--memory-budget", "100MiB", "--steps", "1"), 3, "smallest budget that runs this job"),
        (("--rule", "adam"), 2, "--rule"),
        (("--grad-accum-steps", "0"), 2, "--grad-accum-steps"),
        (("--device", "tpu"), 2, "--device must be cpu, cuda or cuda:N"),
        (("--host-memory-budget", "1GiB"), 2, "--host-memory-budget is for --device cuda"),
        *([] if torch.cuda.is_available() else [(("--device", "cuda", "--steps", "1"), 2, "no CUDA device")]),
    ],
)
def test_bad_flags_exit_with_clear_message(job: dict[str, Path], tmp_path: Path, extra: tuple[str, ...], code: int, message: str) -> None:
    cmd = _train_cmd(job, tmp_path / "out", *extra)
    # Later flags win in click, so the override comes last.
    proc = _run(cmd)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_and_empty_data_file(job: dict[str, Path], tmp_path: Path) -> None:
    missing = dict(job, data=tmp_path / "nope.jsonl")
    proc = _run(_train_cmd(missing, tmp_path / "out1", "--steps", "1"))
    assert proc.returncode == 2 and "nope.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = _run(_train_cmd(dict(job, data=empty), tmp_path / "out2", "--steps", "1"))
    assert proc.returncode == 2 and "empty.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_second_run_on_same_output_is_refused_while_first_holds_it(job: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = subprocess.Popen(_train_cmd(job, out, "--steps", "400"), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.05)
        proc = _run(_train_cmd(job, out, "--steps", "400", "--resume"))
        assert proc.returncode == 2, proc.stderr
        assert "in use" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        first.kill()
        first.wait()


def test_eval_data_scores_multiple_choice_during_training(job: dict[str, Path], tmp_path: Path) -> None:
    choices = tmp_path / "choices.jsonl"
    choices.write_text("".join(
        json.dumps({"prompt": "the quick brown", "completion": f" {w}", "choices": [" fox", " dog", " hex"]}) + "\n"
        for w in ("fox", "dog", "hex")))
    out = tmp_path / "out"
    proc = _run(_train_cmd(job, out, "--steps", "4", "--eval-every", "2", "--eval-data", str(choices)))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in scored] == [2, 4]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 and r["eval_choice_loss"] > 0 for r in scored)
    assert records[-1]["final_eval_accuracy"] == scored[-1]["eval_accuracy"]  # step 4's scores, not a second pass
    assert records[-1]["final_eval_choice_loss"] == scored[-1]["eval_choice_loss"]


def test_export_command_writes_the_committed_step(job: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(_train_cmd(job, out, "--steps", "3")).returncode == 0
    cmd = [sys.executable, "-c", "from lomo_runtime.cli import main; main()", "export",
           "--store", str(out / "store"), "--out", str(tmp_path / "exported")]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr
    got, expected = _weights(tmp_path / "exported"), _weights(out / "model")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    missing = _run(cmd[:4] + ["--store", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert missing.returncode == 2 and "not a lomo-run store" in missing.stderr and "Traceback" not in missing.stderr


def test_a_budget_governed_command_line_is_recognised_before_torch_loads(tmp_path: Path) -> None:
    """`lomo-run train` under a memory budget turns MKL's buffer cache off before torch is
    imported (cli.main): which command lines count."""
    from lomo_runtime.cli import _budget_governed

    yaml_with, yaml_without = tmp_path / "a.yaml", tmp_path / "b.yaml"
    yaml_with.write_text("memory_budget: 2GiB\nsteps: 3\n")
    yaml_without.write_text("steps: 3\n")
    assert _budget_governed(["train", "--memory-budget", "2GiB"])
    assert _budget_governed(["train", "--memory-budget=2GiB"])
    assert _budget_governed(["train", "--config", str(yaml_with)])
    assert not _budget_governed(["train", "--config", str(yaml_without)])
    assert not _budget_governed(["train", "--weights-budget", "1MB"])
    assert not _budget_governed(["plan", "--memory-budget", "2GiB"])

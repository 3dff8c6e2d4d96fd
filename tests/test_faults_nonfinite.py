"""Non-finite values through `lomo-run train`: a NaN loss or gradient drops the step whole.

The runs go through the CLI entry point (`lomo_runtime.cli.main`) in this process, with
NaN injected at chosen training steps by wrapping the runtime: a NaN loss (the loss
times NaN), or a NaN gradient that reaches only the input embedding, the last unit
backward visits, so the head and both blocks have already been updated and written
back when the NaN shows up and must be rolled back.

Every example of the data is the same 31 characters (32 tokens with </s> = --seq-len),
so every batch is identical and a dropped step followed by the next batch is the same
as the step without the NaN: the run with drops must end bit-identical to a clean one.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fault_harness import assert_same_weights, store_report, train_in_process, weights
from helpers import NanGrad, make_tiny_model, save_char_tokenizer
from lomo_runtime.runtime import Runtime

STEPS = 6


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nonfinite")
    model = make_tiny_model(root, arch="llama", tied=True, sharded=True)
    save_char_tokenizer(model)
    data = root / "same.jsonl"
    text = "the quick brown fox jumps over."  # 31 characters
    assert len(text) == 31
    data.write_text((json.dumps({"text": text}) + "\n") * 40)
    return {"root": root, "model": model, "data": data}


def _inject(monkeypatch: pytest.MonkeyPatch, nan_loss: set[int] = frozenset(), nan_grad: set[int] = frozenset()) -> None:
    """Make training forward/backward number n (1-based, per process) produce a NaN loss or an embedding NaN gradient."""
    calls = {"forward": 0, "backward": 0}
    original_init, original_backward = Runtime.__init__, Runtime.backward

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)

        def poison(module, inputs, output):
            if torch.is_grad_enabled():
                calls["forward"] += 1
                if calls["forward"] in nan_grad:
                    return NanGrad.apply(output)
            return output

        self.model.get_input_embeddings().register_forward_hook(poison)

    def backward(self, loss, *args, **kwargs):
        calls["backward"] += 1
        if calls["backward"] in nan_loss:
            loss = loss * float("nan")
        return original_backward(self, loss, *args, **kwargs)

    monkeypatch.setattr(Runtime, "__init__", init)
    monkeypatch.setattr(Runtime, "backward", backward)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def clean(job: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("clean") / "out"
    assert train_in_process(job, out, "--steps", str(STEPS)) == 0
    return weights(out / "model")


def test_nan_loss_and_nan_gradient_drop_the_step_whole(job, clean, tmp_path: Path, monkeypatch, capsys) -> None:
    _inject(monkeypatch, nan_grad={3}, nan_loss={5})
    out = tmp_path / "out"
    assert train_in_process(job, out, "--steps", str(STEPS), "--commit-every", "1") == 0, capsys.readouterr().err
    records = _records(out)
    assert [r["dropped"] for r in records] == [False, False, True, False, True, False, False, False]
    assert [r["dropped_total"] for r in records] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert "non-finite gradient" in records[2]["dropped_reason"]
    assert records[4]["dropped_reason"] == "non-finite loss"
    assert [r["step"] for r in records] == [1, 2, 2, 3, 3, 4, 5, 6]  # a dropped step reports the committed one
    # Dropped whole: with identical batches the run equals one that never saw a NaN.
    assert_same_weights(weights(out / "model"), clean, "with dropped steps")
    assert store_report(out / "store")["step"] == STEPS


def test_k_consecutive_drops_stop_the_run_at_the_last_good_step(job, clean, tmp_path: Path, monkeypatch, capsys) -> None:
    _inject(monkeypatch, nan_loss={3, 5, 7}, nan_grad={4, 6})  # five in a row from the third step on
    out = tmp_path / "out"
    code = train_in_process(job, out, "--steps", str(STEPS), "--max-dropped-steps", "5", "--commit-every", "1")
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    message = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(message) == 1
    assert "5 consecutive steps were dropped" in message[0] and "last good step, 2" in message[0], message[0]
    records = _records(out)
    assert [r["dropped"] for r in records] == [False, False, True, True, True, True, True]
    assert records[-1]["dropped_total"] == 5
    report = store_report(out / "store")
    assert report["step"] == 2 and not report["leftovers"]  # nothing of the dropped steps on disk
    assert not (out / "model").exists()

    monkeypatch.undo()
    assert train_in_process(job, out, "--steps", str(STEPS), "--resume") == 0
    assert_same_weights(weights(out / "model"), clean, "resumed after the stop")
    records = _records(out)
    assert [r["step"] for r in records if not r["dropped"]] == list(range(1, STEPS + 1))
    assert sum(r["dropped"] for r in records) == 5  # the stopped run's drops stay on record


def test_a_diverging_run_stops_without_any_injection(job, tmp_path: Path, capsys) -> None:
    """--lr 1e30: the first update is finite but overflows every later forward to inf/NaN."""
    out = tmp_path / "out"
    code = train_in_process(job, out, "--steps", str(STEPS), "--lr", "1e30", "--max-dropped-steps", "3")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "3 consecutive steps were dropped (non-finite" in err
    assert store_report(out / "store")["step"] == 1
    assert [r["dropped"] for r in _records(out)] == [False, True, True, True]


def _inject_at_steps(monkeypatch: pytest.MonkeyPatch, nan_grad_steps: set[int], nan_loss_steps: set[int] = frozenset()) -> None:
    """A NaN the first time training step s (0-based) is attempted: a transient fault, so the
    replay after a rollback and the retry of the step run clean (as a re-read batch would)."""
    fired: set[tuple[str, int]] = set()
    original_init, original_backward = Runtime.__init__, Runtime.backward

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)

        def poison(module, inputs, output):
            key = ("grad", self.step)
            if torch.is_grad_enabled() and self.step in nan_grad_steps and key not in fired:
                fired.add(key)
                return NanGrad.apply(output)
            return output

        self.model.get_input_embeddings().register_forward_hook(poison)

    def backward(self, loss, *args, **kwargs):
        key = ("loss", self.step)
        if self.step in nan_loss_steps and key not in fired:
            fired.add(key)
            loss = loss * float("nan")
        return original_backward(self, loss, *args, **kwargs)

    monkeypatch.setattr(Runtime, "__init__", init)
    monkeypatch.setattr(Runtime, "backward", backward)


def test_commit_every_3_a_nan_gradient_rolls_back_and_replays(job, clean, tmp_path: Path, monkeypatch, capsys) -> None:
    """Commits at steps 3 and 6. A NaN gradient in step 5 (index 4) comes after the head and both
    blocks were updated: all units go back to step 3, step 4 is replayed, step 5 retried with the
    next batch. A NaN loss in step 2 (index 1) touches nothing, so nothing is rolled back."""
    _inject_at_steps(monkeypatch, nan_grad_steps={4}, nan_loss_steps={1})
    out = tmp_path / "out"
    assert train_in_process(job, out, "--steps", str(STEPS), "--commit-every", "3") == 0, capsys.readouterr().err
    records = _records(out)
    assert [(r["step"], r["dropped"]) for r in records] == [
        (1, False), (1, True), (2, False), (3, False), (4, False), (4, True), (5, False), (6, False)]
    assert records[1].get("rolled_back_steps") is None  # the NaN loss was caught before any update
    assert records[5]["rolled_back_steps"] == 1 and "non-finite gradient" in records[5]["dropped_reason"]
    # Commits: step 3 (every 3), step 4 before the retry (a second drop there replays nothing), the end.
    assert [r["committed"] for r in records if not r["dropped"]] == [False, False, True, False, False, False]
    assert_same_weights(weights(out / "model"), clean, "commit every 3, with a rollback")
    report = store_report(out / "store")
    assert report["step"] == STEPS and not report["leftovers"]


def test_commit_every_3_replays_the_batches_those_steps_had(tmp_path: Path, monkeypatch, capsys) -> None:
    """Varied batches this time, so a replay with the wrong data position would change the result:
    a NaN gradient in step 5 with --commit-every 3 (roll back to 3, replay 4, retry 5 with the next
    batch) ends bit-identical to the same fault with --commit-every 1, which never replays."""
    from fault_harness import make_job

    varied = make_job(tmp_path / "job", examples=60)
    finals = {}
    for every in ("1", "3"):
        _inject_at_steps(monkeypatch, nan_grad_steps={4})
        out = tmp_path / f"out{every}"
        assert train_in_process(varied, out, "--steps", str(STEPS), "--commit-every", every) == 0, capsys.readouterr().err
        monkeypatch.undo()
        records = _records(out)
        assert [r["step"] for r in records if not r["dropped"]] == list(range(1, STEPS + 1))
        assert [r.get("rolled_back_steps", 0) for r in records if r["dropped"]] == ([0] if every == "1" else [1])
        finals[every] = weights(out / "model")
    assert_same_weights(finals["3"], finals["1"], "commit every 3 against every 1, varied batches")

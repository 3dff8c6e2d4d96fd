"""Commit every N steps: the library contract, a dropped step under N > 1, resume refusals,
and bf16 stochastic rounding resumed without the native kernel.

References are independent of lomo-run: `torch.optim.SGD` on a Hugging Face model in memory
(fp32, max abs difference <= 1e-6, as tests/test_runtime.py), and for the kill/resume case an
uninterrupted run (bit-identical)."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fault_harness import CLI, REPO, assert_same_weights, make_job, run_cli, store_report, train_argv, weights
from helpers import NanGrad, make_tiny_model
from lomo_runtime import SGD, Runtime
from lomo_runtime.runtime import LossScaler

LR = 0.05


def _batches(vocab: int, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (2, 16), generator=gen) for _ in range(n)]


def _train_with_replay(rt: Runtime, batches: list[torch.Tensor], bad: int) -> tuple[list, list[int]]:
    """Train on `batches` as the library contract says, the batch at index `bad` giving a NaN
    gradient the first time: on a drop with `rolled_back` > 0, replay the batches of steps
    `result.step` .. `result.step + rolled_back - 1`, then go on with the batch after the dropped one.
    Returns the results of the first runs of each batch, and the steps at which the NaN fired."""
    fired: list[int] = []
    batch_index = 0

    def poison(module, inputs, output):
        if torch.is_grad_enabled() and batch_index == bad and not fired:
            fired.append(rt.step)
            return NanGrad.apply(output)
        return output

    handle = rt.model.get_input_embeddings().register_forward_hook(poison)
    positions = {}  # batch index at the start of each step
    results = []
    while batch_index < len(batches):
        positions[rt.step] = batch_index
        ids = batches[batch_index]
        result = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        results.append(result)
        batch_index += 1
        if result.dropped and result.rolled_back:
            dropped_at = batch_index  # the retry takes the batch after the dropped one
            for step in range(result.step, result.step + result.rolled_back):
                replay = batches[positions[step]]
                assert not rt.backward(rt.model(input_ids=replay, labels=replay).loss).dropped
            batch_index = dropped_at
    handle.remove()
    return results, fired


def test_nan_at_step_5_of_8_with_commit_every_3_equals_sgd_without_that_batch(tmp_path: Path) -> None:
    """The contract a library caller follows: on a drop with `rolled_back` > 0, replay the batches of
    steps `result.step` .. `result.step + rolled_back - 1`, then go on with the next batch."""
    model_dir = make_tiny_model(tmp_path, "llama", tied=True)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batches = _batches(reference.config.vocab_size, 8)
    bad = 4  # the fifth batch gives a NaN gradient (first time only: a transient fault)

    ref = copy.deepcopy(reference).train()
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for i, ids in enumerate(batches):
        if i == bad:
            continue  # a clean run that skips that step's update
        ref(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    sizes = {}
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "sizes") as rt:
        sizes = {n: r.nbytes for n, r in rt.store.units.items()}
    budget = sizes["embed"] + max(v for k, v in sizes.items() if k.startswith("block."))  # streams every step
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "w", weights_budget=budget, commit_every=3) as rt:
        results, fired = _train_with_replay(rt, batches, bad)
        dropped = [r for r in results if r.dropped]
        assert fired == [4] and len(dropped) == 1
        # Steps 1-3 committed at step 3; step 5's NaN came after the head and blocks were updated.
        assert dropped[0].step == 3 and dropped[0].rolled_back == 1 and dropped[0].committed_step == 3
        assert rt.step == 7 and rt.committed_step == 6
        trained = dict(rt.iter_weights())  # commits first
        assert rt.committed_step == 7
    expected = ref.state_dict()
    for name, tensor in trained.items():
        diff = (tensor - expected[name]).abs().max().item()
        assert diff <= 1e-6, f"{name} differs by {diff}"


def test_fp16_loss_scale_after_a_rollback_is_the_scale_of_a_run_that_committed_every_step(tmp_path: Path) -> None:
    """The replayed steps use the loss scale their first run used and the retried step the
    halved one, so the scale sequence and the weights equal those of a run that never rolled back
    (commit_every=1: its drop comes right after a commit). A replay that reused the lowered
    scale, or counted its steps into the doubling window twice, would differ."""
    model_dir = make_tiny_model(tmp_path, "llama", tied=True)
    batches = _batches(128, 6)
    runs = {}
    for every in (1, 3):
        scaler = LossScaler(scale=1024.0, window=2)
        with Runtime(model_dir, SGD(lr=0.01), work_dir=tmp_path / f"w{every}", dtype=torch.float16,
                     loss_scaler=scaler, commit_every=every) as rt:
            results, fired = _train_with_replay(rt, batches, bad=2)
            assert fired == [2]
            runs[every] = ([r.loss_scale for r in results], dict(rt.iter_weights()))
    assert [r for r in runs[3][0]] == runs[1][0] == [1024.0, 2048.0, 1024.0, 1024.0, 2048.0, 2048.0]
    assert_same_weights(runs[3][1], runs[1][1], "fp16, commit every 3 with a rollback")


def test_commit_contract_of_the_library(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, "llama", tied=False)
    ids = _batches(128, 1)[0]
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "w", commit_every=4) as rt:
        results = [rt.backward(rt.model(input_ids=ids, labels=ids).loss) for _ in range(5)]
        assert [r.committed for r in results] == [False, False, False, True, False]
        assert [r.committed_step for r in results] == [0, 0, 0, 4, 4]
        assert rt.step == 5 and rt.committed_step == 4
        assert all(r.commit_s > 0 for r in results if r.committed)
        out = rt.model(input_ids=ids, labels=ids)
        with pytest.raises(RuntimeError, match="between steps"):
            rt.commit()  # a forward is waiting for its backward
        rt.backward(out.loss)
        assert rt.commit() == 6 and rt.commit() == 6  # the second is a no-op
        rt.backward(rt.model(input_ids=ids, labels=ids).loss)
    # close() committed step 7: a resume starts there.
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "w", resume=True) as rt:
        assert rt.step == rt.committed_step == 7
    with pytest.raises(Exception, match="commit_every"):
        Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "bad", commit_every=0)


def test_all_resident_run_writes_the_model_only_when_it_commits(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, "llama", tied=True)
    ids = _batches(128, 1)[0]
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "w", commit_every=3) as rt:
        total = sum(r.nbytes for r in rt.store.units.values())
        writes = []
        for _ in range(6):
            before = rt.scheduler.stats.write_bytes
            rt.backward(rt.model(input_ids=ids, labels=ids).loss)
            writes.append(rt.scheduler.stats.write_bytes - before)
        assert writes == [0, 0, total, 0, 0, total]
        assert rt.scheduler.stats.read_bytes == total  # read once from the store, never evicted


def test_resume_with_another_rule_or_setting_is_refused(tmp_path: Path) -> None:
    job = make_job(tmp_path / "job", examples=40)
    out = tmp_path / "out"
    budget = ("--weights-budget", "1MB")  # AdamW's two moments triple the units
    proc = run_cli(train_argv(job, out, "--steps", "2", "--rule", "adamw", *budget))
    assert proc.returncode == 0, proc.stderr
    for extra, words in [
        (("--rule", "sgd"), ["adamw", "sgd"]),
        (("--rule", "adalomo"), ["adamw", "adalomo"]),
        (("--rule", "adamw", "--dtype", "bf16"), ["F32", "BF16"]),
    ]:
        before = store_report(out / "store")
        proc = run_cli(train_argv(job, out, "--steps", "4", "--resume", *budget, *extra))
        lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and all(w in lines[0] for w in words), lines
        assert store_report(out / "store") == before  # nothing touched
    proc = run_cli(train_argv(job, out, "--steps", "4", "--resume", "--rule", "adamw", *budget))
    assert proc.returncode == 0, proc.stderr


def _kernel_builds() -> bool:
    from lomo_runtime import native

    saved = os.environ.pop("LOMO_RUN_NO_NATIVE", None)
    native._module, native.load_error = None, None
    try:
        return native.load() is not None
    finally:
        native._module, native.load_error = None, None
        if saved is not None:
            os.environ["LOMO_RUN_NO_NATIVE"] = saved


def test_bf16_stochastic_rounding_killed_then_resumed_without_the_kernel_is_bit_identical(tmp_path: Path) -> None:
    if not _kernel_builds():
        pytest.skip("the native kernel cannot be built here")
    job = make_job(tmp_path / "job")
    steps = 12
    args = ("--steps", str(steps), "--dtype", "bf16", "--threads", "1", "--commit-every", "3")
    with_kernel = {k: v for k, v in os.environ.items() if k != "LOMO_RUN_NO_NATIVE"}
    ref = subprocess.run([*CLI, *train_argv(job, tmp_path / "ref", *args)], capture_output=True, text=True,
                         cwd=REPO, env=with_kernel, timeout=600)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    # Reads stall 20 ms each, so the run is killed mid-way, between commits, with the kernel in use.
    slow = {**with_kernel, "LOMO_RUN_FAULTS": "read:*:sleep=0.02"}
    proc = subprocess.Popen([*CLI, *train_argv(job, out, *args)], cwd=REPO, env=slow,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if sum('"loss"' in l for l in lines) >= 5:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    committed = store_report(out / "store")["step"]
    assert 3 <= committed < steps

    resumed = subprocess.run([*CLI, *train_argv(job, out, *args, "--resume")], capture_output=True, text=True,
                             cwd=REPO, env={**with_kernel, "LOMO_RUN_NO_NATIVE": "1"}, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(weights(out / "model"), weights(tmp_path / "ref" / "model"), "resumed without the kernel")
    steps_logged = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps_logged == list(range(1, steps + 1))


def test_commit_interval_commits_when_the_time_has_passed(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, "llama", tied=True)
    ids = _batches(128, 1)[0]
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "w", commit_every=1000, commit_interval_s=0.05) as rt:
        first = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        time.sleep(0.06)
        second = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        assert second.committed and rt.committed_step == 2
        assert not first.committed or first.commit_s > 0  # a slow first step may pass 50 ms by itself


def test_commit_interval_flag_parses_durations() -> None:
    from lomo_runtime.config import parse_duration
    from lomo_runtime.errors import UserError

    assert [parse_duration(x) for x in ("90", "90s", "10m", "1.5h")] == [90.0, 90.0, 600.0, 5400.0]
    for bad in ("", "10x", "-5m", "0", "nan", "m"):
        with pytest.raises(UserError, match="--commit-interval"):
            parse_duration(bad, "--commit-interval")

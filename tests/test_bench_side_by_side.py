"""The side-by-side benchmark's lock-step protocol (tools/bench_side_by_side.py), with stand-in
workers: the real ones need the SmolLM2 demo model and minutes per step."""
from __future__ import annotations

import json
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_side_by_side as bench  # noqa: E402

# Follows the worker's gate protocol (setup, each step, evaluation) and logs when each phase ran.
FAKE_WORKER = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {tools!r})
    from bench_side_by_side import _Gate
    method, steps, fd, result, fail_at, hang_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
    gate = _Gate(fd)
    spans = []
    for phase in range(steps + 2):
        gate.wait()
        if phase == fail_at:
            sys.exit("worker failed on purpose")
        if phase == hang_at:
            time.sleep(600)
        t0 = time.monotonic()
        time.sleep(0.02)
        spans.append([phase, t0, time.monotonic()])
        if phase == steps + 1:  # evaluation: the result is written before the last ack, as in run_worker
            steps_out = [{{"step": i + 1, "step_s": 1.0}} for i in range(steps)]
            json.dump({{"method": method, "label": method, "spans": spans, "steps": steps_out}}, open(result, "w"))
        gate.done()
""")


def _fake(monkeypatch, tmp_path, fail: dict[str, int], hang: dict[str, int] | None = None):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER.format(tools=str(ROOT / "tools")))

    def worker_cmd(args, method, out, result_file):
        return _Cmd([sys.executable, str(script), method, str(args.steps)], result_file, fail.get(method, -1),
                    (hang or {}).get(method, -1))

    monkeypatch.setattr(bench, "_worker_cmd", worker_cmd)


class _Cmd(list):
    """The stand-in's command line: `+ ["--lockstep-fd", FD]` becomes its positional FD, result and failure phase."""

    def __init__(self, argv, result_file, fail_at, hang_at):
        super().__init__(argv)
        self.result_file, self.fail_at, self.hang_at = result_file, fail_at, hang_at

    def __add__(self, extra):
        return list(self) + [extra[1], str(self.result_file), str(self.fail_at), str(self.hang_at)]


def test_lockstep_runs_one_phase_at_a_time_in_rotating_order(monkeypatch, tmp_path):
    _fake(monkeypatch, tmp_path, fail={})
    args = Namespace(steps=4, timeout=60)
    methods = ["lomo", "resident", "streamed"]
    results = bench.run_lockstep(args, methods, tmp_path)
    spans = sorted((t0, t1, m, phase) for m in methods for phase, t0, t1 in results[m]["spans"])
    assert len(spans) == 3 * (args.steps + 2)
    for earlier, later in zip(spans, spans[1:]):
        assert earlier[1] <= later[0], "two workers computed at once"
    order = [(phase, m) for _, _, m, phase in spans]
    for phase in range(args.steps + 2):
        expected = methods[phase % 3:] + methods[:phase % 3]
        assert [m for p, m in order if p == phase] == expected
        assert order[3 * phase:3 * phase + 3] == [(phase, m) for m in expected]


def test_lockstep_goes_on_when_a_worker_fails(monkeypatch, tmp_path):
    _fake(monkeypatch, tmp_path, fail={"resident": 2})  # dies at its second step
    results = bench.run_lockstep(Namespace(steps=3, timeout=60), ["lomo", "resident"], tmp_path)
    assert "error" in results["resident"] and "failed on purpose" in results["resident"]["error"]
    assert len(results["lomo"]["spans"]) == 3 + 2


def test_lockstep_stops_a_hung_worker_at_the_timeout(monkeypatch, tmp_path):
    import time

    _fake(monkeypatch, tmp_path, fail={}, hang={"streamed": 1})  # hangs in its first step
    started = time.monotonic()
    results = bench.run_lockstep(Namespace(steps=2, timeout=3), ["resident", "streamed"], tmp_path)
    assert time.monotonic() - started < 30
    assert "error" in results["streamed"]
    assert len(results["resident"]["spans"]) == 2 + 2  # the other goes on to the end


def _round(times):
    tokens = 8 * 128
    return {"tokens_per_s": tokens * (len(times) - 1) / sum(times[1:]),
            "steps": [{"step": i + 1, "step_s": t} for i, t in enumerate(times)]}


def test_per_step_ratio_is_the_median_of_step_pairs():
    rounds = {"lomo": [_round([9.0, 1.0, 1.0, 1.0])], "resident": [_round([9.0, 2.0, 2.0, 0.5])]}
    per_step = bench._alternation(rounds, per_step=True)["ratios"]["resident_vs_lomo"]
    assert per_step["steps"] == [0.5, 0.5, 2.0]  # lomo's step time / resident's, steps 2..N
    assert per_step["median"] == 0.5
    whole = bench._alternation(rounds)["ratios"]["resident_vs_lomo"]
    assert whole["median"] == pytest.approx(3.0 / 4.5)  # tokens/s over the whole run


def test_markdown_names_the_lockstep_protocol():
    rounds = {"lomo": [_round([9.0, 1.0, 1.0])], "resident": [_round([9.0, 2.0, 1.0])]}
    lines = bench._alternation_lines(Namespace(rounds=1), bench._alternation(rounds, per_step=True))
    text = "\n".join(lines)
    assert "lock-step" in text and "over 2 steps" in text and "x0.750" in text
    assert json.dumps(bench._alternation(rounds, per_step=True))  # JSON-serialisable, as the summary is

"""Bad input, table-driven: each malformed config, checkpoint or data file gets its exit code
and one `error:` line naming the file (and the key, line or tensor), never a traceback.

Every case starts from a good job (tiny Llama, char tokenizer, JSONL data), breaks one
thing, and runs `lomo-run train` through `lomo_runtime.cli.main` in this process.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from fault_harness import make_job, train_argv
from lomo_runtime.cli import main

Job = dict[str, Path]


def _yaml(text: str | bytes) -> Callable[[Job, Path], list[str]]:
    """A --config file with this content (flags for model/data/out still given)."""
    def make(job: Job, tmp: Path) -> list[str]:
        path = tmp / "run.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["--config", str(path)]
    return make


def _data(content: str | bytes, name: str = "bad.jsonl") -> Callable[[Job, Path], list[str]]:
    def make(job: Job, tmp: Path) -> list[str]:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        job["data"] = path
        return []
    return make


def _model(edit: Callable[[Path], None]) -> Callable[[Job, Path], list[str]]:
    """A copy of the model directory with ``edit`` applied."""
    def make(job: Job, tmp: Path) -> list[str]:
        copy = tmp / "model"
        shutil.copytree(job["model"], copy)
        edit(copy)
        job["model"] = copy
        return []
    return make


def _config_json(**changes: object) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        config.update(changes)
        (model / "config.json").write_text(json.dumps(config))
    return edit


def _remove(*names: str) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        for name in names:
            (model / name).unlink()
    return edit


def _truncate_first_shard(model: Path) -> None:
    shard = sorted(model.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])


def _garbage_header(model: Path) -> None:
    shard = sorted(model.glob("*.safetensors"))[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + shard.read_bytes()[24:])


def _flags(*flags: str) -> Callable[[Job, Path], list[str]]:
    return lambda job, tmp: list(flags)


GOOD = json.dumps({"text": "the quick brown fox"}) + "\n"

# (id, how to break the job, exit code, texts the error line must contain; "{data}", "{model}",
# "{tmp}" are replaced by the broken job's paths)
CASES: list[tuple[str, Callable[[Job, Path], list[str]], int, tuple[str, ...]]] = [
    # -- YAML configs
    ("yaml-unknown-key", _yaml("lerning_rate: 0.1\n"), 2, ("{tmp}/run.yaml", "unknown setting", "lerning_rate")),
    ("yaml-string-for-int", _yaml("steps: ten\n"), 2, ("setting steps", "expected int", "'ten'")),
    ("yaml-list-for-float", _yaml("lr: [0.1]\n"), 2, ("setting lr", "expected float")),
    ("yaml-string-for-bool", _yaml("resume: 'yes'\n"), 2, ("setting resume", "expected bool")),
    ("yaml-fraction-for-int", _yaml("seq_len: 31.5\n"), 2, ("setting seq_len", "expected int")),
    ("yaml-not-a-mapping", _yaml("- steps\n- 3\n"), 2, ("{tmp}/run.yaml", "expected a mapping")),
    ("yaml-syntax", _yaml("steps: [1\n"), 2, ("{tmp}/run.yaml", "not valid YAML")),
    ("yaml-not-utf8", _yaml(b"steps: 3\nseed: \xff\xfe\n"), 2, ("{tmp}/run.yaml", "not valid YAML")),
    ("yaml-missing", lambda job, tmp: ["--config", str(tmp / "nope.yaml")], 2, ("{tmp}/nope.yaml", "does not exist")),
    ("yaml-bad-value", _yaml("schedule: exponential\n"), 2, ("--schedule", "exponential")),
    ("flag-negative-lr", _flags("--lr", "-1"), 2, ("--lr",)),
    ("flag-bad-size", _flags("--weights-budget", "lots"), 2, ("--weights-budget", "lots")),
    ("flag-bad-heap-keep", _flags("--heap-keep", "lots"), 2, ("--heap-keep", "lots")),
    # -- data files
    ("data-text-is-number", _data(json.dumps({"text": 5}) + "\n"), 2, ("{data}:1", '"text" must be a string')),
    ("data-empty-completion", _data(GOOD + json.dumps({"prompt": "Q: hi", "completion": " "}) + "\n"), 2,
     ("{data}:2", '"completion" is empty')),
    ("data-completion-is-null", _data(json.dumps({"prompt": "a", "completion": None}) + "\n"), 2,
     ("{data}:1", '"completion" must be a string')),
    ("data-prompt-without-completion", _data(json.dumps({"prompt": "a"}) + "\n"), 2, ("{data}:1", '"completion"')),
    ("data-text-and-prompt", _data(json.dumps({"text": "a", "prompt": "b", "completion": "c"}) + "\n"), 2,
     ("{data}:1", "use one form")),
    ("data-array-line", _data(GOOD + "[1, 2]\n"), 2, ("{data}:2", "expected a JSON object")),
    ("data-invalid-json", _data(GOOD + '{"text": "a"\n'), 2, ("{data}:2", "invalid JSON")),
    ("data-not-utf8", _data(GOOD.encode() + b'{"text": "caf\xe9"}\n'), 2, ("{data}:2", "not valid UTF-8")),
    ("data-not-utf8-text", _data(b"plain text \xc3\x28 here\n", name="bad.txt"), 2, ("{data}:1", "not valid UTF-8")),
    ("data-empty", _data(""), 2, ("{data}", "empty")),
    ("data-blank-lines", _data("\n\n  \n"), 2, ("{data}", "empty")),
    ("data-missing", lambda job, tmp: job.update(data=tmp / "none.jsonl") or [], 2, ("{tmp}/none.jsonl", "not found")),
    # -- checkpoints (the input model directory)
    ("model-no-tokenizer", _model(_remove("tokenizer.json", "tokenizer_config.json")), 2, ("{model}", "tokenizer")),
    ("model-config-string-size", _model(_config_json(hidden_size="32")), 2, ("{model}", "hidden_size")),
    ("model-config-negative-layers", _model(_config_json(num_hidden_layers=-1)), 2, ("{model}", "num_hidden_layers")),
    ("model-config-unknown-type", _model(_config_json(model_type="mamba9")), 2, ("{model}", "mamba9")),
    ("model-config-not-json", _model(lambda m: (m / "config.json").write_text("{hidden_size: 32")), 2,
     ("{model}/config.json",)),
    ("model-config-missing", _model(_remove("config.json")), 2, ("{model}", "config.json")),
    ("model-truncated-shard", _model(_truncate_first_shard), 2, ("{model}/model-00001-of-",)),
    ("model-garbage-header", _model(_garbage_header), 2, ("{model}/model-00001-of-",)),
    ("model-missing-shard", _model(lambda m: sorted(m.glob("*.safetensors"))[-1].unlink()), 2, ("{model}",)),
    ("model-dir-missing", lambda job, tmp: job.update(model=tmp / "no-model") or [], 2, ("{tmp}/no-model",)),
    # -- the working store
    ("resume-without-store", _flags("--resume"), 2, ("--resume", "no working store")),
]


@pytest.fixture(scope="module")
def good_job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    return make_job(tmp_path_factory.mktemp("sweep"), examples=40)


@pytest.mark.parametrize("break_job,code,texts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(good_job: Job, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   break_job: Callable[[Job, Path], list[str]], code: int, texts: tuple[str, ...]) -> None:
    job = dict(good_job)
    extra = break_job(job, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:
        main(train_argv(job, out, "--steps", "2", *extra))
    err = capsys.readouterr().err
    assert exit.value.code == code, err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for text in texts:
        text = text.format(data=job["data"], model=job["model"], tmp=tmp_path)
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert not (out / "store" / "manifest.json").exists()  # refused before any training


def test_the_good_job_trains(good_job: Job, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The table's baseline: unbroken, the same invocation succeeds."""
    with pytest.raises(SystemExit) as exit:
        main(train_argv(dict(good_job), tmp_path / "out", "--steps", "2"))
    assert exit.value.code == 0, capsys.readouterr().err

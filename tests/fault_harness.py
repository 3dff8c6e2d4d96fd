"""Shared pieces of the fault-injection suite (tests/test_faults_*.py, tests/test_bad_input_sweep.py).

- ``make_job``: a tiny sharded Llama with a character tokenizer and a JSONL data file.
- ``train_argv``: the `lomo-run train` arguments every fault test uses (tiny budget, so
  units are evicted, written back and re-read every step).
- ``Zygote``: a fork server. Importing torch and transformers costs about 5 s on this
  machine, a training process of the tiny model well under one; the crash suite kills
  training more than 50 times, so a helper process imports everything once and forks a
  fresh child per run. Each child is a separate process: it opens the store, takes the
  lock and dies by SIGKILL exactly as a `lomo-run train` would (the crash test's
  reference run is a real `python -m`-style subprocess, so forking is checked against it).
- ``store_report``: reads a store's manifest and checks every named unit file's size and
  checksum (the algorithm its record names: CRC-32C, or zlib CRC-32 for version 1-2
  records) without opening the store (opening would clean up leftovers and take the lock).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import crc32c
import torch
from safetensors.torch import load_file

from helpers import make_tiny_model, save_char_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
CLI = [sys.executable, "-c", "from lomo_runtime.cli import main; main()"]


def make_job(root: Path, examples: int = 200) -> dict[str, Path]:
    """A tiny tied Llama (4 units, ~16-30 KB each) with a char tokenizer, and random-word data."""
    root.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(root, arch="llama", tied=True, sharded=True)
    save_char_tokenizer(model)
    rng = random.Random(0)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(12))}) + "\n"
                            for _ in range(examples)))
    return {"root": root, "model": model, "data": data}


def train_argv(job: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """`train` arguments: a 70 KB weights budget holds two of the six units (blocks split in two under a budget), so every step
    reads, evicts, writes back and (with `--commit-every 1`) commits: the paths the faults target."""
    return [
        "train", "--model", str(job["model"]), "--data", str(job["data"]), "--out", str(out),
        "--seq-len", "32", "--batch-size", "2", "--lr", "0.05", "--weights-budget", "70KB", "--seed", "3",
        "--commit-every", "1",  # the fault points are counted per commit; a later --commit-every wins
        *extra,
    ]


def train_in_process(job: dict[str, Path], out: Path, *extra: str) -> int:
    """`lomo-run train` through `cli.main` in this process (so tests can patch it); its exit code."""
    from lomo_runtime.cli import main

    try:
        main(train_argv(job, out, *extra))
    except SystemExit as exit:
        return int(exit.code or 0)
    raise AssertionError("main() returned without exiting")


def run_cli(argv: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`lomo-run ARGV` in a fresh interpreter (extra environment variables in ``env``)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, cwd=REPO, env=full_env, timeout=timeout)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an exported model directory."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), what
    for name in expected:
        assert torch.equal(got[name], expected[name]), f"{what}: {name} differs"


def logged_steps(out: Path) -> list[int]:
    """Steps of metrics.jsonl lines that report a training step (not eval-only lines)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def error_lines(stderr: str) -> list[str]:
    """stderr without progress lines and transformers' progress bars."""
    return [l for l in stderr.splitlines() if l.strip() and not l.startswith("step ") and "it/s]" not in l]


# ---------------------------------------------------------------- store inspection


# Written out here rather than imported from lomo_runtime.store, so a store bug cannot hide itself.
_UNIT_CHECKSUMS: dict[str, Callable[[bytes], int]] = {"crc32": zlib.crc32, "crc32c": crc32c.crc32c}


def store_report(store_dir: Path) -> dict[str, Any]:
    """The committed step, the files the manifest names (each checked: size and checksum), and the
    other files lying in ``units/`` (uncommitted, partial or superseded generations).

    Each file is checked with the algorithm its record names (``checksum_alg``, manifest version 3);
    records of version 1-2 manifests name none and are zlib CRC-32."""
    manifest = json.loads((store_dir / "manifest.json").read_text())
    legacy = manifest["version"] < 3
    named = set()
    for unit in manifest["units"]:
        path = store_dir / unit["file"]
        data = path.read_bytes()
        assert len(data) == unit["nbytes"], f"{path}: {len(data)} bytes, manifest says {unit['nbytes']}"
        alg = unit.get("checksum_alg", "crc32") if legacy else unit["checksum_alg"]
        assert _UNIT_CHECKSUMS[alg](data) == unit["checksum"], f"{path}: {alg} mismatch"
        named.add(path.name)
    present = set(os.listdir(store_dir / "units"))
    return {"step": manifest["step"], "named": named, "leftovers": sorted(present - named),
            "tmp_manifest": (store_dir / "manifest.json.tmp").exists()}


# ---------------------------------------------------------------- fork server

# What a fork server imports once (lazy modules included), before it says "ready"; the servers
# here and in test_faults_crash_rules.py start with it.
ZYGOTE_PRELUDE = r"""
import json, os, signal, sys, traceback
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import torch, transformers, safetensors.torch
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast  # lazy modules: import once
import lomo_runtime.cli as cli
cli._register()
import lomo_runtime.trainer, lomo_runtime.runtime, lomo_runtime.data, lomo_runtime.checkpoint.export
try:
    import lomo_runtime.planner
except ImportError:
    pass
from lomo_runtime.io import FAULTS
sys.stdout.write("ready\n"); sys.stdout.flush()
"""

# The server's loop: fork a child per request, run the CLI in it (after `before_main(req)`, when a
# server script defines one), report its pid, then its exit code.
ZYGOTE_LOOP = r"""
while True:
    line = sys.stdin.readline()
    if not line:
        break
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.environ.update(req["env"])
            FAULTS.load_env()
            if "before_main" in globals():
                before_main(req)
            try:
                cli.main(req["argv"])
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    sys.stdout.write(f"{pid}\n"); sys.stdout.flush()
    _, status = os.waitpid(pid, 0)
    sys.stdout.write(f"{os.waitstatus_to_exitcode(status)}\n"); sys.stdout.flush()
"""
_ZYGOTE = ZYGOTE_PRELUDE + ZYGOTE_LOOP


class Zygote:
    """A process that has imported lomo_runtime, torch and transformers, forking one child per run.

    ``start(argv, env, log)`` forks a child running `lomo-run ARGV` with ``env`` added to its
    environment (fault specs are re-read in the child) and stdout/stderr going to ``log``;
    it returns the child's pid. ``wait()`` returns its exit code (negative: killed by that
    signal). One child at a time.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"fork server did not start: {ready!r}")

    def start(self, argv: list[str], env: dict[str, str] | None, log: Path) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env or {}, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def wait(self) -> int:
        return int(self.proc.stdout.readline())

    def run(self, argv: list[str], env: dict[str, str] | None, log: Path) -> tuple[int, str]:
        """Run to the end; return the exit code and the child's output."""
        self.start(argv, env, log)
        return self.wait(), log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

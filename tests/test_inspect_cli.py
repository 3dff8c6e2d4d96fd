"""`lomo-run inspect`: the unit table, JSON output, and one test per kind of bad input.

Each bad input must end with exit code 2 and a message on stderr naming the
file and (where the file lets one be named) the tensor, with no traceback.
The CLI runs in a subprocess, exactly as a user starts it.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from helpers import make_tiny_model

TARGET = "model.layers.1.mlp.down_proj.weight"


def run_inspect(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from lomo_runtime.cli import main; main()", "inspect", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=120)


def assert_bad_input(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert "\n" not in message, message  # one line
    for needle in needles:
        assert needle in message, (needle, message)


def split_file(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header object, data section) of a safetensors file."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_file(path: Path, header: dict[str, Any] | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    header, data = split_file(path)
    edit(header)
    write_file(path, header, data)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A tied, GQA Llama in one file, with `TARGET` stored last in the data section."""
    return make_tiny_model(tmp_path, "llama", tied=True, sharded=False)


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return make_tiny_model(tmp_path, "llama", tied=True, sharded=True)


# --- good input -------------------------------------------------------------

def test_table(sharded: Path) -> None:
    result = run_inspect(str(sharded))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["unit", "tensors", "bytes", "dtypes"]
    assert [line.split()[0] for line in lines[1:5]] == ["embed", "block.0", "block.1", "head"]
    assert lines[2].split()[1] == "9" and lines[2].split()[-1] == "F32"
    assert lines[-1].startswith("ok: llama model, tied embeddings")


def test_json(model: Path) -> None:
    result = run_inspect(str(model), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["valid"] is True and summary["model_type"] == "llama" and summary["tied"] is True
    assert [u["name"] for u in summary["units"]] == ["embed", "block.0", "block.1", "head"]
    assert sum(u["bytes"] for u in summary["units"]) == summary["total_bytes"] == model.joinpath(
        "model.safetensors").stat().st_size - 8 - split_header_len(model / "model.safetensors")
    assert summary["units"][0] == {"name": "embed", "tensors": 1, "bytes": 128 * 32 * 4, "dtypes": ["F32"]}


def split_header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_json_reports_invalid(model: Path) -> None:
    (model / "model.safetensors").write_bytes(b"\x01")
    result = run_inspect(str(model), "--json")
    assert_bad_input(result, "model.safetensors")
    assert json.loads(result.stdout)["valid"] is False


# --- bad input: one test per case -------------------------------------------

def test_truncated_file(model: Path) -> None:
    path = model / "model.safetensors"
    header, data = split_file(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    write_file(path, header, data[:-10])
    assert_bad_input(run_inspect(str(model)), str(path), f"tensor '{last}'", "truncated")


def test_header_claims_more_bytes_than_file(model: Path) -> None:
    path = model / "model.safetensors"
    blob = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(blob) * 2) + blob[8:])
    # No tensor can be named: the header itself cannot be read.
    assert_bad_input(run_inspect(str(model)), str(path), "header claims", "no tensor can be read")


def test_tensor_span_beyond_end_of_file(model: Path) -> None:
    path = model / "model.safetensors"
    header, data = split_file(path)
    header[TARGET]["data_offsets"][1] = len(data) + 4096
    write_file(path, header, data)
    assert_bad_input(run_inspect(str(model)), str(path), f"tensor '{TARGET}'", "file holds only")


def test_malformed_json(model: Path) -> None:
    path = model / "model.safetensors"
    _, data = split_file(path)
    write_file(path, b'{"' + TARGET.encode() + b'": {"dtype": "F32", ', data)
    assert_bad_input(run_inspect(str(model)), str(path), "not well-formed JSON")


def test_header_not_an_object(model: Path) -> None:
    path = model / "model.safetensors"
    _, data = split_file(path)
    write_file(path, b"[1, 2, 3]", data)
    assert_bad_input(run_inspect(str(model)), str(path), "not an object")


def test_unknown_dtype(model: Path) -> None:
    path = model / "model.safetensors"
    edit_header(path, lambda h: h[TARGET].update(dtype="F12"))
    assert_bad_input(run_inspect(str(model)), str(path), f"tensor '{TARGET}'", "unknown dtype 'F12'")


def test_overlapping_offsets(model: Path) -> None:
    path = model / "model.safetensors"
    other = "model.layers.1.mlp.up_proj.weight"

    def overlap(h: dict[str, Any]) -> None:
        # Same size, so shape x dtype still matches the span; only the overlap is wrong.
        h[TARGET]["data_offsets"] = list(h[other]["data_offsets"])

    edit_header(path, overlap)
    result = run_inspect(str(model))
    assert_bad_input(result, str(path), "overlaps")
    assert f"'{TARGET}'" in result.stderr and f"'{other}'" in result.stderr


def test_span_disagrees_with_shape_and_dtype(model: Path) -> None:
    path = model / "model.safetensors"
    edit_header(path, lambda h: h[TARGET].update(dtype="F16"))
    assert_bad_input(run_inspect(str(model)), str(path), f"tensor '{TARGET}'", "needs", "bytes")


def test_negative_shape(model: Path) -> None:
    path = model / "model.safetensors"
    edit_header(path, lambda h: h[TARGET].update(shape=[-32, 64]))
    assert_bad_input(run_inspect(str(model)), str(path), f"tensor '{TARGET}'", "shape")


def test_duplicate_tensor_name(model: Path) -> None:
    path = model / "model.safetensors"
    header, data = split_file(path)
    raw = json.dumps(header)
    entry = json.dumps({TARGET: header[TARGET]})[1:-1]
    write_file(path, (raw[:-1] + ", " + entry + "}").encode(), data)
    assert_bad_input(run_inspect(str(model)), str(path), f"tensor '{TARGET}'", "twice")


def test_missing_tensor(model: Path) -> None:
    path = model / "model.safetensors"
    edit_header(path, lambda h: h.pop(TARGET))
    assert_bad_input(run_inspect(str(model)), str(path), f"tensor '{TARGET}'", "missing")


def test_shape_disagrees_with_config(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 48
    (model / "config.json").write_text(json.dumps(config))
    result = run_inspect(str(model))
    assert_bad_input(result, str(model / "model.safetensors"), str(model / "config.json"),
                     "tensor 'model.layers.0.mlp.gate_proj.weight'", "shape (64, 32)", "implies (48, 32)")


def test_unexpected_tensor(model: Path) -> None:
    path = model / "model.safetensors"
    # A zero-byte extra tensor: every other check passes, only its name is wrong.
    edit_header(path, lambda h: h.update({"model.extra.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}))
    assert_bad_input(run_inspect(str(model)), str(path), "tensor 'model.extra.weight'", "not part of a llama model")


def test_shard_missing_from_disk(sharded: Path) -> None:
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][TARGET]
    (sharded / shard).unlink()
    result = run_inspect(str(sharded))
    assert_bad_input(result, str(sharded / shard), "shard missing", "tensor '")


def test_index_names_tensor_absent_from_shard(sharded: Path) -> None:
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.1.self_attn.q_proj.bias"] = index["weight_map"][TARGET]
    index_path.write_text(json.dumps(index))
    assert_bad_input(run_inspect(str(sharded)), "tensor 'model.layers.1.self_attn.q_proj.bias'", "not in the shard")


def test_shard_path_escapes_directory(sharded: Path) -> None:
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][TARGET] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    assert_bad_input(run_inspect(str(sharded)), str(index_path), f"tensor '{TARGET}'", "plain file name")


def test_malformed_index(sharded: Path) -> None:
    index_path = sharded / "model.safetensors.index.json"
    index_path.write_text('{"weight_map": ')
    assert_bad_input(run_inspect(str(sharded)), str(index_path), "JSON")


def test_unknown_model_type(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "mamba"
    (model / "config.json").write_text(json.dumps(config))
    # transformers builds Mamba, so its units are derived; these llama weights are not its tensors.
    assert_bad_input(run_inspect(str(model)), str(model / "config.json"), "mamba", "not one the")
    config["model_type"] = "no_such_family"
    (model / "config.json").write_text(json.dumps(config))
    assert_bad_input(run_inspect(str(model)), str(model / "config.json"), "'no_such_family'", "causal LM")


def test_malformed_config(model: Path) -> None:
    (model / "config.json").write_text("{not json")
    assert_bad_input(run_inspect(str(model)), str(model / "config.json"), "JSON")


def test_not_a_directory(tmp_path: Path) -> None:
    assert_bad_input(run_inspect(str(tmp_path / "nowhere")), str(tmp_path / "nowhere"), "not a directory")


def test_integer_weights_rejected(model: Path) -> None:
    path = model / "model.safetensors"
    edit_header(path, lambda h: h[TARGET].update(dtype="I32"))
    assert_bad_input(run_inspect(str(model)), str(path), f"tensor '{TARGET}'", "not floating point")

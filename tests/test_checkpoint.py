"""Checkpoint reading, validation and HF export, checked against safetensors and transformers.

Round trip: open a checkpoint saved by transformers, read every tensor, export
with `export_hf`, and require bit-identical tensors and identical logits
(fp32, same weights, same code path: rtol=0, atol=0).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model
from lomo_runtime.checkpoint import Checkpoint, export_hf, load_config, read_header
from lomo_runtime.errors import UserError

ROUND_TRIP = [
    ("llama", True, {}),  # SmolLM2-style: tied embeddings, grouped-query attention
    ("llama", False, {}),
    ("mistral", False, {"head_dim": 16}),  # explicit head_dim
    ("qwen2", True, {}),  # q/k/v biases
    ("gpt2", True, {}),  # Conv1D (transposed) weights, `transformer.` prefix
]


def _raw_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint directory as safetensors itself reads it."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("arch,tied,overrides", ROUND_TRIP, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t, _ in ROUND_TRIP])
def test_round_trip_is_bit_identical(tmp_path: Path, arch: str, tied: bool, overrides: dict, sharded: bool) -> None:
    src = make_tiny_model(tmp_path, arch, tied=tied, sharded=sharded, **overrides)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    ckpt = Checkpoint.open(src)
    assert len(ckpt.files) == (1 if not sharded else len(list(src.glob("model-*.safetensors"))))
    assert [u.name for u in ckpt.units] == ["embed", "block.0", "block.1", "head"]
    assert "lm_head.weight" not in ckpt.tensors if tied else "lm_head.weight" in ckpt.tensors

    raw = _raw_tensors(src)
    read = dict(ckpt.iter_tensors())
    assert read.keys() == raw.keys() == ckpt.tensors.keys()
    for name, tensor in read.items():
        assert _same_bits(tensor, raw[name]), name

    out = tmp_path / "export"
    export_hf(out, ckpt.config, ckpt.iter_tensors(), source_dir=src, max_shard_bytes="30KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    assert (out / "generation_config.json").is_file()
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    exported = _raw_tensors(out)
    assert exported.keys() == raw.keys()
    for name, tensor in exported.items():
        assert _same_bits(tensor, raw[name]), name
    assert Checkpoint.open(out).tensors.keys() == ckpt.tensors.keys()

    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(_logits(out, ids), _logits(src, ids), rtol=0, atol=0)


def test_gpt2_hub_layout_without_prefix(tmp_path: Path) -> None:
    """The original GPT-2 hub layout: no `transformer.` prefix, causal-mask buffers saved as tensors."""
    src = make_tiny_model(tmp_path, "gpt2")
    tensors = load_file(src / "model.safetensors")
    hub = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(2):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(hub, src / "model.safetensors", metadata={"format": "pt"})

    ckpt = Checkpoint.open(src)
    assert set(ckpt.tensors) == set(tensors)
    assert ckpt.tensors["transformer.h.0.attn.c_attn.weight"].entry.name == "h.0.attn.c_attn.weight"
    assert _same_bits(ckpt.read_tensor("transformer.h.1.mlp.c_fc.weight"), tensors["transformer.h.1.mlp.c_fc.weight"])
    assert _same_bits(ckpt.read_tensor("h.1.mlp.c_fc.weight"), tensors["transformer.h.1.mlp.c_fc.weight"])


def test_tied_checkpoint_with_stored_lm_head(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path, "llama", tied=True)
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    ckpt = Checkpoint.open(src)
    assert "lm_head.weight" not in ckpt.tensors
    assert sum(len(u.tensor_names) for u in ckpt.units) == len(tensors) - 1
    # The alias reads the embedding, the one tensor that exists.
    assert _same_bits(ckpt.read_tensor("lm_head.weight"), tensors["model.embed_tokens.weight"])
    out = export_hf(tmp_path / "out", ckpt.config, [*ckpt.iter_tensors(), ("lm_head.weight", ckpt.read_tensor("lm_head.weight"))], src)
    assert "lm_head.weight" not in _raw_tensors(out)


def test_read_tensor_catches_a_file_shrunk_after_open(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path, "llama")
    ckpt = Checkpoint.open(src)
    last = max(ckpt.tensors.values(), key=lambda loc: loc.entry.end)
    with open(last.path, "r+b") as f:
        f.truncate(last.entry.end - 4)
    with pytest.raises(UserError, match="short read") as err:
        ckpt.read_tensor(last.entry.name)
    assert str(last.path) in str(err.value) and f"'{last.entry.name}'" in str(err.value)


def test_bf16_tensors_keep_dtype(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path, "llama")
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    ckpt = Checkpoint.open(src)
    for name, tensor in ckpt.iter_tensors():
        assert _same_bits(tensor, tensors[name])


def test_load_config_needs_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "tie_word_embeddings": True,
    }))
    assert load_config(tmp_path)["hidden_size"] == 576
    with pytest.raises(UserError, match="model.safetensors"):
        Checkpoint.open(tmp_path)


def test_read_header_offsets_are_absolute(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}, path)
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    entries = read_header(path)
    assert {e.start for e in entries.values()} == {8 + header_len, 8 + header_len + 24}
    assert entries["a"].shape == (2, 3) and entries["a"].dtype == "F32" and entries["a"].nbytes == 24


def test_export_refuses_source_and_foreign_dirs(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path, "llama")
    ckpt = Checkpoint.open(src)
    with pytest.raises(UserError, match="source"):
        export_hf(src, ckpt.config, ckpt.iter_tensors(), source_dir=src)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        export_hf(foreign, ckpt.config, ckpt.iter_tensors(), source_dir=src)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_export_replaces_previous_export_and_checks_the_set(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path, "llama")
    ckpt = Checkpoint.open(src)
    out = tmp_path / "out"
    export_hf(out, ckpt.config, ckpt.iter_tensors(), src, max_shard_bytes="20KB")
    export_hf(out, ckpt.config, ckpt.iter_tensors(), src)  # one shard now: stale shards must go
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    partial = list(ckpt.iter_tensors())[:-1]
    with pytest.raises(ValueError, match="missing"):
        export_hf(tmp_path / "partial", ckpt.config, partial, src)
    assert not (tmp_path / "partial").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind

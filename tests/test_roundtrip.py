"""Checkpoint -> working store -> export: bit-identical tensors, equal logits in transformers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model
from lomo_runtime import SGD, Runtime


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("mistral", False), ("qwen2", True), ("gpt2", True)])
def test_store_round_trip_is_bit_identical(tmp_path: Path, arch: str, tied: bool, sharded: bool) -> None:
    source = make_tiny_model(tmp_path, arch=arch, tied=tied, sharded=sharded)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    with Runtime(source, SGD(), work_dir=tmp_path / "store") as rt:
        rt.export(tmp_path / "export")
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # the input is never written

    original, exported = _tensors(source), _tensors(tmp_path / "export")
    tied_alias = {"lm_head.weight"} if tied else set()
    assert set(exported) == set(original) - tied_alias
    for name, tensor in exported.items():
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, original[name]), name

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    a = AutoModelForCausalLM.from_pretrained(source).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=0)

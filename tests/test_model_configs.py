"""Configs as the installed transformers writes them: per-layer lists, extra keys.

Qwen2 (and Qwen3, Gemma 2/3) configs saved by transformers 5 carry `layer_types`,
one entry per layer; the planner traces 2- and 3-block versions of the model and
must cut such lists to match, or transformers refuses the config.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers import make_tiny_model
from lomo_runtime import SGD, Runtime
from lomo_runtime.planner import Machine, ModelSpec, RunConfig, plan


def test_plan_and_train_a_config_with_layer_types(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="qwen2", tied=False, num_hidden_layers=4)
    config = json.loads((model_dir / "config.json").read_text())
    assert len(config["layer_types"]) == 4  # as saved by the installed transformers
    spec = ModelSpec.from_config(config)
    p = plan(spec, RunConfig(batch_size=2, seq_len=16, memory_budget=2**30),
             Machine(host_memory_bytes=8 * 2**30, framework_bytes=390 * 2**20))
    assert p.fits
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with Runtime(model_dir, SGD(lr=0.1), work_dir=tmp_path / "w", memory_budget="2GiB", seq_len=16, batch_size=2) as rt:
        assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped


def test_plan_a_derived_family_with_layer_types() -> None:
    """Qwen3 has no hand-written record: its units come from the meta model, and the planner's
    2- and 3-block traces must cut `layer_types` there too."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen3", vocab_size=128, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64).to_dict()
    assert len(config["layer_types"]) == 5
    p = plan(ModelSpec.from_config(config), RunConfig(batch_size=2, seq_len=16, memory_budget=2**30),
             Machine(host_memory_bytes=8 * 2**30, framework_bytes=390 * 2**20))
    assert p.fits and p.params > 0

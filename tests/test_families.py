"""Families lomo-run has no hand-written record for: units derived from the model transformers
builds on the meta device (checkpoint/architectures.DerivedArchitecture).

Each family: a tiny random config (2 layers, 32 wide), tied and untied where the family allows,
trained 3 steps streamed under the smallest budget that runs a step (about one block). Reference:
the same model in memory with `torch.optim.SGD`; fp32, max abs difference <= 1e-6 on every weight.
The export loads with `from_pretrained` and gives the reference's logits (<= 1e-5).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import torch_sgd_reference
from lomo_runtime import SGD, Runtime
from lomo_runtime.errors import UserError

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=0)
FAMILIES = {
    # model_type: (extra config, what it exercises)
    "qwen3": ({}, "q/k norms"),
    "gemma": ({"head_dim": 8}, "scaled embedding, tied by default"),
    "gemma2": ({"head_dim": 8, "sliding_window": 8}, "sliding windows, logit softcapping, layer_types"),
    "gemma3_text": ({"head_dim": 8, "sliding_window": 8}, "q/k norms, local and global rotary"),
    "phi3": ({}, "fused qkv and gate_up projections"),
    "olmo2": ({}, "q/k norms, post-norms"),
    "granite": ({}, "embedding and residual multipliers"),
    "starcoder2": ({}, "biases, LayerNorm"),
    # Saved under other names than their modules: transformers renames or merges them when loading,
    # and so does lomo-run, with transformers' own conversion mapping (checkpoint.MergedLocation).
    "gpt_neox": ({}, "embed_out.weight on disk, lm_head in the model"),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2},
                "mixture of experts: per-expert w1/w2/w3 on disk, one 3-D tensor per layer in the model"),
    "qwen3_moe": ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
                  "mixture of experts with q/k norms: per-expert gate/up/down merged"),
}
STEPS = 3
LR = 0.05


def _make(tmp_path: Path, model_type: str, tied: bool) -> Path:
    extra = FAMILIES[model_type][0]
    cfg = AutoConfig.for_model(model_type, **COMMON, **extra, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = tmp_path / f"{model_type}-{'tied' if tied else 'untied'}"
    model.save_pretrained(out)
    return out


CASES = [(t, tied) for t in FAMILIES for tied in (False, True)]


@pytest.mark.parametrize("model_type,tied", CASES, ids=[f"{t}-{'tied' if b else 'untied'}" for t, b in CASES])
def test_streamed_sgd_equals_torch_and_the_export_loads(tmp_path: Path, model_type: str, tied: bool) -> None:
    model_dir = _make(tmp_path, model_type, tied)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(2, 128, (2, 16), generator=gen) for _ in range(STEPS)]
    torch.manual_seed(0)
    ref = torch_sgd_reference(model_dir, batches, LR)
    is_tied = ref.get_input_embeddings().weight is ref.get_output_embeddings().weight

    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "probe") as rt:
        budget = rt.minimum_weights_budget()
        units = list(rt.store.units)
        assert units == ["embed", "block.0", "block.1", "head"]
        assert rt.checkpoint.arch.tied(rt.checkpoint.config) == is_tied
    torch.manual_seed(0)
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "w", weights_budget=budget) as rt:
        for ids in batches:
            assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped
        assert rt.scheduler.stats.reads > len(units)  # units streamed in and out
        trained = dict(rt.iter_weights())
        rt.export(tmp_path / "export")
    expected = ref.state_dict()
    for name, tensor in trained.items():
        diff = (tensor - expected[name]).abs().max().item()
        assert diff <= 1e-6, f"{model_type}: {name} differs from torch.optim.SGD by {diff}"

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    ref.eval()
    with torch.no_grad():
        diff = (exported(input_ids=batches[0]).logits - ref(input_ids=batches[0]).logits).abs().max().item()
    assert diff <= 1e-5, f"{model_type}: exported logits differ by {diff}"


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_inspect_shows_the_derived_units(tmp_path: Path, model_type: str) -> None:
    from lomo_runtime.cli import _register, cli

    _register()
    model_dir = _make(tmp_path, model_type, tied=False)
    result = CliRunner().invoke(cli, ["inspect", str(model_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [u["name"] for u in report["units"]] == ["embed", "block.0", "block.1", "head"]
    assert report["architecture"] == model_type
    assert report["units"][-1]["tensors"] >= 2  # the final norm and the (untied) lm_head


def test_a_moe_checkpoint_missing_an_expert_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from lomo_runtime.checkpoint import Checkpoint

    model_dir = _make(tmp_path, "mixtral", tied=False)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w1.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="experts.gate_up_proj") as caught:
        Checkpoint.open(model_dir)
    assert "\n" not in str(caught.value) and "model.safetensors" in str(caught.value)


def test_a_family_transformers_cannot_build_is_refused_naming_the_model_type(tmp_path: Path) -> None:
    from lomo_runtime.checkpoint import load_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_family", "hidden_size": 8}))
    with pytest.raises(UserError, match="model_type 'no_such_family'"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(UserError, match="model_type 'bert'"):  # transformers knows it, but not as a causal LM
        load_config(tmp_path)

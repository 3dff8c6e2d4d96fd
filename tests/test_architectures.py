"""Architecture records against transformers itself: names, shapes, units, segments."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import tiny_config
from lomo_runtime.checkpoint import architecture_for
from lomo_runtime.errors import UserError

CASES = [
    ("llama", True, {}),
    ("llama", False, {}),
    ("llama", True, {"head_dim": 16}),  # explicit head_dim != hidden / heads
    ("llama", False, {"attention_bias": True, "mlp_bias": True}),
    ("mistral", False, {"head_dim": 16}),
    ("qwen2", True, {}),
    ("qwen2", False, {}),
    ("gpt2", True, {}),
    ("gpt2", False, {"n_inner": 48}),
]


def _hf_state_shapes(config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch,tied,overrides", CASES)
def test_expected_shapes_match_transformers(arch: str, tied: bool, overrides: dict) -> None:
    config = tiny_config(arch, tied=tied, **overrides)
    cfg = config.to_dict()
    spec = architecture_for(cfg)
    hf = _hf_state_shapes(config)
    if tied:
        # state_dict() lists the tied lm_head too; it is the same tensor as the embedding.
        assert hf.pop("lm_head.weight") == hf[spec.embed_weight]
        assert spec.tied_pairs(cfg) == {"lm_head.weight": spec.embed_weight}
    else:
        assert spec.tied_pairs(cfg) == {}
    assert spec.expected_shapes(cfg) == hf


@pytest.mark.parametrize("arch,tied,overrides", CASES)
def test_units_and_segments_cover_every_tensor(arch: str, tied: bool, overrides: dict) -> None:
    config = tiny_config(arch, tied=tied, **overrides)
    cfg = config.to_dict()
    spec = architecture_for(cfg)
    assert spec.unit_names(cfg) == ["embed", "block.0", "block.1", "head"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    segments = spec.segments(cfg)
    assert [u for _, u in segments] == sorted([u for _, u in segments], key=spec.unit_names(cfg).index)
    for path, _ in segments:
        assert path in modules, path
    for name in spec.expected_shapes(cfg):
        owners = [unit for path, unit in segments if name.startswith(path + ".")]
        assert owners == [spec.unit_of(name, cfg)], name
    assert spec.unit_of("lm_head.weight", cfg) == ("embed" if tied else "head")
    assert spec.max_positions(cfg) == 64


def test_gpt2_hub_names_are_canonicalised() -> None:
    spec = architecture_for({"model_type": "gpt2"})
    assert spec.canonical_name("h.0.attn.c_attn.weight") == "transformer.h.0.attn.c_attn.weight"
    assert spec.canonical_name("wte.weight") == "transformer.wte.weight"
    assert spec.canonical_name("transformer.ln_f.bias") == "transformer.ln_f.bias"
    assert spec.canonical_name("lm_head.weight") == "lm_head.weight"
    assert spec.is_buffer("transformer.h.3.attn.bias") and spec.is_buffer("transformer.h.0.attn.masked_bias")
    assert not spec.is_buffer("transformer.h.0.attn.c_attn.bias")


def test_smollm2_style_config_defaults() -> None:
    # A minimal SmolLM2-like config.json: no head_dim, tied, GQA 9 heads / 3 kv heads.
    cfg = {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "tie_word_embeddings": True,
    }
    spec = architecture_for(cfg)
    shapes = spec.expected_shapes(cfg)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    assert "lm_head.weight" not in shapes
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 134_515_008  # SmolLM2-135M's parameter count


def test_unknown_model_type_is_refused_naming_file_and_type() -> None:
    # Families without a record are derived from the model transformers builds (tests/test_families.py);
    # one transformers does not know as a causal LM is refused.
    for model_type in ("no_such_family", "bert"):
        with pytest.raises(UserError) as err:
            architecture_for({"model_type": model_type}, "/m/config.json")
        message = str(err.value)
        assert "/m/config.json" in message and repr(model_type) in message


@pytest.mark.parametrize("key,value", [("hidden_size", 30), ("num_key_value_heads", 3), ("num_hidden_layers", 0),
                                       ("vocab_size", "128"), ("tie_word_embeddings", "yes"),
                                       ("intermediate_size", None)])
def test_bad_dimensions_name_the_key(key: str, value: object) -> None:
    cfg = tiny_config("llama").to_dict()
    cfg.pop("head_dim", None)
    cfg[key] = value
    with pytest.raises(UserError, match="config.json"):
        architecture_for(cfg).dims(cfg)

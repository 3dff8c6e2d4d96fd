"""Random models and data built offline, for demos, benchmarks and tests.

Nothing here downloads: configs are written from dimensions, weights are drawn
from a seeded generator, and the tokenizer is a character-level one that fits
any vocabulary of at least 104 ids.
"""
from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
    "bright vixens and sphinx of black quartz judge my vow as five boxing wizards jump"
).split()


def llama_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int = 32000,
                 tied: bool = False, max_positions: int = 2048) -> dict[str, Any]:
    """A Llama config.json dict (134M parameters at hidden 768, 12 layers, 2048 MLP, vocab 32000, untied)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "vocab_size": vocab,
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": tied, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,
        "hidden_act": "silu", "torch_dtype": "float32",
    }


def save_random_model(out_dir: str | Path, config: dict[str, Any], seed: int = 0, max_shard_size: str = "200MB",
                      dtype: str = "float32") -> Path:
    """Instantiate `config` with random weights and save it (sharded safetensors) plus a tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size=max_shard_size)
    save_char_tokenizer(out)
    return out


def save_char_tokenizer(model_dir: str | Path) -> Path:
    """Save a character-level tokenizer (ids below 104) beside a model: <pad>=0, <unk>=1, <s>=2, </s>=3."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(model_dir)
    return Path(model_dir)


def write_word_data(path: str | Path, lines: int = 400, words_per_line: int = 24, seed: int = 0) -> Path:
    """JSONL of {"text": ...} lines of random words: learnable (the word set is small), offline."""
    rng = random.Random(seed)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for _ in range(lines):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words_per_line))}) + "\n")
    return out

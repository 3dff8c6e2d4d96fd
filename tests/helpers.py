"""Test helpers shared across the suite: tiny random Hugging Face models on disk.

Models are built from a config (no downloads), seeded, kept in fp32, and saved
with `save_pretrained` in safetensors, single-file or sharded, so tests see the
same layout transformers writes for real checkpoints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lomo_runtime.synthetic import save_char_tokenizer  # noqa: F401  (re-exported for tests)
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

# Every block of these models is a few tens of KB in fp32, so a 20 KB limit
# gives several shards (transformers never splits a tensor across shards).
SHARD_SIZE = "20KB"

ARCHS = ("llama", "mistral", "qwen2", "gpt2")


def tiny_config(arch: str = "llama", tied: bool = True, **overrides: Any) -> PretrainedConfig:
    """A 2-layer, 32-wide random config of `arch`, with grouped-query attention where the family has it."""
    common = dict(vocab_size=128, tie_word_embeddings=tied)
    if arch == "gpt2":
        # Token ids must fall inside the tiny vocabulary.
        kwargs = dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1, **common)
        return GPT2Config(**{**kwargs, **overrides})
    llama_like = dict(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, **common,
    )
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if arch not in classes:
        raise ValueError(f"unknown test architecture {arch!r}; one of {ARCHS}")
    return classes[arch](**{**llama_like, **overrides})


def make_tiny_model(
    tmp_path: Path, arch: str = "llama", tied: bool = True, sharded: bool = False, seed: int = 0, **overrides: Any
) -> Path:
    """Save a tiny random `arch` model under `tmp_path` and return its directory.

    `tied` shares the input embedding with lm_head; `sharded` splits the
    weights into several `model-0000i-of-0000n.safetensors` files with a
    `model.safetensors.index.json`; `overrides` go to the config (e.g. head_dim=16).
    """
    config = tiny_config(arch, tied=tied, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    name = f"{arch}-{'tied' if tied else 'untied'}-{'sharded' if sharded else 'single'}"
    out = Path(tmp_path) / name
    model.save_pretrained(out, max_shard_size=SHARD_SIZE if sharded else "1GB")
    return out


def torch_reference(model_dir: Path, batches: list[torch.Tensor], optimizer) -> torch.nn.Module:
    """The model in `model_dir` (fp32, in memory, train mode) after `optimizer(parameters)` over
    `batches`, each a language-modelling batch whose labels are its inputs: the reference streamed
    runs are compared with."""
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref.config.use_cache = False
    ref.train()
    opt = optimizer(ref.parameters())
    for ids in batches:
        opt.zero_grad()
        ref(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return ref


def torch_sgd_reference(model_dir: Path, batches: list[torch.Tensor], lr: float) -> torch.nn.Module:
    """`torch_reference` with `torch.optim.SGD(lr=lr)`."""
    return torch_reference(model_dir, batches, lambda params: torch.optim.SGD(params, lr=lr))


def torch_adamw_reference(model_dir: Path, batches: list[torch.Tensor], **settings) -> torch.nn.Module:
    """`torch_reference` with `torch.optim.AdamW(**settings)`, single-tensor path (foreach=False)."""
    return torch_reference(model_dir, batches, lambda params: torch.optim.AdamW(params, foreach=False, **settings))


class NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a non-finite gradient injected where it is applied)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")

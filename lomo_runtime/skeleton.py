"""The Hugging Face module tree with no weight memory behind its parameters.

`build_skeleton` instantiates the model class from `config.json` with every
parameter created on the meta device (buffers such as rotary `inv_freq` are
computed for real, on CPU), then swaps each parameter for an empty CPU
parameter of the training dtype. Parameters get storage only while their unit
is resident: `bind` points `param.data` at a view into the unit's staging
buffer (zero copy), `unbind` points it back at an empty tensor.

Tied parameters stay one object: the model's own `tie_weights` ties them on
meta, and the swap maps each old parameter to exactly one new one.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device and buffers on CPU (as accelerate's init_empty_weights)."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = dict(module._parameters[name].__dict__)
            kwargs["requires_grad"] = param.requires_grad
            module._parameters[name] = type(param)(module._parameters[name].to("meta"), **kwargs)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def empty_tensor(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The storage-less tensor an evicted parameter points at."""
    return torch.empty(0, dtype=dtype, device=device)


def attention_for(config, wanted: str = "sdpa") -> str:
    """`wanted`, or "eager" where the family has no sdpa attention (Gemma 2, for one; transformers'
    own default for it too). The planner's trace asks the same, so it builds what the runtime runs."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping[type(config)]
    return "eager" if wanted == "sdpa" and not getattr(cls, "_supports_sdpa", True) else wanted


def build_skeleton(model_dir: str, dtype: torch.dtype, attn_implementation: str = "sdpa") -> nn.Module:
    """Instantiate the HF causal-LM for `model_dir` with empty parameters of `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    attn_implementation = attention_for(config, attn_implementation)
    config._attn_implementation = attn_implementation
    # A KV cache is state the forward mutates: recomputing a segment in backward
    # would append the same keys twice. Training never needs one; generation
    # (grad disabled, no recompute) may still pass use_cache=True explicitly.
    config.use_cache = False
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            new = replaced.get(id(param))
            if new is None:
                new = nn.Parameter(empty_tensor(dtype), requires_grad=True)
                replaced[id(param)] = new
            module._parameters[name] = new
    model.train()
    return model


def bind(param: nn.Parameter, storage: torch.Tensor) -> None:
    """Point `param` at `storage` (a view into a staging buffer) without copying."""
    param.data = storage


def unbind(param: nn.Parameter) -> None:
    """Drop `param`'s storage; using it before the next `bind` is an error in the caller."""
    param.data = empty_tensor(param.dtype, param.device)

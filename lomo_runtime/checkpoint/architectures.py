"""Architectures: how a family's tensors are named, shaped and cut into units.

One `Architecture` record per family, looked up by `config.json`'s
`model_type`. A record says which config keys hold the model's dimensions
(and their defaults when a `config.json` leaves them out), which module paths
form the embed unit, the blocks and the head, and the shape of every
parameter. Supporting a new family is one more record in `ARCHITECTURES`.

Invariants:
- Names are canonical Hugging Face state-dict names, exactly those
  `AutoModelForCausalLM.from_config(cfg).state_dict()` uses, so an export
  loads with `from_pretrained` unchanged. Other spellings found in checkpoints
  (GPT-2's hub layout without `transformer.`) are mapped by `canonical_name`.
- A tied model has no separate `lm_head.weight`: `expected_shapes` omits it
  and `tied_pairs` maps it to the input embedding.
- Units are `embed`, `block.0` .. `block.{L-1}`, `head`, in forward order;
  every expected tensor belongs to exactly one. With `split=True` each block's
  MLP (its `mlp` / `feed_forward` child) is a unit of its own, `block.{i}.mlp`,
  listed right after `block.{i}`: a segment nested in the block's (segments.py),
  so a tight weights budget can load one half of a block while the other
  computes. A tensor belongs to the unit of the longest segment path it is under.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import UserError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModelDims:
    """The dimensions that fix every parameter shape, resolved from a config."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False


@dataclass(frozen=True)
class ParamShapes:
    """Parameter shapes: `embed` and `head` by full name; `block` relative to one block's module path."""

    embed: dict[str, Shape]
    block: dict[str, Shape]
    head: dict[str, Shape]


# Markers for a dimension's default: REQUIRED means config.json must give it;
# DERIVED means it follows from other dimensions as transformers derives it.
REQUIRED = object()
DERIVED = object()

# Canonical dimension -> (config.json key or None when the family has none, default).
_LLAMA_KEYS: dict[str, tuple[str | None, Any]] = {
    "vocab_size": ("vocab_size", REQUIRED),
    "hidden_size": ("hidden_size", REQUIRED),
    "num_layers": ("num_hidden_layers", REQUIRED),
    "num_heads": ("num_attention_heads", REQUIRED),
    "num_kv_heads": ("num_key_value_heads", DERIVED),  # -> num_heads (no GQA), as LlamaConfig does
    "head_dim": ("head_dim", DERIVED),  # -> hidden_size // num_heads
    "intermediate_size": ("intermediate_size", REQUIRED),
    "max_positions": ("max_position_embeddings", REQUIRED),
    "tied": ("tie_word_embeddings", False),
    "attention_bias": ("attention_bias", False),
    "mlp_bias": ("mlp_bias", False),
}
# GPT-2 configs on the hub rely on GPT2Config's defaults (the 124M model's).
_GPT2_KEYS: dict[str, tuple[str | None, Any]] = {
    "vocab_size": ("vocab_size", 50257),
    "hidden_size": ("n_embd", 768),
    "num_layers": ("n_layer", 12),
    "num_heads": ("n_head", 12),
    "num_kv_heads": (None, DERIVED),
    "head_dim": (None, DERIVED),  # GPT2Attention always splits n_embd evenly
    "intermediate_size": ("n_inner", DERIVED),  # -> 4 * n_embd, as GPT2MLP does
    "max_positions": ("n_positions", 1024),
    "tied": ("tie_word_embeddings", True),
}
_FLAGS = {"tied", "attention_bias", "mlp_bias"}


def _llama_shapes(d: ModelDims, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> ParamShapes:
    q, kv, h, i = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.hidden_size, d.intermediate_size
    block: dict[str, Shape] = {"self_attn.q_proj.weight": (q, h)}
    if qkv_bias:
        block["self_attn.q_proj.bias"] = (q,)
    block["self_attn.k_proj.weight"] = (kv, h)
    if qkv_bias:
        block["self_attn.k_proj.bias"] = (kv,)
    block["self_attn.v_proj.weight"] = (kv, h)
    if qkv_bias:
        block["self_attn.v_proj.bias"] = (kv,)
    block["self_attn.o_proj.weight"] = (h, q)
    if o_bias:
        block["self_attn.o_proj.bias"] = (h,)
    for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
        block[f"mlp.{proj}.weight"] = shape
        if mlp_bias:
            block[f"mlp.{proj}.bias"] = (shape[0],)
    block["input_layernorm.weight"] = (h,)
    block["post_attention_layernorm.weight"] = (h,)
    return ParamShapes(
        embed={"model.embed_tokens.weight": (d.vocab_size, h)},
        block=block,
        head={"model.norm.weight": (h,), "lm_head.weight": (d.vocab_size, h)},
    )


def _gpt2_shapes(d: ModelDims) -> ParamShapes:
    # GPT-2 uses Conv1D: weights are stored (in_features, out_features), the
    # transpose of nn.Linear, so c_attn is (n_embd, 3 * n_embd).
    h, i = d.hidden_size, d.intermediate_size
    block: dict[str, Shape] = {
        "ln_1.weight": (h,), "ln_1.bias": (h,),
        "attn.c_attn.weight": (h, 3 * h), "attn.c_attn.bias": (3 * h,),
        "attn.c_proj.weight": (h, h), "attn.c_proj.bias": (h,),
        "ln_2.weight": (h,), "ln_2.bias": (h,),
        "mlp.c_fc.weight": (h, i), "mlp.c_fc.bias": (i,),
        "mlp.c_proj.weight": (i, h), "mlp.c_proj.bias": (h,),
    }
    return ParamShapes(
        embed={"transformer.wte.weight": (d.vocab_size, h), "transformer.wpe.weight": (d.max_positions, h)},
        block=block,
        head={"transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,), "lm_head.weight": (d.vocab_size, h)},
    )


@dataclass(frozen=True)
class Architecture:
    """One model family: config keys, module layout and parameter shapes."""

    name: str
    model_types: tuple[str, ...]
    config_keys: Mapping[str, tuple[str | None, Any]]
    embed_modules: tuple[str, ...]  # module paths of the embed unit, in call order
    block_modules: str  # "model.layers": block i is "model.layers.{i}"
    head_modules: tuple[str, ...]  # final norm, then lm_head
    embed_weight: str  # the input embedding that lm_head.weight aliases when tied
    shapes: Callable[[ModelDims], ParamShapes]
    # A prefix older checkpoints leave off (GPT-2 on the hub: "h.0.attn..." for
    # "transformer.h.0.attn..."); names without it get it added.
    missing_prefix: str | None = None
    # Non-parameter buffers older checkpoints carry (causal masks, rotary
    # frequencies); recognised so they can be skipped, never loaded.
    buffers: tuple[str, ...] = ()
    _buffer_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_buffer_re", re.compile("|".join(f"(?:{b})" for b in self.buffers) or r"(?!)"))

    # --- dimensions -------------------------------------------------------
    def dims(self, config: Mapping[str, Any], path: str | Path = "config.json") -> ModelDims:
        """Resolve and check the dimensions in `config`; `UserError` naming `path` and the key if bad."""
        raw: dict[str, Any] = {}
        for dim, (key, default) in self.config_keys.items():
            value = config.get(key) if key is not None else None
            if value is None:
                if default is REQUIRED:
                    raise UserError(f"{path}: '{key}' is missing; a {self.name} config needs it")
                raw[dim] = None if default is DERIVED else default
                continue
            if dim in _FLAGS:
                if not isinstance(value, bool):
                    raise UserError(f"{path}: '{key}' must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{path}: '{key}' must be a positive integer, got {value!r}")
            raw[dim] = value
        raw["num_kv_heads"] = raw["num_kv_heads"] or raw["num_heads"]
        raw["intermediate_size"] = raw["intermediate_size"] or 4 * raw["hidden_size"]
        if raw["head_dim"] is None:
            if raw["hidden_size"] % raw["num_heads"]:
                key = self.config_keys["hidden_size"][0]
                raise UserError(f"{path}: '{key}' {raw['hidden_size']} is not divisible by {raw['num_heads']} heads")
            raw["head_dim"] = raw["hidden_size"] // raw["num_heads"]
        if raw["num_heads"] % raw["num_kv_heads"]:
            raise UserError(
                f"{path}: {raw['num_heads']} attention heads are not a multiple of {raw['num_kv_heads']} key/value heads"
            )
        return ModelDims(**raw)

    def tied(self, config: Mapping[str, Any]) -> bool:
        """Whether lm_head shares the input embedding's weight."""
        return self.dims(config).tied

    def max_positions(self, config: Mapping[str, Any]) -> int:
        """The longest sequence the position encoding supports."""
        return self.dims(config).max_positions

    def tied_pairs(self, config: Mapping[str, Any]) -> dict[str, str]:
        """Alias -> canonical name of tied tensors (empty when untied)."""
        return {"lm_head.weight": self.embed_weight} if self.tied(config) else {}

    # --- names and units --------------------------------------------------
    def unit_names(self, config: Mapping[str, Any], split: bool = False) -> list[str]:
        """Units in forward order: `embed`, `block.0` .. `block.{L-1}`, `head` (split: each
        `block.{i}` followed by its `block.{i}.mlp`)."""
        return _unit_names(self.segments(config, split))

    def segments(self, config: Mapping[str, Any], split: bool = False) -> list[tuple[str, str]]:
        """(module path in the HF model, unit name) in forward call order (a nested MLP segment
        right after its block's)."""
        layers = self.dims(config).num_layers
        segments = [
            *((m, "embed") for m in self.embed_modules),
            *((f"{self.block_modules}.{i}", f"block.{i}") for i in range(layers)),
            *((m, "head") for m in self.head_modules),
        ]
        return _split_mlp(segments, self.expected_shapes(config)) if split else segments

    def expected_shapes(self, config: Mapping[str, Any]) -> dict[str, Shape]:
        """Every tensor a checkpoint must hold, canonical name -> shape, in unit order.

        A tied model's `lm_head.weight` is left out: it is the embedding.
        """
        d = self.dims(config)
        shapes = self.shapes(d)
        out = dict(shapes.embed)
        for i in range(d.num_layers):
            out.update({f"{self.block_modules}.{i}.{k}": s for k, s in shapes.block.items()})
        out.update(shapes.head)
        for alias in self.tied_pairs(config):
            del out[alias]
        return out

    def unit_of(self, tensor_name: str, config: Mapping[str, Any], split: bool = False) -> str:
        """The unit that owns canonical `tensor_name` (a tied alias resolves to its embedding's unit)."""
        return assign_units(self, [tensor_name], config, split)[tensor_name]

    def lm_head_path(self, config: Mapping[str, Any]) -> str:
        """The module path of the output embeddings (the tied alias's module when tied)."""
        return self.head_modules[-1]

    def is_buffer(self, tensor_name: str) -> bool:
        """Whether canonical `tensor_name` is a non-parameter buffer older checkpoints carry."""
        return self._buffer_re.fullmatch(tensor_name) is not None

    def canonical_name(self, tensor_name: str) -> str:
        """Map a checkpoint's spelling of a tensor name to the canonical HF state-dict name."""
        p = self.missing_prefix
        if p and not tensor_name.startswith(p) and not tensor_name.startswith("lm_head."):
            return p + tensor_name
        return tensor_name


def _llama_family(name: str, model_types: tuple[str, ...], shapes: Callable[[ModelDims], ParamShapes]) -> Architecture:
    return Architecture(
        name=name, model_types=model_types, config_keys=_LLAMA_KEYS,
        embed_modules=("model.embed_tokens",), block_modules="model.layers",
        head_modules=("model.norm", "lm_head"), embed_weight="model.embed_tokens.weight", shapes=shapes,
        buffers=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq"),
    )


ARCHITECTURES: tuple[Architecture, ...] = (
    # Llama, including SmolLM2 (tied embeddings, grouped-query attention).
    # Biases follow the config: attention_bias on q/k/v/o, mlp_bias on the MLP.
    _llama_family("llama", ("llama",), lambda d: _llama_shapes(d, d.attention_bias, d.attention_bias, d.mlp_bias)),
    _llama_family("mistral", ("mistral",), lambda d: _llama_shapes(d, False, False, False)),
    # Qwen2 always has q/k/v biases and none on o_proj or the MLP.
    _llama_family("qwen2", ("qwen2",), lambda d: _llama_shapes(d, True, False, False)),
    Architecture(
        name="gpt2", model_types=("gpt2",), config_keys=_GPT2_KEYS,
        embed_modules=("transformer.wte", "transformer.wpe"), block_modules="transformer.h",
        head_modules=("transformer.ln_f", "lm_head"), embed_weight="transformer.wte.weight", shapes=_gpt2_shapes,
        missing_prefix="transformer.",
        buffers=(r"transformer\.h\.\d+\.attn\.(?:bias|masked_bias)",),
    ),
)


# --- blocks split in two (split=True) -------------------------------------------------------------
MLP_CHILDREN = ("mlp", "feed_forward", "block_sparse_moe")
"""Names of a decoder layer's MLP child in transformers' families (Llama, Qwen, GPT-2, GPT-NeoX:
`mlp`; Llama 4 and some others: `feed_forward`; older Mixtral: `block_sparse_moe`)."""


def _split_mlp(segments: list[tuple[str, str]], shapes: Mapping[str, Shape]) -> list[tuple[str, str]]:
    """`segments` with each block's MLP child as a unit of its own, right after the block's segment.
    A block whose layer has no MLP child with parameters stays whole."""
    modules = {name.rsplit(".", k)[0] for name in shapes for k in range(1, name.count(".") + 1)}
    out = []
    for path, unit in segments:
        out.append((path, unit))
        child = next((c for c in MLP_CHILDREN if f"{path}.{c}" in modules), None) if unit.startswith("block.") else None
        if child is not None:
            out.append((f"{path}.{child}", f"{unit}.mlp"))
    return out


def assign_units(arch: Any, names: Iterable[str], config: Mapping[str, Any], split: bool = False) -> dict[str, str]:
    """Canonical tensor name -> its unit, for many names at once (`unit_of` for each, with the
    segments worked out once)."""
    segments = arch.segments(config, split)
    tied = arch.tied_pairs(config)
    return {name: _owner(tied.get(name, name), segments, name, arch.name) for name in names}


def _unit_names(segments: list[tuple[str, str]]) -> list[str]:
    return list(dict.fromkeys(unit for _, unit in segments))


def _owner(name: str, segments: list[tuple[str, str]], asked: str, family: str) -> str:
    """The unit of the longest segment path `name` is under."""
    best = max(((len(path), unit) for path, unit in segments if name.startswith(path + ".")), default=None)
    if best is None:
        raise ValueError(f"tensor {asked!r} belongs to no unit of a {family} model")
    return best[1]


def supported_model_types() -> list[str]:
    """Every `model_type` a hand-written record accepts, sorted (others are derived, below)."""
    return sorted(t for a in ARCHITECTURES for t in a.model_types)


# ---- any causal LM transformers can build ---------------------------------------------------------

# Buffers older checkpoints of any family may carry (rotary frequencies, causal masks): skipped.
_LEGACY_BUFFERS = (r".*\.rotary_emb\.inv_freq", r".*\.attn\.(?:bias|masked_bias)", r".*\.attention\.(?:bias|masked_bias)")


@dataclass(frozen=True)
class _Layout:
    """What one config's model looks like, read off the model built on the meta device."""

    embed_modules: tuple[str, ...]
    block_modules: str
    num_layers: int
    head_modules: tuple[str, ...]
    shapes: dict[str, Shape]            # canonical name -> shape, unit order, tied aliases left out
    tied: dict[str, str]                # alias -> canonical
    buffers: frozenset[str]             # persistent buffers the model's own state dict has
    embed_weight: str
    dims: ModelDims
    conversion: "Conversion | None" = None  # how transformers renames and merges this family's file tensors


class Conversion:
    """transformers' own renaming and merging of a family's file tensors into its model's
    (`conversion_mapping.get_model_conversion_mapping`: GPT-NeoX's `embed_out` is `lm_head`,
    Mixtral's and Qwen3-MoE's per-expert matrices are one 3-D tensor per layer). lomo-run applies
    the same transforms with transformers' functions, so the store holds the model's tensors."""

    def __init__(self, model) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.prefix = getattr(model, "base_model_prefix", None)
        self.model_keys = dict.fromkeys(model.state_dict())  # only membership is asked

    def rename(self, file_name: str) -> tuple[str, str | None]:
        """(the model's name for a file tensor, the converter source pattern that matched it or None)."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(file_name, self.renamings, self.converters, self.prefix, self.model_keys)

    def converter(self, pattern: str):
        return next(c for c in self.converters if pattern in c.source_patterns)

    def merge(self, target: str, sources: dict[str, list]) -> "Any":
        """The model tensor `target` from its file tensors: {source pattern: tensors in file order}."""
        converter = self.converter(next(iter(sources)))
        values: Any = {p: list(sources[p]) for p in converter.source_patterns if p in sources}
        for op in converter.operations:
            values = op.convert(values, converter.source_patterns, converter.target_patterns, full_layer_name=target)
        (tensor,) = values.values()
        return tensor


class DerivedArchitecture:
    """A family without a record here: units, canonical names, shapes and tied pairs come from the
    model itself, built by transformers from `config.json` on the meta device (no weights, no
    memory; about 0.02-0.1 s for a small config, cached per config).

    Units: `embed` is every module of the base model with parameters registered before its
    decoder-layer `nn.ModuleList` (token embeddings, learned positions), `block.i` each layer,
    `head` every module with parameters after the list (final norm) plus the output embeddings.
    A tied pair is one parameter reached under two names (`named_parameters(remove_duplicate=False)`);
    the first is canonical, as `save_pretrained` keeps it. Nothing here is per family: what transformers
    cannot tell (older checkpoints' buffer names) is the small `_LEGACY_BUFFERS` list.
    """

    def __init__(self, model_type: str) -> None:
        self.name = model_type
        self.model_types = (model_type,)
        self._cache: dict[str, _Layout] = {}
        self._buffer_re = re.compile("|".join(f"(?:{b})" for b in _LEGACY_BUFFERS))
        self._seen_buffers: set[str] = set()

    @property
    def config_keys(self) -> Mapping[str, tuple[str | None, Any]]:
        from transformers import CONFIG_MAPPING

        cls = CONFIG_MAPPING[self.name]
        key = getattr(cls, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
        return {"num_layers": (key, REQUIRED)}

    def _layout(self, config: Mapping[str, Any], path: str | Path = "config.json") -> _Layout:
        import json

        key = json.dumps(config, sort_keys=True, default=str)
        layout = self._cache.get(key)
        if layout is None:
            layout = self._cache[key] = _derive_layout(self.name, config, path)
            self._seen_buffers |= layout.buffers
        return layout

    # --- what the rest of lomo-run asks of an architecture ----------------------------------------
    def dims(self, config: Mapping[str, Any], path: str | Path = "config.json") -> ModelDims:
        return self._layout(config, path).dims

    def tied(self, config: Mapping[str, Any]) -> bool:
        return bool(self._layout(config).tied)

    def max_positions(self, config: Mapping[str, Any]) -> int:
        return self._layout(config).dims.max_positions

    def tied_pairs(self, config: Mapping[str, Any]) -> dict[str, str]:
        return dict(self._layout(config).tied)

    def unit_names(self, config: Mapping[str, Any], split: bool = False) -> list[str]:
        return _unit_names(self.segments(config, split))

    def segments(self, config: Mapping[str, Any], split: bool = False) -> list[tuple[str, str]]:
        lay = self._layout(config)
        segments = [
            *((m, "embed") for m in lay.embed_modules),
            *((f"{lay.block_modules}.{i}", f"block.{i}") for i in range(lay.num_layers)),
            *((m, "head") for m in lay.head_modules),
        ]
        return _split_mlp(segments, lay.shapes) if split else segments

    def lm_head_path(self, config: Mapping[str, Any]) -> str:
        return self._layout(config).head_modules[-1]

    def expected_shapes(self, config: Mapping[str, Any]) -> dict[str, Shape]:
        return dict(self._layout(config).shapes)

    def unit_of(self, tensor_name: str, config: Mapping[str, Any], split: bool = False) -> str:
        return assign_units(self, [tensor_name], config, split)[tensor_name]

    def is_buffer(self, tensor_name: str) -> bool:
        return tensor_name in self._seen_buffers or self._buffer_re.fullmatch(tensor_name) is not None

    def canonical_name(self, tensor_name: str) -> str:
        return tensor_name

    def conversion(self, config: Mapping[str, Any]) -> Conversion | None:
        """transformers' transforms of this family's file tensors, where it has any that matter."""
        return self._layout(config).conversion


def _derive_layout(model_type: str, config: Mapping[str, Any], path: str | Path) -> _Layout:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    where = f"{path}: model_type {model_type!r}"
    try:
        hf = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")})
    except Exception as exc:  # transformers' own validation: a bad value, or a family it does not know
        raise UserError(f"{where}: transformers cannot read this config ({type(exc).__name__}: {exc})") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf)
    except Exception as exc:
        raise UserError(f"{where}: transformers cannot build a causal LM from it ({type(exc).__name__}: {exc})") from None
    names = {id(m): n for n, m in model.named_modules()}
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    base_path = names.get(id(base), "")
    prefix = f"{base_path}." if base_path else ""
    children = list(base.named_children())
    lists = [(i, n, c) for i, (n, c) in enumerate(children) if isinstance(c, nn.ModuleList) and len(c) > 0
             and any(True for _ in c.parameters())]
    if len(lists) != 1:
        raise UserError(f"{where}: its decoder layers are not one nn.ModuleList of the base model "
                        f"({', '.join(n for n, _ in children)}); lomo-run cannot cut it into units")
    at, list_name, layers = lists[0]

    def with_params(items):
        return tuple(prefix + n for n, c in items if any(True for _ in c.parameters()))

    embed_modules = with_params(children[:at])
    head_modules = list(with_params(children[at + 1:]))
    out = model.get_output_embeddings()
    if out is not None:
        out_path = names[id(out)]
        if not any(out_path == m or out_path.startswith(m + ".") for m in head_modules):
            head_modules.append(out_path)
    inside = (*embed_modules, f"{prefix}{list_name}", *head_modules)
    all_names: dict[int, list[str]] = {}
    shapes: dict[str, Shape] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        all_names.setdefault(id(param), []).append(name)
        if not any(name.startswith(m + ".") for m in inside):
            raise UserError(f"{where}: parameter {name} is outside the embedding, the decoder layers and the head; "
                            "lomo-run cannot cut this model into units")
    tied: dict[str, str] = {}
    for group in all_names.values():
        for alias in group[1:]:
            tied[alias] = group[0]
    for name, param in model.named_parameters():
        shapes[name] = tuple(param.shape)
    inp = model.get_input_embeddings()
    embed_weight = f"{names[id(inp)]}.weight"
    state = set(model.state_dict())
    buffers = frozenset(state - set(shapes) - set(tied))
    hidden = int(getattr(hf, "hidden_size", 0) or 0)
    heads = int(getattr(hf, "num_attention_heads", 0) or 1)
    max_pos = next((int(v) for k in ("max_position_embeddings", "n_positions", "seq_length")
                    if isinstance(v := getattr(hf, k, None), int) and v > 0), 1 << 20)
    dims = ModelDims(
        vocab_size=int(getattr(hf, "vocab_size", 0) or 0), hidden_size=hidden, num_layers=len(layers),
        num_heads=heads, num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(hf, "head_dim", None) or (hidden // heads if heads else 0)),
        intermediate_size=int(getattr(hf, "intermediate_size", None) or 4 * hidden),
        max_positions=max_pos, tied=bool(tied))
    try:
        conversion = Conversion(model)
    except Exception:  # an older transformers without conversion mappings: file names are the model's
        conversion = None
    return _Layout(embed_modules=embed_modules, block_modules=f"{prefix}{list_name}", num_layers=len(layers),
                   head_modules=tuple(head_modules), shapes=shapes, tied=tied, buffers=buffers,
                   embed_weight=embed_weight, dims=dims, conversion=conversion)


_DERIVED: dict[str, DerivedArchitecture] = {}


def architecture_for(config: Mapping[str, Any], path: str | Path = "config.json") -> Architecture | DerivedArchitecture:
    """The record for `config["model_type"]`, or one derived from the model transformers builds
    for it; `UserError` naming `path` when neither exists."""
    model_type = config.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    if model_type is None:
        raise UserError(f"{path}: no 'model_type'; it names the model family (llama, qwen3, gemma2, ...)")
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{path}: model_type {model_type!r} is not a causal LM the installed transformers "
                        "can build")
    if model_type not in _DERIVED:
        _DERIVED[model_type] = DerivedArchitecture(model_type)
    arch = _DERIVED[model_type]
    arch.dims(config, path)  # build and check it now, so a bad config fails here, naming the file
    return arch

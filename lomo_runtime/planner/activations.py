"""Activation memory and FLOPs of one training step, traced, not guessed.

The model is built from its `config.json` under `FakeTensorMode` (shapes and
dtypes only: tracing a 65B model's step takes a fraction of a second and no
memory), its unit modules are wrapped with the runtime's own checkpointed
segments (`lomo_runtime.segments.wrap_segment`), and one step runs: forward
with the loss, then backward with the fused update's transients (the
gradient, `isfinite`'s mask, an fp32 copy of param and gradient for 16-bit
weights). A `TorchDispatchMode` counts the bytes of every live tensor storage
created during the step (parameters and buffers excluded: weights are the
staging pool's) and keeps the peak; `FlopCounterMode` counts the FLOPs.

Only activations grow with depth, and only by one saved block input
(B * T * hidden * itemsize) per block, so the step is traced with one and two
blocks and extrapolated linearly to L blocks: peak(L) = p1 + (L - 1) * (p2 - p1).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from ..segments import Segment, SegmentHooks, wrap_segment
from .spec import DTYPES, ModelSpec


@dataclass(frozen=True)
class StepTrace:
    """Peak live activation bytes and FLOPs of one step at (batch, seq_len), for the whole model."""

    peak_bytes: int          # activations, saved segment inputs, logits, loss, gradient transients
    per_block_bytes: int     # what one more block adds to the peak (its saved input)
    flops: int               # forward + recompute + backward


class LiveBytes(TorchDispatchMode):
    """Tracks bytes of live tensor storages created under it; `peak` is their high-water mark.

    A storage is counted once (views share it) and uncounted when Python frees it.
    Storages listed in `exclude` (parameters, buffers) are never counted.
    """

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        super().__init__()
        self._exclude = {id(t.untyped_storage()) for t in exclude}
        self._keep_excluded = [t.untyped_storage() for t in exclude]  # ids stay valid while alive
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._live or key in self._exclude:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


class _NoStreaming(SegmentHooks):
    """The traced model keeps its (fake) parameters: nothing to acquire or release."""


def _hf_config(spec: ModelSpec, layers: int):
    from transformers import AutoConfig

    config = {k: v for k, v in spec.config.items() if k not in ("architectures", "transformers_version")}
    config[spec.arch.config_keys["num_layers"][0]] = layers
    hf = AutoConfig.for_model(**config)
    hf.use_cache = False
    return hf


def _trace(spec: ModelSpec, batch: int, seq_len: int, layers: int) -> tuple[int, int]:
    """(peak live bytes, FLOPs) of one fake step of a `layers`-block version of the model."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[spec.dtype]
    hf = _hf_config(spec, layers)
    with FakeTensorMode(allow_non_fake_inputs=True):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")
        finally:
            torch.set_default_dtype(default)
        model.train()
        params = dict(model.named_parameters(remove_duplicate=True))
        tied = {id(p) for m in (spec.arch.embed_weight,) for n, p in params.items() if n == m} \
            if spec.dims.tied else set()
        fires: dict[int, int] = {}

        def fused_update(param: torch.Tensor) -> None:
            # What Runtime._on_grad holds: a tied weight keeps its gradient from the
            # head's backward until the embedding's; then the isfinite mask (1 B/elem)
            # and, for 16-bit weights, an fp32 copy of the parameter and gradient.
            fires[id(param)] = fires.get(id(param), 0) + 1
            if id(param) in tied and fires[id(param)] == 1:
                return
            grad = param.grad
            param.grad = None
            torch.isfinite(grad).all()
            if param.dtype != torch.float32:
                work = param.detach().to(torch.float32)
                work.add_(grad.to(torch.float32), alpha=-1e-3)
            if spec.rule != "sgd":
                torch.empty(grad.shape, dtype=torch.float32).sqrt_()  # the rule's per-tensor temporary
            del grad

        for p in params.values():
            p.register_post_accumulate_grad_hook(fused_update)
        hooks = _NoStreaming()
        for path, owner in spec.arch.segments(spec.config | {spec.arch.config_keys["num_layers"][0]: layers}):
            module = model.get_submodule(path)
            seg = Segment(path=path, owner=owner, needs=[owner], module=module, forward=module.forward,
                          params=list(module.parameters()))
            wrap_segment(seg, hooks)
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        live = LiveBytes(exclude=[*model.parameters(), *model.buffers(), ids])
        flops = FlopCounterMode(display=False)
        with live, flops:
            out = model(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            del out
    return live.peak, flops.get_total_flops()


_CACHE: dict[tuple, tuple[int, int]] = {}


def _trace_cached(key: tuple, spec: ModelSpec, batch: int, seq_len: int, layers: int) -> tuple[int, int]:
    full = (key, batch, seq_len, layers)
    if full not in _CACHE:
        _CACHE[full] = _trace(spec, batch, seq_len, layers)
    return _CACHE[full]


def trace_step(spec: ModelSpec, batch: int, seq_len: int) -> StepTrace:
    """Activation peak and FLOPs of one step of the full model, from 1- and 2-block traces."""
    key = (repr(sorted(spec.config.items())), spec.dtype, spec.rule)
    p1, f1 = _trace_cached(key, spec, batch, seq_len, 1)
    p2, f2 = _trace_cached(key, spec, batch, seq_len, 2)
    layers = spec.dims.num_layers
    return StepTrace(peak_bytes=p1 + (layers - 1) * (p2 - p1), per_block_bytes=p2 - p1,
                     flops=f1 + (layers - 1) * (f2 - f1))

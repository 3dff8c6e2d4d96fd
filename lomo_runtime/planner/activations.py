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

Only activations grow with depth, by a fixed amount per block within each
phase of the step (forward and loss: one saved block input, B*T*hidden*itemsize;
block backwards: that plus the block's input gradient, which the runtime's
segments keep until the step's backward ends), so the step is traced with two
and three blocks (the first block's backward is special: no earlier input
gradient is held yet) and each phase's peak is extrapolated linearly to L
blocks: peak(L) = max over phases of p2 + (L - 2) * (p3 - p2).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from ..head import RowChunkedLinear, rows_per_chunk
from ..loss import install as install_loss
from ..segments import Segment, SegmentHooks, wrap_segment
from ..skeleton import attention_for
from .spec import DTYPES, ModelSpec


@dataclass(frozen=True)
class StepTrace:
    """Peak live activation bytes and FLOPs of one step at (batch, seq_len), for the whole model."""

    peak_bytes: int          # activations, saved segment inputs, logits, loss, gradient transients
    per_block_bytes: int     # what one more block adds to the peak (its saved input)
    flops: int               # forward + recompute + backward
    largest_bytes: int       # the largest tensor allocated during the step (sizes the allocator's slack)


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
        self.largest = 0
        self.phase = "forward"
        self.peaks: dict[str, int] = {}  # phase -> its high-water mark

    def _track(self, t: torch.Tensor) -> None:
        if t.is_sparse:  # a row-update gradient: its indices and values hold the memory
            self._track(t._indices())
            self._track(t._values())
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._live or key in self._exclude:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.current)
        self.largest = max(self.largest, nbytes)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


class _Phases(SegmentHooks):
    """Nothing to stream (the traced model keeps its fake parameters); marks the step's phases.

    Phases: "forward" (through the loss and the head's backward), "blocks" (block
    backwards), "embed". Each phase's peak is linear in depth with its own slope
    (in "blocks" each block still holds its saved input and its input gradient:
    2 * B*T*H*itemsize per block), so each is extrapolated separately.
    """

    def __init__(self) -> None:
        self.live: LiveBytes | None = None

    def segment_backward_begin(self, segment: Segment) -> None:
        if self.live is not None:
            self.live.phase = "blocks" if segment.owner.startswith("block") else (
                "embed" if segment.owner == "embed" else "forward")


def _traced_config(spec: ModelSpec, layers: int) -> dict:
    """`spec.config` with `layers` blocks (what the 2- and 3-block traces build)."""
    config = {k: v for k, v in spec.config.items() if k not in ("architectures", "transformers_version")}
    key = spec.arch.config_keys["num_layers"][0]
    full = config[key] if isinstance(config.get(key), int) else spec.dims.num_layers
    config[key] = layers
    # Per-layer lists (`layer_types` of Qwen2/Qwen3/Gemma 2-3: one attention kind per layer; also
    # `no_rope_layers`) must match the layer count, which transformers checks: keep the first `layers`.
    for name, value in list(config.items()):
        if isinstance(value, list) and len(value) == full and full != layers:
            config[name] = value[:layers]
    return config


def _hf_config(spec: ModelSpec, layers: int):
    from transformers import AutoConfig

    config = _traced_config(spec, layers)
    hf = AutoConfig.for_model(**config)
    hf.use_cache = False
    return hf


def _trace(spec: ModelSpec, batch: int, seq_len: int, layers: int, fake: bool = True,
           row_updates: bool = False) -> tuple[dict[str, int], int, int]:
    """(peak live bytes, FLOPs, largest tensor bytes) of one step of a `layers`-block version of the model.

    `fake=False` runs real tensors (small models only): tests use it to check the fake trace.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[spec.dtype]
    hf = _hf_config(spec, layers)
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = AutoModelForCausalLM.from_config(hf, attn_implementation=attention_for(hf))
            install_loss(model)  # the runtime's loss (loss.py)
        finally:
            torch.set_default_dtype(default)
        model.train()
        if row_updates:
            # The runtime's sparse row gradient is tokens x hidden (2 MB for 512 x 1024 fp32): negligible
            # beside the dense vocab x hidden one it replaces. Fake tensors cannot run the sparse
            # embedding backward (it needs nonzero()), so the trace leaves that gradient out.
            model.get_input_embeddings().weight.requires_grad_(False)
            # With the same settings the runtime applies an untied lm_head's gradient in row blocks
            # (head.py): at most one block of it is alive.
            head = model.get_output_embeddings()
            if isinstance(head, torch.nn.Linear) and head.bias is None:
                weight = head.weight.requires_grad_(False)
                head.forward = lambda x: RowChunkedLinear.apply(x, lambda: weight, lambda rows, g: g.sum(),
                                                                rows_per_chunk(weight.shape[-1]))
        params = dict(model.named_parameters(remove_duplicate=True))
        tied_names = set(spec.arch.tied_pairs(spec.config).values())
        tied = {id(p) for n, p in params.items() if n in tied_names}
        fires: dict[int, int] = {}

        def fused_update(param: torch.Tensor) -> None:
            # What Runtime._on_grad holds: a tied weight keeps its gradient from the
            # head's backward until the embedding's; the finiteness check is one sum (no
            # mask); for 16-bit weights, an fp32 copy of the parameter and gradient.
            fires[id(param)] = fires.get(id(param), 0) + 1
            if id(param) in tied and fires[id(param)] == 1:
                return
            grad = param.grad
            param.grad = None
            grad.sum()
            if param.dtype != torch.float32:
                work = param.detach().to(torch.float32)
                work.add_(grad.to(torch.float32), alpha=-1e-3)
            if spec.rule != "sgd":
                torch.empty(grad.shape, dtype=torch.float32).sqrt_()  # the rule's per-tensor temporary
            del grad

        for p in params.values():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(fused_update)
        hooks = _Phases()
        paths = spec.arch.segments(_traced_config(spec, layers))
        for path, owner in paths:
            module = model.get_submodule(path)
            # The head keeps its forward's graph until backward instead of recomputing it, as the
            # runtime does in one-pass steps (segments.py): no second logits tensor.
            head = owner == paths[-1][1]
            seg = Segment(path=path, owner=owner, needs=[owner], module=module, forward=module.forward,
                          params=list(module.parameters()), may_keep_graph=head, keep_graph=head)
            wrap_segment(seg, hooks)
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        live = LiveBytes(exclude=[*model.parameters(), *model.buffers(), ids])
        hooks.live = live
        flops = FlopCounterMode(display=False)
        with live, flops:
            out = model(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            del out
    return live.peaks, flops.get_total_flops(), live.largest


_CACHE: dict[tuple, tuple[dict[str, int], int, int]] = {}


def _trace_cached(key: tuple, spec: ModelSpec, batch: int, seq_len: int, layers: int) -> tuple[dict[str, int], int, int]:
    full = (key, batch, seq_len, layers)
    if full not in _CACHE:
        _CACHE[full] = _trace(spec, batch, seq_len, layers, row_updates=key[-1])
    return _CACHE[full]


def trace_step(spec: ModelSpec, batch: int, seq_len: int, row_updates: bool = False) -> StepTrace:
    """Activation peak and FLOPs of one step of the full model, from 2- and 3-block traces."""
    key = (repr(sorted(spec.config.items())), spec.dtype, spec.rule, row_updates)
    layers = spec.dims.num_layers
    if layers <= 3:
        peaks, flops, big = _trace_cached(key, spec, batch, seq_len, layers)
        top = max(peaks.values())
        return StepTrace(peak_bytes=top, per_block_bytes=0, flops=flops, largest_bytes=big)
    # From two and three blocks: the first block's backward holds no earlier block's input gradient yet.
    p2, f2, big = _trace_cached(key, spec, batch, seq_len, 2)
    p3, f3, _ = _trace_cached(key, spec, batch, seq_len, 3)
    lines = {phase: (p2[phase], p3[phase] - p2[phase]) for phase in p2}
    top = max(lines, key=lambda ph: lines[ph][0] + (layers - 2) * lines[ph][1])
    return StepTrace(peak_bytes=lines[top][0] + (layers - 2) * lines[top][1], per_block_bytes=lines[top][1],
                     flops=f2 + (layers - 2) * (f3 - f2), largest_bytes=big)

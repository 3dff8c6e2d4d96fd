"""Streamed, checkpointed execution of the model's unit modules.

A *segment* is one module call that belongs to a unit: `model.layers.3` for
block 3, `model.norm` and `lm_head` for the head, `wte` and `wpe` for GPT-2's
embedding. Each segment module's `forward` is wrapped so that, with grad
enabled, it runs as `_SegmentFunction`, a reentrant activation checkpoint:

* forward: acquire the units the segment needs, run the original forward
  without building a graph, keep only its inputs, release the units;
* backward: acquire the units again, recompute the forward with grad from the
  saved inputs, backpropagate through it (the parameters' post-accumulate
  hooks apply the update rule right there), release, return input gradients.

The unit's parameters are not inputs of the function, so the outer autograd
graph never holds them: weights can leave memory between forward and backward.
A zero-size tensor that requires grad is passed as an extra input so backward
runs even for the embedding, whose only real input is integer token ids.

A segment may be nested in another: with blocks split in two, a block's MLP is a
segment (and a unit) inside the block's. In the block's forward (no grad) it runs
with its unit acquired, released as soon as it returns; in the block's recompute
it keeps its graph (below), so backward goes through it without a second
recompute, its unit pinned from its recomputed forward to its backward. So the
block's attention half and its MLP half come and go separately, and a tight
budget can load one while the other computes.

A segment with `keep_graph` (the head: final norm and lm_head) is not
recomputed: its forward runs with grad inside the function and keeps that small
graph (the lm_head's input, 2.4 MB for 8 x 128 tokens of SmolLM2, and the
weight) until backward, which backpropagates through it directly. The logits it
produces must exist for the loss anyway, so this costs almost no memory and
saves a second lm_head matmul (1024 x 576 x 49152 x 2 = 58 GFLOP per step on the
demo). Its units stay acquired from its forward to its backward (the runtime
keeps their pins), so the kept graph never points into an evicted buffer.

With grad disabled (evaluation, generation) a segment just runs with its units
acquired.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils import _pytree as pytree


@dataclass
class Segment:
    """One wrapped module call."""

    path: str                    # module path inside the HF model, e.g. "model.layers.0"
    owner: str                   # the unit it belongs to
    needs: list[str]             # units whose parameters it reads (owner, plus e.g. "embed" for a tied lm_head)
    module: nn.Module
    forward: Callable[..., Any]  # the module's original bound forward
    params: list[nn.Parameter] = field(default_factory=list)
    keep_graph: bool = False     # keep the forward's graph until backward instead of recomputing it
    may_keep_graph: bool = False  # keep_graph is allowed for this segment (the runtime decides per step)
    parent: "Segment | None" = field(default=None, repr=False)  # the segment this one runs inside (a block's MLP)
    children: list["Segment"] = field(default_factory=list, repr=False)  # segments nested in this one


def parent_indices(paths: list[str]) -> list[int | None]:
    """For each segment path (in call order), the index of the segment it runs inside: the nearest
    earlier path it lies under (a block's MLP under its block), or None for a top-level one."""
    return [next((j for j in range(i - 1, -1, -1) if path.startswith(paths[j] + ".")), None)
            for i, path in enumerate(paths)]


def access_sequences(segments: list[Segment]) -> tuple[list[str], list[str]]:
    """The order in which a training step's forward and backward acquire units.

    Forward: each segment in call order (a nested one inside its parent, so right after it).
    Backward, for each top-level segment from the last: the segment (its recompute), each nested
    segment's forward inside that recompute, then their backwards in reverse."""
    forward = [n for s in segments for n in s.needs]
    backward: list[str] = []
    for seg in reversed([s for s in segments if s.parent is None]):
        backward += seg.needs
        for child in seg.children:
            backward += child.needs
        for child in reversed(seg.children):
            backward += child.needs
    return forward, backward


class SegmentHooks:
    """What a segment calls back into (the runtime implements it)."""

    def segment_forward_begin(self, segment: Segment, grad: bool) -> None: ...

    def segment_forward_end(self, segment: Segment, grad: bool, kept: "KeptGraph | None" = None) -> None:
        """`kept`: the forward kept its graph (keep_graph); its units must stay resident until
        `kept.drop()` or the matching backward."""

    def segment_backward_begin(self, segment: Segment) -> None: ...

    def segment_backward_end(self, segment: Segment, kept: "KeptGraph | None" = None) -> None:
        """`kept`: this backward went through the graph its forward kept."""


class KeptGraph:
    """The graph a keep_graph segment's forward kept, until its backward or `drop()`.

    `drop()` turns that segment's backward into the ordinary recompute (from the
    inputs every segment saves), so the runtime can let its units go when the
    step needs the memory for something else (a second forward before backward)."""

    def __init__(self, inputs: list[Any], edges: list[Any]) -> None:
        self.inputs: list[Any] | None = inputs
        self.edges: list[Any] | None = edges

    @property
    def alive(self) -> bool:
        return self.inputs is not None

    def drop(self) -> None:
        self.inputs = self.edges = None


class _SegmentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, segment: Segment, hooks: SegmentHooks, spec, layout: "_OutLayout", _anchor: torch.Tensor, *flat: Any):  # type: ignore[override]
        ctx.segment, ctx.hooks, ctx.spec = segment, hooks, spec
        ctx.rng_state = torch.get_rng_state()
        ctx.cuda_rng_state = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        tensor_idx = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        ctx.tensor_idx = tensor_idx
        ctx.others = [None if isinstance(x, torch.Tensor) else x for x in flat]
        ctx.save_for_backward(*[flat[i] for i in tensor_idx])
        ctx.kept = None
        if segment.keep_graph:
            inputs = [x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x for x in flat]
            args, kwargs = pytree.tree_unflatten(inputs, spec)
            hooks.segment_forward_begin(segment, grad=True)
            try:
                with torch.enable_grad():
                    out = segment.forward(*args, **kwargs)
            except BaseException:
                hooks.segment_forward_end(segment, grad=True)
                raise
            # Keep the graph, not the outputs: a gradient edge holds the node, not the logits' storage
            # (201 MB on the demo), which the caller may drop once the loss is computed.
            edges = [get_gradient_edge(x) if x.requires_grad else None
                     for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
            ctx.kept = KeptGraph(inputs, edges)
            out = pytree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, out)
            hooks.segment_forward_end(segment, grad=True, kept=ctx.kept)
        else:
            args, kwargs = pytree.tree_unflatten(list(flat), spec)
            hooks.segment_forward_begin(segment, grad=True)
            try:
                out = segment.forward(*args, **kwargs)
            finally:
                hooks.segment_forward_end(segment, grad=True)
        out_flat, out_spec = pytree.tree_flatten(out)
        # apply() returns only tensors; the wrapper rebuilds the output structure from `layout`.
        layout.spec = out_spec
        layout.others = [None if isinstance(x, torch.Tensor) else x for x in out_flat]
        layout.is_tensor = [isinstance(x, torch.Tensor) for x in out_flat]
        tensors = tuple(x for x in out_flat if isinstance(x, torch.Tensor))
        ctx.mark_non_differentiable(*[t for t in tensors if not t.is_floating_point()])
        return tensors

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):  # type: ignore[override]
        segment, hooks = ctx.segment, ctx.hooks
        if ctx.kept is not None and ctx.kept.alive:
            return _backward_kept(ctx, grad_outputs)
        saved = ctx.saved_tensors
        flat = list(ctx.others)
        needs_grad = []
        for i, t in zip(ctx.tensor_idx, saved):
            detached = t.detach()
            wants = ctx.needs_input_grad[_LEADING + i] and t.is_floating_point()
            detached.requires_grad_(wants)
            if wants:
                needs_grad.append((i, detached))
            flat[i] = detached
        args, kwargs = pytree.tree_unflatten(flat, ctx.spec)
        hooks.segment_backward_begin(segment)
        try:
            with torch.random.fork_rng(devices=[] if ctx.cuda_rng_state is None else [torch.cuda.current_device()]):
                torch.set_rng_state(ctx.rng_state)
                if ctx.cuda_rng_state is not None:
                    torch.cuda.set_rng_state(ctx.cuda_rng_state)
                with torch.enable_grad():
                    out = segment.forward(*args, **kwargs)
            outs = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
            pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        finally:
            hooks.segment_backward_end(segment)
        grads: list[torch.Tensor | None] = [None] * len(flat)
        for i, detached in needs_grad:
            grads[i] = detached.grad
        return (*([None] * _LEADING), *grads)


_LEADING = 5  # segment, hooks, spec, layout, anchor come before the flattened inputs


def _backward_kept(ctx, grad_outputs: tuple[torch.Tensor, ...]):
    """Backward of a `keep_graph` segment: through the graph its forward kept, no recompute.

    retain_graph: exact norm clipping runs backward twice, and each pass must find the graph.
    It is freed with `ctx`, when the outer graph goes."""
    segment, hooks, kept = ctx.segment, ctx.hooks, ctx.kept
    inputs, edges = kept.inputs, kept.edges
    hooks.segment_backward_begin(segment)
    try:
        pairs = [(e, g) for e, g in zip(edges, grad_outputs) if g is not None and e is not None]
        wanted = [x for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad
                  and ctx.needs_input_grad[_LEADING + i]]
        for x in wanted:
            x.grad = None
        if pairs:
            # A nested segment's graph belongs to one recompute of its parent: used once.
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], retain_graph=segment.parent is None)
    finally:
        hooks.segment_backward_end(segment, kept=kept)
    grads = [x.grad if isinstance(x, torch.Tensor) and x.requires_grad and ctx.needs_input_grad[_LEADING + i] else None
             for i, x in enumerate(inputs)]
    return (*([None] * _LEADING), *grads)


@dataclass
class _OutLayout:
    """How to rebuild a segment's output from the tensors `apply` returns."""

    spec: Any = None
    is_tensor: list[bool] = field(default_factory=list)
    others: list[Any] = field(default_factory=list)


def wrap_segment(segment: Segment, hooks: SegmentHooks) -> None:
    """Replace the segment module's forward by the streamed, checkpointed one."""
    anchor = torch.empty(0, requires_grad=True)

    def streamed_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            hooks.segment_forward_begin(segment, grad=False)
            try:
                return segment.forward(*args, **kwargs)
            finally:
                hooks.segment_forward_end(segment, grad=False)
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise RuntimeError(
                f"{segment.path}: a KV cache cannot be used with grad enabled (the checkpointed recompute "
                "would update it twice); pass use_cache=False for training"
            )
        flat, spec = pytree.tree_flatten((args, kwargs))
        layout = _OutLayout()
        tensors = iter(_SegmentFunction.apply(segment, hooks, spec, layout, anchor, *flat))
        leaves = [next(tensors) if is_tensor else other for is_tensor, other in zip(layout.is_tensor, layout.others)]
        return pytree.tree_unflatten(leaves, layout.spec)

    segment.module.forward = streamed_forward  # type: ignore[method-assign]

"""A causal-LM loss that keeps no [tokens, vocab] log-softmax for backward.

`torch.nn.functional.cross_entropy` saves its log-softmax output (tokens x vocab,
the size of the logits) for backward, and its backward makes two more tensors of
that size (the gradient of the log-softmax, then of the logits). On the demo
(SmolLM2-135M, 8 x 128 tokens, vocab 49152) each is 201 MB, and the step's peak
RSS is reached there, in the loss. `CrossEntropy` computes the same loss and the
same gradient in blocks of rows: forward keeps only each row's picked
log-probability, backward recomputes each block's log-softmax and writes that
block of the gradient straight into the one gradient tensor. The row-wise
kernels are torch's own (`log_softmax`, `nll_loss` and their backwards), each row
independent of the others, so the loss and the gradient are bit-identical to
`cross_entropy`'s (tests/test_loss.py checks). Cost: one more log-softmax pass
in backward.

`causal_lm_loss` is transformers' `ForCausalLMLoss` (transformers 5) with that
cross entropy; `install` makes it a model's `loss_function` where the model uses
the default causal-LM loss.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

BLOCK_BYTES = 16 * 2**20  # fp32 bytes of one block of log-probabilities (rows x vocab)
_REDUCTIONS = {"mean": 1, "sum": 2}  # torch's Reduction enum values


class CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str):  # type: ignore[override]
        valid = target != ignore_index
        index = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
        picked = torch.empty(logits.shape[0], 1, dtype=logits.dtype, device=logits.device)
        block = _scratch(logits)
        for start, stop in _spans(logits, block):
            part = block[: stop - start]
            torch.ops.aten._log_softmax.out(logits[start:stop], 1, False, out=part)
            torch.gather(part, 1, index[start:stop], out=picked[start:stop])
        del block
        # The picked column, with target 0 where a row counts: nll_loss reduces the same values in
        # the same order as over the full log-softmax.
        column_target = torch.where(valid, torch.zeros_like(target), target)
        loss, total_weight = torch.ops.aten.nll_loss_forward(picked, column_target, None, _REDUCTIONS[reduction],
                                                            ignore_index)
        ctx.save_for_backward(logits, index, picked, column_target, total_weight)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        logits, index, picked, column_target, total_weight = ctx.saved_tensors
        # Each row's gradient of the picked log-probability, as nll_loss's backward makes it.
        column = torch.ops.aten.nll_loss_backward(grad_loss, picked, column_target, None, _REDUCTIONS[ctx.reduction],
                                                  ctx.ignore_index, total_weight)
        grad = torch.empty_like(logits)
        block, upstream = _scratch(logits), _scratch(logits)
        for start, stop in _spans(logits, block):
            part, up = block[: stop - start], upstream[: stop - start]
            torch.ops.aten._log_softmax.out(logits[start:stop], 1, False, out=part)
            up.zero_().scatter_(1, index[start:stop], column[start:stop])
            torch.ops.aten._log_softmax_backward_data.out(up, part, 1, part.dtype, out=grad[start:stop])
        return grad, None, None, None


def _scratch(logits: torch.Tensor) -> torch.Tensor:
    """One block of rows x vocab. On CPU its own mmap (io.aligned_empty), unmapped when freed: heap
    chunks of this size would stay mapped after the loss, as the next units' temporaries reuse
    them piecemeal (measured: +200 MB of peak RSS on the demo)."""
    rows = min(logits.shape[0], max(1, BLOCK_BYTES // (logits.shape[1] * logits.element_size())))
    shape = (rows, logits.shape[1])
    if logits.device.type != "cpu":
        return torch.empty(shape, dtype=logits.dtype, device=logits.device)
    from .io import aligned_empty

    n = rows * logits.shape[1]
    return aligned_empty(n * logits.element_size()).view(logits.dtype)[:n].view(shape)


def _spans(logits: torch.Tensor, block: torch.Tensor):
    rows = block.shape[0]
    return ((start, min(start + rows, logits.shape[0])) for start in range(0, logits.shape[0], rows))


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """`torch.nn.functional.cross_entropy(logits, target, ignore_index=, reduction=)` for 2-D logits
    and class-index targets, without the saved log-softmax."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r}: 'mean' or 'sum'")
    return CrossEntropy.apply(logits, target, ignore_index, reduction)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                   shift_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """transformers' `ForCausalLMLoss`, step for step, with `cross_entropy` above."""
    logits = logits.float()
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    logits = logits.view(-1, vocab_size)
    shift_labels = shift_labels.view(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def install(model: nn.Module) -> bool:
    """Make `causal_lm_loss` the model's loss where it would use transformers' default causal-LM
    loss (and no loss of the caller's is set). Whether it did."""
    if "_loss_function" in vars(model) or not hasattr(type(model), "loss_function"):
        return False
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:
        return False
    if model.loss_function is not LOSS_MAPPING.get("ForCausalLM"):
        return False
    model.loss_function = causal_lm_loss
    return True

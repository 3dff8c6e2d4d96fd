"""The output projection's weight gradient in row chunks, each applied as soon as it exists.

An untied lm_head's gradient is vocab x hidden fp32 (on a 152k x 1024 head, 594 MiB), and during
the head's backward it sits beside the logits and their gradient: the step's peak. Where the
update of one row depends only on that row's gradient (SGD without weight decay or per-tensor
clipping: `Runtime.row_updates_exact`, the same settings as the embedding's row updates),
`RowChunkedLinear` computes the input gradient first (with the weights as they were), then the
weight's gradient a block of rows at a time, hands each block to `on_rows` (the fused update)
and frees it: at most one block of it is alive. Global-norm clipping still works: each block's
norm is one term of the global norm.

Row i of the chunked product is the same dot products as row i of the whole one (same reduction
over batch x sequence), so the result equals the dense path to rounding (tests/test_row_updates.py,
<= 1e-6 against torch.optim.SGD).
"""
from __future__ import annotations

from typing import Callable

import torch

CHUNK_BYTES = 32 * 2**20
"""fp32 bytes of one block of the weight gradient (rows = CHUNK_BYTES / (hidden x 4))."""


def rows_per_chunk(hidden: int) -> int:
    return max(1, CHUNK_BYTES // (4 * hidden))


class RowChunkedLinear(torch.autograd.Function):
    """`x @ weight().T` whose backward gives `on_rows(rows, grad_rows)` per block of weight rows
    instead of a gradient for the weight. `weight` is a callable: the parameter may be rebound to
    another buffer between forward and backward (streamed units), and backward reads it then,
    before any block is updated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Callable[[], torch.Tensor],
                on_rows: Callable[[slice, torch.Tensor], None], rows: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.weight, ctx.on_rows, ctx.rows = weight, on_rows, rows
        return torch.nn.functional.linear(x, weight())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        w = ctx.weight()
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = (g @ w).view(x.shape) if ctx.needs_input_grad[0] else None  # before any row changes
        xs = x.reshape(-1, x.shape[-1])
        for start in range(0, w.shape[0], ctx.rows):
            block = slice(start, min(start + ctx.rows, w.shape[0]))
            ctx.on_rows(block, g[:, block].t() @ xs)
        return grad_x, None, None, None

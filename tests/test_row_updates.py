"""Row updates: the input embedding's gradient as the rows a batch used (a sparse gradient)
instead of a dense vocab x hidden tensor, where that is exact (Runtime.row_updates_exact); and,
with the same settings, the lm_head's gradient applied a block of rows at a time (head.py).

Reference: `torch.optim.SGD` on the dense model in memory; fp32, <= 1e-6, streamed under a
budget of about one block. The peak-memory figure on a 152k vocabulary is measured by
tools/bench_row_updates.py, not here.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model
from lomo_runtime import SGD, AdamW, Runtime
from lomo_runtime.errors import UserError

STEPS = 4
LR = 0.05


def _budget(model_dir: Path, tmp: Path) -> int:
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp / "probe") as rt:
        return rt.minimum_weights_budget()


@pytest.mark.parametrize("rule", [SGD(lr=LR), SGD(lr=LR, clip_grad_norm=0.5)], ids=["sgd", "sgd-clip-norm"])
def test_row_updates_equal_torch_sgd_and_the_dense_path(tmp_path: Path, rule) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 40, (2, 16), generator=gen) for _ in range(STEPS)]  # rows 40-127 never used
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref.config.use_cache = False
    start = copy.deepcopy(ref.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for ids in batches:
        opt.zero_grad()
        ref(input_ids=ids, labels=ids).loss.backward()
        if rule.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), rule.clip_grad_norm)
        opt.step()
    expected = ref.state_dict()
    budget = _budget(model_dir, tmp_path)
    results = {}
    for rows in (True, False):
        with Runtime(model_dir, copy.deepcopy(rule), work_dir=tmp_path / f"w-{rows}", weights_budget=budget,
                     row_updates=None if rows else False) as rt:
            assert rt.row_updates is rows
            for ids in batches:
                assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped
            results[rows] = dict(rt.iter_weights())
    emb = "model.embed_tokens.weight"
    assert torch.equal(results[True][emb][40:], start[emb][40:])  # unused rows untouched
    for name, tensor in results[True].items():
        assert (tensor - expected[name]).abs().max().item() <= 1e-6, name
        assert (tensor - results[False][name]).abs().max().item() <= 1e-6, name


def test_row_updates_are_off_where_they_would_not_be_exact(tmp_path: Path) -> None:
    untied = make_tiny_model(tmp_path, arch="llama", tied=False)
    tied = make_tiny_model(tmp_path, arch="llama", tied=True)
    for label, model_dir, rule, kwargs in [
        ("adamw", untied, AdamW(lr=LR), {}), ("weight decay", untied, SGD(lr=LR, weight_decay=0.1), {}),
        ("tied", tied, SGD(lr=LR), {}), ("bf16", untied, SGD(lr=LR), {"dtype": torch.bfloat16}),
        ("accumulation", untied, SGD(lr=LR), {"grad_accumulation": True}),
    ]:
        with Runtime(model_dir, rule, work_dir=tmp_path / label.replace(" ", "-"), **kwargs) as rt:
            assert rt.row_updates is False, label
            assert rt.model.get_input_embeddings().sparse is False
    with pytest.raises(UserError, match="row_updates=True"):
        Runtime(untied, AdamW(lr=LR), work_dir=tmp_path / "forced", row_updates=True)


@pytest.mark.parametrize("rule", [SGD(lr=LR), SGD(lr=LR, clip_grad_norm=0.5),
                                  SGD(lr=LR, clip_grad_norm=0.5, clip_mode="previous")],
                         ids=["sgd", "clip-exact", "clip-previous"])
def test_the_head_in_row_blocks_equals_torch_sgd(tmp_path: Path, monkeypatch, rule) -> None:
    """Blocks of 10 rows of the 128-row lm_head (13 blocks, the last of 8): each applied as it is
    computed, the lm_head never holding a whole gradient; global-norm clipping sums the blocks'
    norms. Against torch.optim.SGD with torch's clip_grad_norm_ (and the "previous" coefficient)."""
    from lomo_runtime import head

    monkeypatch.setattr(head, "CHUNK_BYTES", 10 * 32 * 4)  # hidden 32: 10 rows a block
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(STEPS)]
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref.config.use_cache = False
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    previous = None
    for ids in batches:
        opt.zero_grad()
        ref(input_ids=ids, labels=ids).loss.backward()
        if rule.clip_grad_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")))
            basis = norm if rule.clip_mode == "exact" or previous is None else previous
            for p in ref.parameters():
                p.grad.mul_(min(1.0, rule.clip_grad_norm / (basis + 1e-6)))
            previous = norm
        opt.step()
    blocks = []
    original = head.RowChunkedLinear.backward

    def counting(ctx, grad_out):
        blocks.append(-(-ctx.weight().shape[0] // ctx.rows))
        return original(ctx, grad_out)

    monkeypatch.setattr(head.RowChunkedLinear, "backward", staticmethod(counting))
    with Runtime(model_dir, copy.deepcopy(rule), work_dir=tmp_path / "w", weights_budget=_budget(model_dir, tmp_path)) as rt:
        assert rt._chunked_head()
        for ids in batches:
            assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped
        trained = dict(rt.iter_weights())
    assert blocks and set(blocks) == {13}  # every backward through the head went block by block
    expected = ref.state_dict()
    for name, tensor in trained.items():
        assert (tensor - expected[name]).abs().max().item() <= 1e-6, name

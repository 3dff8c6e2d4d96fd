"""Streamed training against in-memory references.

Tolerance: fp32, max abs difference <= 1e-6 (the issue's bar). In practice the
streamed path runs the same kernels in the same order as the reference, so the
differences are 0.0; the bound leaves room for BLAS blocking differences.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model
from lomo_runtime import SGD, Runtime
from lomo_runtime.errors import DoesNotFit

STEPS = 5
LR = 0.05


def _batches(vocab: int, steps: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 16), generator=gen) for _ in range(steps)]


def _unit_bytes(model_dir: Path, tmp_path: Path) -> dict[str, int]:
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "sizes") as rt:
        return {name: rec.nbytes for name, rec in rt.store.units.items()}


def _budgets(sizes: dict[str, int], tied: bool) -> dict[str, int | None]:
    """Whole model, about half of it, and the smallest budget that can run a step."""
    largest_block = max(v for k, v in sizes.items() if k.startswith("block."))
    # A tied embedding holds a pending gradient from the head's backward to its own,
    # so it stays resident beside each block during backward.
    single = largest_block + (sizes["embed"] if tied else 0)
    single = max(single, sizes["head"] + (sizes["embed"] if tied else 0), sizes["embed"])
    return {"whole": None, "half": max(single, sum(sizes.values()) // 2), "single-block": single}


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("gpt2", True), ("qwen2", False)])
def test_streamed_sgd_matches_torch_sgd(tmp_path: Path, arch: str, tied: bool) -> None:
    model_dir = make_tiny_model(tmp_path, arch=arch, tied=tied, sharded=True)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference.config.use_cache = False
    batches = _batches(reference.config.vocab_size, STEPS)
    budgets = _budgets(_unit_bytes(model_dir, tmp_path), tied)

    for label, budget in budgets.items():
        ref = copy.deepcopy(reference)
        ref.train()
        torch.manual_seed(0)  # dropout (GPT-2) draws the same masks in both
        opt = torch.optim.SGD(ref.parameters(), lr=LR)
        ref_losses = []
        for ids in batches:
            out = ref(input_ids=ids, labels=ids)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            ref_losses.append(out.loss.item())

        torch.manual_seed(0)
        with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / f"work-{label}", weights_budget=budget) as rt:
            losses = []
            for ids in batches:
                out = rt.model(input_ids=ids, labels=ids)
                result = rt.backward(out.loss)
                assert not result.dropped
                losses.append(out.loss.item())
            assert rt.step == STEPS
            if budget is not None:
                assert rt.scheduler.stats.peak_resident_bytes <= budget
            trained = dict(rt.iter_weights())
        expected = ref.state_dict()
        for name, tensor in trained.items():
            diff = (tensor - expected[name]).abs().max().item()
            assert diff <= 1e-6, f"{arch} tied={tied} budget={label}: {name} differs by {diff}"
        assert losses == pytest.approx(ref_losses, abs=1e-6)


def test_backward_recomputes_each_unit_and_holds_one_gradient(tmp_path: Path) -> None:
    """Backward FLOPs include a second forward (the recompute); at most one gradient is alive
    at a time, apart from the tied embedding's, which waits for its second contribution."""
    untied = make_tiny_model(tmp_path, arch="llama", tied=False)
    ids = _batches(128, 1)[0]
    reference = AutoModelForCausalLM.from_pretrained(untied, dtype=torch.float32)
    with FlopCounterMode(display=False) as plain:
        reference(input_ids=ids, labels=ids).loss.backward()
    with FlopCounterMode(display=False) as fwd_only:
        with torch.no_grad():
            reference(input_ids=ids, labels=ids)

    with Runtime(untied, SGD(lr=LR), work_dir=tmp_path / "work") as rt:
        rt.track_gradients = True
        out = rt.model(input_ids=ids, labels=ids)
        with FlopCounterMode(display=False) as streamed:
            rt.backward(out.loss)
        assert rt.max_grads_alive == 1
    with FlopCounterMode(display=False) as head_only, torch.no_grad():
        reference.lm_head(reference.model.norm(torch.randn(*ids.shape, reference.config.hidden_size)))
    forward_flops = fwd_only.get_total_flops()
    backward_flops = plain.get_total_flops() - forward_flops
    # The streamed backward recomputes every unit's forward but the head's, whose graph is kept
    # from forward to backward: the plain backward plus a forward without the lm_head matmul
    # (the loss itself is outside the units, and tiny).
    assert head_only.get_total_flops() > 0
    expected = backward_flops + forward_flops - head_only.get_total_flops()
    assert streamed.get_total_flops() == pytest.approx(expected, rel=0.02)
    assert streamed.get_total_flops() > backward_flops * 1.2


def test_non_finite_loss_drops_the_step(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    ids = _batches(128, 1)[0]
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "work") as rt:
        before = {k: v.clone() for k, v in rt.iter_weights()}
        out = rt.model(input_ids=ids, labels=ids)
        result = rt.backward(out.loss * float("nan"))
        assert result.dropped and rt.step == 0
        after = dict(rt.iter_weights())
        assert all(torch.equal(before[k], after[k]) for k in before)
        out = rt.model(input_ids=ids, labels=ids)  # the runtime is usable again
        assert not rt.backward(out.loss).dropped and rt.step == 1


def test_non_finite_gradient_mid_backward_leaves_no_partial_update(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    ids = _batches(128, 1)[0]
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "work", weights_budget=None) as rt:
        before = {k: v.clone() for k, v in rt.iter_weights()}
        # Poison block 0 only: the head and block 1 are updated before backward reaches it.
        poison = rt.model.get_parameter("model.layers.0.mlp.down_proj.weight")
        handle = poison.register_hook(lambda g: torch.full_like(g, float("inf")))
        out = rt.model(input_ids=ids, labels=ids)
        result = rt.backward(out.loss)
        handle.remove()
        assert result.dropped and "model.layers.0.mlp.down_proj.weight" in result.reason
        after = dict(rt.iter_weights())
        assert all(torch.equal(before[k], after[k]) for k in before)
        # Resident units were rolled back too: a fresh forward sees the old weights.
        with torch.no_grad():
            again = rt.model(input_ids=ids, labels=ids).loss
        assert again.item() == pytest.approx(out.loss.item(), abs=0)


def test_budget_below_the_minimum_is_refused_at_start(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    ids = _batches(128, 1)[0]
    with pytest.raises(DoesNotFit, match="raise it to at least 64 KiB"):
        Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "work", weights_budget=4096)
    # Exactly the minimum runs a step (the check is not conservative).
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "work2", weights_budget=64 * 1024) as rt:
        assert rt.minimum_weights_budget() == 64 * 1024
        assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped

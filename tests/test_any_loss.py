"""Any loss built from `rt.model`'s outputs gives the weights `torch.optim.SGD` gives.

The losses here leave parts of the model without a gradient, reach only one
use of a tied weight, run the model twice in one step, or freeze parameters.
The reference is the same Hugging Face model trained in memory with
`torch.optim.SGD` (which skips parameters whose `.grad` is None). Both run
under a weights budget of about one block, so units stream and are evicted.

Tolerance: fp32, max abs difference <= 1e-6 on every weight after 3 steps.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model
from lomo_runtime import SGD, Runtime

STEPS = 3
LR = 0.05
TOL = 1e-6


def _batches(vocab: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 16), generator=gen) for _ in range(STEPS)]


def _hidden_last(model, ids):
    return model(input_ids=ids, output_hidden_states=True).hidden_states[-1].pow(2).mean()


def _hidden_first_block(model, ids):
    # Only the embedding and block 0 get a gradient; later blocks and the head get none.
    return model(input_ids=ids, output_hidden_states=True).hidden_states[1].pow(2).mean()


def _two_forwards(model, ids):
    # Two forwards before one backward (a contrastive or preference loss): every segment runs twice.
    flipped = ids.flip(0)
    return model(input_ids=ids, labels=ids).loss + 0.5 * model(input_ids=flipped, labels=flipped).loss


def _logits_of_some_positions(model, ids):
    return model(input_ids=ids).logits[:, :4].logsumexp(-1).mean()


LOSSES: dict[str, Callable] = {
    "hidden-states-last": _hidden_last,
    "hidden-states-block-0": _hidden_first_block,
    "two-forwards": _two_forwards,
    "logits-slice": _logits_of_some_positions,
}


def _freeze_none(model) -> None:
    pass


def _freeze_block0_and_norm(model) -> None:
    base = model.base_model
    layers = base.layers if hasattr(base, "layers") else base.h
    layers[0].requires_grad_(False)
    (base.norm if hasattr(base, "norm") else base.ln_f).requires_grad_(False)


def _freeze_embedding(model) -> None:
    model.get_input_embeddings().requires_grad_(False)  # a tied lm_head is the same parameter


FREEZE: dict[str, Callable] = {"none": _freeze_none, "block0+norm": _freeze_block0_and_norm,
                               "embedding": _freeze_embedding}


def _one_block_budget(model_dir: Path, tmp_path: Path) -> int:
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "sizes") as rt:
        return rt.minimum_weights_budget()


def _check(model_dir: Path, tmp_path: Path, loss_fn: Callable, freeze: Callable, label: str) -> None:
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference.config.use_cache = False
    reference.train()
    batches = _batches(reference.config.vocab_size)
    budget = _one_block_budget(model_dir, tmp_path)

    ref = copy.deepcopy(reference)
    freeze(ref)
    torch.manual_seed(0)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=LR)
    ref_losses = []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ref, ids)
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())

    torch.manual_seed(0)
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / f"work-{label}", weights_budget=budget,
                 commit_every=2) as rt:
        freeze(rt.model)
        losses = []
        for ids in batches:
            loss = loss_fn(rt.model, ids)
            result = rt.backward(loss)
            assert not result.dropped, result.reason
            losses.append(loss.item())
        assert rt.scheduler.stats.peak_resident_bytes <= budget
        trained = dict(rt.iter_weights())
    expected = ref.state_dict()
    before = reference.state_dict()
    for name, tensor in trained.items():
        diff = (tensor - expected[name]).abs().max().item()
        moved = (expected[name] - before[name]).abs().max().item()
        assert diff <= TOL, f"{label}: {name} differs from torch.optim.SGD by {diff} (SGD moved it by {moved})"
    assert losses == pytest.approx(ref_losses, abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_any_loss_equals_torch_sgd(tmp_path: Path, arch: str, loss_name: str) -> None:
    model_dir = make_tiny_model(tmp_path, arch=arch, tied=True)
    _check(model_dir, tmp_path, LOSSES[loss_name], _freeze_none, f"{arch}-{loss_name}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("freeze", ["block0+norm", "embedding"])
def test_frozen_parameters_equal_torch_sgd(tmp_path: Path, arch: str, freeze: str) -> None:
    model_dir = make_tiny_model(tmp_path, arch=arch, tied=True)
    _check(model_dir, tmp_path, lambda m, ids: m(input_ids=ids, labels=ids).loss, FREEZE[freeze], f"{arch}-{freeze}")


def test_hidden_state_loss_on_an_untied_llama(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    _check(model_dir, tmp_path, _hidden_last, _freeze_none, "untied-hidden")


def test_inputs_embeds_skip_the_embedding_segment(tmp_path: Path) -> None:
    """A forward from `inputs_embeds` never runs the embedding: the tied weight's only use is the lm_head."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    gen = torch.Generator().manual_seed(3)
    embeds = [torch.randn(2, 16, 32, generator=gen) for _ in range(STEPS)]

    def loss_fn(model, ids):
        x = embeds[int(ids[0, 0]) % STEPS]
        return model(inputs_embeds=x, labels=ids).loss

    _check(model_dir, tmp_path, loss_fn, _freeze_none, "inputs-embeds")

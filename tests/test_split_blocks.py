"""Blocks cut in two (`block.{i}` and `block.{i}.mlp`, a segment nested in the block's) and the
lean causal-LM loss (loss.py): same numbers as torch and transformers, less waiting and memory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lomo_runtime import SGD, AdamW, Runtime
from lomo_runtime.checkpoint import Checkpoint
from lomo_runtime.checkpoint.architectures import architecture_for, assign_units
from lomo_runtime.errors import UserError
from lomo_runtime.loss import causal_lm_loss, cross_entropy, install
from lomo_runtime.planner.residency import simulate
from lomo_runtime.planner.spec import ModelSpec
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from helpers import make_tiny_model, tiny_config, torch_adamw_reference, torch_sgd_reference


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_split_units_put_each_mlp_tensor_in_its_own_unit(arch):
    config = tiny_config(arch).to_dict()
    family = architecture_for(config)
    assert family.unit_names(config, split=True) == ["embed", "block.0", "block.0.mlp", "block.1", "block.1.mlp", "head"]
    owners = assign_units(family, family.expected_shapes(config), config, split=True)
    for name, unit in owners.items():
        assert unit.endswith(".mlp") == (".mlp." in name), name
        assert unit == family.unit_of(name, config, split=True)
    whole = assign_units(family, family.expected_shapes(config), config)
    assert set(whole.values()) == {"embed", "block.0", "block.1", "head"}


def _batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(n)]


def _train(rt: Runtime, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    for ids in batches:
        rt.backward(rt.model(input_ids=ids, labels=ids).loss)
    return {k: v.clone() for k, v in rt.iter_weights()}


def _smallest_budget(model_dir: Path, tmp_path: Path, rule=None) -> int:
    """The least weights budget a step needs, split (rule state included)."""
    with Runtime(model_dir, rule or SGD(lr=0.05), work_dir=tmp_path / "probe", weights_budget=1 << 40) as rt:
        return rt.minimum_weights_budget()


@pytest.mark.parametrize("tied", [True, False])
def test_split_streamed_sgd_equals_torch_sgd_at_the_smallest_budget(tmp_path, tied):
    """fp32 SGD, every unit streamed (the budget is the least one step needs), commit every 2:
    weights equal torch.optim.SGD's to 1e-6."""
    model_dir = make_tiny_model(tmp_path, "llama", tied=tied)
    batches = _batches()
    ref = torch_sgd_reference(model_dir, batches, 0.05).state_dict()
    budget = _smallest_budget(model_dir, tmp_path)
    with Runtime(model_dir, SGD(lr=0.05), work_dir=tmp_path / "w", weights_budget=budget, commit_every=2) as rt:
        assert "block.0.mlp" in rt.store.units  # a budget given: the new store is split
        weights = _train(rt, batches)
        assert rt.scheduler.stats.reads > len(rt.store.units) * len(batches)  # units did stream
        assert rt.scheduler.stats.peak_resident_bytes <= budget
    for name, value in weights.items():
        assert (value - ref[name]).abs().max().item() <= 1e-6, name


def test_split_adamw_with_exact_clipping_equals_torch(tmp_path):
    """Two backward passes (norms, then updates): the nested MLP segments recompute in both. AdamW
    with clipping at a norm the gradients exceed, against torch's clip_grad_norm_ + AdamW."""
    model_dir = make_tiny_model(tmp_path, "llama", tied=True)
    batches = _batches(3)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref.train()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    for ids in batches:
        opt.zero_grad()
        ref(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
    with Runtime(model_dir, AdamW(lr=1e-2, clip_grad_norm=0.5), work_dir=tmp_path / "w",
                 weights_budget=_smallest_budget(model_dir, tmp_path, AdamW(lr=1e-2)), split_blocks=True) as rt:
        weights = _train(rt, batches)
    expected = ref.state_dict()
    for name, value in weights.items():
        assert (value - expected[name]).abs().max().item() <= 1e-5, name


def test_split_adamw_equals_torch_adamw(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama", tied=False)
    batches = _batches(3)
    ref = torch_adamw_reference(model_dir, batches, lr=1e-2).state_dict()
    with Runtime(model_dir, AdamW(lr=1e-2), work_dir=tmp_path / "w", split_blocks=True) as rt:
        weights = _train(rt, batches)
    for name, value in weights.items():
        assert (value - ref[name]).abs().max().item() <= 1e-6, name


def test_split_follows_the_budget_and_a_resumed_store_keeps_its_units(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama", tied=True)
    batches = _batches(2)
    with Runtime(model_dir, SGD(lr=0.05), work_dir=tmp_path / "whole") as rt:
        assert not rt.checkpoint.split and "block.0.mlp" not in rt.store.units  # no budget: whole blocks
        _train(rt, batches[:1])
    # Resumed with a budget, the store keeps its whole blocks; and a split store stays split without one.
    with Runtime(model_dir, SGD(lr=0.05), work_dir=tmp_path / "whole", resume=True, weights_budget=1 << 30) as rt:
        assert not rt.checkpoint.split
        _train(rt, batches[1:])
        whole = {k: v.clone() for k, v in rt.iter_weights()}
    with Runtime(model_dir, SGD(lr=0.05), work_dir=tmp_path / "split", weights_budget=1 << 30) as rt:
        assert rt.checkpoint.split
        _train(rt, batches[:1])
    with Runtime(model_dir, SGD(lr=0.05), work_dir=tmp_path / "split", resume=True) as rt:
        assert rt.checkpoint.split and "block.1.mlp" in rt.scheduler.units
        split = _train(rt, batches[1:])
    for name, value in whole.items():
        assert torch.equal(value, split[name]), name
    manifest = json.loads((tmp_path / "split" / "manifest.json").read_text())
    assert "block.0.mlp" in json.dumps(manifest)


def test_split_with_per_unit_clipping_is_refused(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    with pytest.raises(UserError, match="split_blocks"):
        Runtime(model_dir, SGD(lr=0.05, clip_grad_norm=1.0, clip_mode="unit"), work_dir=tmp_path / "w",
                split_blocks=True)
    # Left unset, per-unit clipping keeps whole blocks even under a budget.
    with Runtime(model_dir, SGD(lr=0.05, clip_grad_norm=1.0, clip_mode="unit"), work_dir=tmp_path / "v",
                 weights_budget=1 << 30) as rt:
        assert not rt.checkpoint.split


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("extra", [0, 0.5, 1.5, 3])
def test_replay_of_split_blocks_matches_the_scheduler(tmp_path, tied, extra):
    """The planner's replay reads what the runtime reads, step by step, with the same peaks, for
    budgets from the least a step needs to a few blocks more."""
    model_dir = make_tiny_model(tmp_path, "llama", tied=tied)
    spec = ModelSpec.from_config(tiny_config("llama", tied=tied).to_dict(), split=True)
    block = spec.unit("block.0").nbytes + spec.unit("block.0.mlp").nbytes
    budget = _smallest_budget(model_dir, tmp_path) + int(extra * block) // 4096 * 4096
    sim = simulate(spec, budget, depth=2, steps=3, commit_every=2)
    assert sim.feasible
    with Runtime(model_dir, SGD(lr=1e-3), work_dir=tmp_path / "w", weights_budget=budget, commit_every=2) as rt:
        reads = []
        for ids in _batches(3):
            before = rt.scheduler.stats.reads
            rt.backward(rt.model(input_ids=ids, labels=ids).loss)
            reads.append(rt.scheduler.stats.reads - before)
        assert reads == sim.reads_per_step
        assert rt.scheduler.stats.peak_resident_bytes == sim.peak_resident_bytes
        assert rt.pool.peak_bytes == sim.pool_bytes


@pytest.mark.parametrize("split", [True, False])
def test_the_announced_access_order_is_the_order_units_are_acquired(tmp_path, split):
    """Belady and prefetch plan from `access_sequences`: it must be the order in which a step really
    acquires units (recorded at the scheduler), nested MLP segments included."""
    model_dir = make_tiny_model(tmp_path, "llama", tied=True)
    with Runtime(model_dir, SGD(lr=0.05), work_dir=tmp_path / "w", weights_budget=1 << 30, split_blocks=split) as rt:
        acquired: list[str] = []
        real_acquire = rt.scheduler.acquire
        rt.scheduler.acquire = lambda names: (acquired.extend(names), real_acquire(names))[1]
        ids = _batches(1)[0]
        rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        assert acquired == rt._train_sequence
        assert ("block.0.mlp" in acquired) == split


def test_checkpoint_split_units_cover_every_tensor_once(tmp_path):
    ckpt = Checkpoint.open(make_tiny_model(tmp_path, "qwen2", tied=False))
    split = ckpt.with_split(True)
    assert split.split and not ckpt.split and ckpt.with_split(False) is ckpt
    names = [t for u in split.units for t in u.tensor_names]
    assert sorted(names) == sorted(ckpt.tensors) and len(names) == len(set(names))
    assert len(split.units) == len(ckpt.units) + 2


# ---- the loss ---------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rows,vocab", [(1, 3), (37, 1000), (1024, 49152)])
def test_cross_entropy_is_bit_identical_to_torch(rows, vocab, reduction):
    gen = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[::5] = -100
    if (target == -100).all() and reduction == "mean":
        target[0] = 0
    expected = torch.nn.functional.cross_entropy(logits, target, reduction=reduction)
    (grad_expected,) = torch.autograd.grad(expected * 3.0, logits)
    got = cross_entropy(logits, target, reduction=reduction)
    (grad_got,) = torch.autograd.grad(got * 3.0, logits)
    assert torch.equal(got, expected)
    assert torch.equal(grad_got, grad_expected)


@pytest.mark.parametrize("items", [None, 29])
def test_causal_lm_loss_is_transformers_loss(items):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 11, 300, generator=gen, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 300, (3, 11), generator=gen)
    labels[1, :4] = -100
    kw = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    expected = ForCausalLMLoss(logits, labels, 300, **kw)
    (grad_expected,) = torch.autograd.grad(expected, logits)
    got = causal_lm_loss(logits, labels, 300, **kw)
    (grad_got,) = torch.autograd.grad(got, logits)
    assert torch.equal(got, expected) and torch.equal(grad_got, grad_expected)


def test_install_replaces_only_the_default_loss():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert install(model) and model.loss_function is causal_lm_loss
    mine = AutoModelForCausalLM.from_config(tiny_config("llama"))
    mine.loss_function = lambda *a, **k: None
    assert not install(mine)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (tools/gpu_session.sh runs it on a lent GPU)")
def test_cross_entropy_is_bit_identical_to_torch_on_cuda():
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(1024, 49152, device="cuda", generator=gen) * 4).requires_grad_()
    target = torch.randint(0, 49152, (1024,), device="cuda", generator=gen)
    target[::7] = -100
    expected = torch.nn.functional.cross_entropy(logits, target)
    (grad_expected,) = torch.autograd.grad(expected, logits)
    got = cross_entropy(logits, target)
    (grad_got,) = torch.autograd.grad(got, logits)
    assert torch.equal(got, expected) and torch.equal(grad_got, grad_expected)

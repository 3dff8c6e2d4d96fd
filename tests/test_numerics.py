"""Combinations of the numerical paths against torch written by hand: gradient accumulation with
global-norm clipping ("exact", "previous", "unit"), with AdamW and with tied weights; "unit" clipping
under a weights budget that streams; "previous" clipping across a rollback.

References: the Hugging Face model in memory, trained with torch's own accumulation recipe
(each micro-batch loss divided by k, `.backward()` summing into `.grad`), then
`torch.nn.utils.clip_grad_norm_` or the "previous" coefficient by hand, then `torch.optim.SGD` /
`torch.optim.AdamW` (single-tensor path). Every run streams: the weights budget holds the
embedding and one block (state and accumulation buffers included), so units are evicted, written
and re-read inside every step and between micro-batches.

Tolerance: fp32, max abs difference <= 1e-6 (the runtime sums the same micro-batch gradients in
the same order; the differences are rounding of the clipping coefficient, ~1e-8 here). Each test
also checks that the weights moved far more than that, and that clipping was active.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model
from lomo_runtime import SGD, Runtime
from lomo_runtime.rules import AdamW

K = 2          # micro-batches per step
STEPS = 3
TOL = 1e-6


def _steps(seed: int = 3) -> list[list[torch.Tensor]]:
    """STEPS steps of K micro-batches; each step's micro-batches differ in length, so a step's
    gradient norm differs from the last one's (what "previous" clipping must get right)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [16, 12, 8]
    return [[torch.randint(0, 128, (2, lengths[s]), generator=gen) for _ in range(K)] for s in range(STEPS)]


def _reference(model_dir: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


def _streaming_budget(model_dir: Path, tmp_path: Path, rule, **kwargs) -> int:
    with Runtime(model_dir, rule, work_dir=tempfile.mkdtemp(dir=tmp_path), **kwargs) as rt:
        sizes = {n: r.nbytes for n, r in rt.store.units.items()}
    return sizes["embed"] + max(v for k, v in sizes.items() if k.startswith("block."))


def _global_norm(params: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])).item()


def _check(trained: dict[str, torch.Tensor], ref: torch.nn.Module, start: dict[str, torch.Tensor]) -> None:
    expected = ref.state_dict()
    moved = 0.0
    for name, tensor in trained.items():
        diff = (tensor - expected[name]).abs().max().item()
        assert diff <= TOL, f"{name} differs by {diff}"
        moved = max(moved, (expected[name] - start[name]).abs().max().item())
    assert moved > 1000 * TOL  # the references really trained


def _run(model_dir: Path, tmp_path: Path, rule, steps: list[list[torch.Tensor]]) -> tuple[dict, list]:
    budget = _streaming_budget(model_dir, tmp_path, rule, grad_accumulation=True)
    results = []
    with Runtime(model_dir, rule, work_dir=tmp_path / "run", weights_budget=budget, grad_accumulation=True) as rt:
        for micro in steps:
            for i, ids in enumerate(micro):
                result = rt.backward(rt.model(input_ids=ids, labels=ids).loss / K, accumulate=i < K - 1)
                assert not result.dropped and result.accumulated == (i < K - 1)
            results.append(result)
        assert rt.step == STEPS
        print("reads", rt.scheduler.stats.reads, "writes", rt.scheduler.stats.writes)
        # Streamed: more reads than one per unit per micro-batch, and writes between commits.
        assert rt.scheduler.stats.reads > 4 * K * STEPS and rt.scheduler.stats.writes > 0
        assert rt.scheduler.stats.peak_resident_bytes <= budget
        trained = dict(rt.iter_weights())
    return trained, results


@pytest.mark.parametrize("mode", ["exact", "previous"])
def test_accumulation_with_global_norm_clipping_matches_torch(tmp_path: Path, mode: str) -> None:
    """Tied embedding (two gradient contributions per micro-batch, one accumulated sum) with K=2
    micro-batches; the clipping norm is the accumulated gradient's ("exact": this step's;
    "previous": the last step's, this step's on the first)."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    steps = _steps()
    max_norm, lr = 0.1, 0.1
    ref = _reference(model_dir)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    params = list(ref.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    prev, norms, coefs = None, [], []
    for micro in steps:
        opt.zero_grad()
        for ids in micro:
            (ref(input_ids=ids, labels=ids).loss / K).backward()
        norm = _global_norm(params)
        basis = norm if mode == "exact" or prev is None else prev
        coef = min(1.0, max_norm / (basis + 1e-6))
        with torch.no_grad():
            for p in params:
                p.grad.mul_(coef)
        opt.step()
        norms.append(norm)
        coefs.append(coef)
        prev = norm
    assert all(c < 1.0 for c in coefs), coefs  # clipping active on every step
    assert min(abs(a - b) / b for a, b in zip(norms[1:], norms)) > 0.05, norms  # norms that tell steps apart

    trained, results = _run(model_dir, tmp_path, SGD(lr=lr, clip_grad_norm=max_norm, clip_mode=mode), steps)
    assert results[0].grad_norm == pytest.approx(norms[0], rel=1e-5)
    if mode == "exact":
        assert [r.grad_norm for r in results] == pytest.approx(norms, rel=1e-5)
    else:
        assert results[1].grad_norm is None and results[2].grad_norm is None  # one backward pass each
    _check(trained, ref, start)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_accumulation_with_adamw_matches_torch_adamw(tmp_path: Path, tied: bool) -> None:
    """AdamW's moments, the accumulation buffers and the weights all stream in the unit files;
    K=2 micro-batches a step, value clipping on top (applied to the accumulated gradient, as
    torch.nn.utils.clip_grad_value_ after accumulation)."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=tied)
    steps = _steps(seed=11)
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    clip_value = 0.02
    ref = _reference(model_dir)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.AdamW(ref.parameters(), foreach=False, **settings)
    clipped = 0
    for micro in steps:
        opt.zero_grad()
        for ids in micro:
            (ref(input_ids=ids, labels=ids).loss / K).backward()
        clipped += sum(int((p.grad.abs() > clip_value).sum()) for p in ref.parameters())
        torch.nn.utils.clip_grad_value_(ref.parameters(), clip_value)
        opt.step()
    assert clipped > 0  # value clipping changed some gradients

    trained, _ = _run(model_dir, tmp_path, AdamW(fused=False, clip_grad_value=clip_value, **settings), steps)
    _check(trained, ref, start)


# Units of the tiny Llama: the parameters each one holds (by name prefix).
UNITS = [["model.embed_tokens."], ["model.layers.0."], ["model.layers.1."], ["model.norm.", "lm_head."]]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_unit_clipping_under_a_streaming_budget_matches_torch(tmp_path: Path, tied: bool) -> None:
    """clip_mode="unit": each unit's gradients clipped by their own norm (torch.nn.utils.clip_grad_norm_
    per group), while units are evicted and re-read within the step. Tied: the embedding unit's norm
    includes the head's contribution to the shared weight. 3 steps, batches of different sizes."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=tied)
    gen = torch.Generator().manual_seed(8)
    batches = [torch.randint(0, 128, shape, generator=gen) for shape in ((2, 16), (1, 8), (3, 12))]
    max_norm, lr = 0.05, 0.1
    ref = _reference(model_dir)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    groups = [[p for n, p in ref.named_parameters() if any(n.startswith(x) for x in prefixes)] for prefixes in UNITS]
    assert sum(len(g) for g in groups) == len(list(ref.parameters()))
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    group_norms = []
    for ids in batches:
        opt.zero_grad()
        ref(input_ids=ids, labels=ids).loss.backward()
        norms = [float(torch.nn.utils.clip_grad_norm_(g, max_norm)) for g in groups]
        group_norms.append(norms)
        opt.step()
    # Some units clipped and (for a discriminating test) their norms far apart: one global norm would differ.
    flat = [n for step in group_norms for n in step]
    assert sum(n > max_norm for n in flat) >= 3 and max(flat) > 3 * min(flat), group_norms

    rule = SGD(lr=lr, clip_grad_norm=max_norm, clip_mode="unit")
    budget = _streaming_budget(model_dir, tmp_path, rule)
    with Runtime(model_dir, rule, work_dir=tmp_path / "run", weights_budget=budget) as rt:
        for ids in batches:
            result = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
            assert not result.dropped and result.grad_norm is None  # one backward pass
        assert rt.scheduler.stats.peak_resident_bytes <= budget
        assert rt.scheduler.stats.reads > 4 * len(batches)  # units re-read within steps
        trained = dict(rt.iter_weights())
    _check(trained, ref, start)


def test_accumulation_with_unit_clipping_matches_torch(tmp_path: Path) -> None:
    """clip_mode="unit" on the accumulated gradient (tied, K=2, streamed): each unit's summed gradient
    clipped by its own norm (clip_grad_norm_ per unit after torch's accumulation), then SGD."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    steps = _steps(seed=21)
    max_norm, lr = 0.05, 0.1
    ref = _reference(model_dir)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    groups = [[p for n, p in ref.named_parameters() if any(n.startswith(x) for x in prefixes)] for prefixes in UNITS]
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    clipped = 0
    for micro in steps:
        opt.zero_grad()
        for ids in micro:
            (ref(input_ids=ids, labels=ids).loss / K).backward()
        clipped += sum(float(torch.nn.utils.clip_grad_norm_(g, max_norm)) > max_norm for g in groups)
        opt.step()
    assert clipped >= 3

    trained, results = _run(model_dir, tmp_path, SGD(lr=lr, clip_grad_norm=max_norm, clip_mode="unit"), steps)
    assert all(r.grad_norm is None for r in results)
    _check(trained, ref, start)


def test_previous_clipping_after_a_rollback_uses_the_committed_norm(tmp_path: Path) -> None:
    """"previous" clipping across a dropped step that rolls back (commit every 2): the retried steps
    must use the norm of the step before them, as a run that never saw the bad batch. Reference:
    torch with the previous-norm coefficient by hand, skipping the bad batch."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    gen = torch.Generator().manual_seed(13)
    shapes = [(2, 16), (1, 6), (3, 12), (2, 8), (1, 16)]
    batches = [torch.randint(0, 128, shape, generator=gen) for shape in shapes]
    bad = 3  # its gradient is NaN the first time (block 0, after the head and block 1 were updated)
    max_norm, lr = 0.05, 0.1
    ref = _reference(model_dir)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    params = list(ref.parameters())
    prev = None
    for i, ids in enumerate(batches):
        if i == bad:
            continue
        ref(input_ids=ids, labels=ids).loss.backward()
        norm = _global_norm(params)
        coef = min(1.0, max_norm / ((norm if prev is None else prev) + 1e-6))
        with torch.no_grad():
            for p in params:
                p.sub_(lr * coef * p.grad)
                p.grad = None
        prev = norm

    rule = SGD(lr=lr, clip_grad_norm=max_norm, clip_mode="previous")
    budget = _streaming_budget(model_dir, tmp_path, rule)
    fired = []
    with Runtime(model_dir, rule, work_dir=tmp_path / "run", weights_budget=budget, commit_every=2) as rt:
        poison_param = rt.model.get_parameter("model.layers.0.mlp.down_proj.weight")
        index = 0
        positions = {}
        while index < len(batches):
            positions[rt.step] = index
            ids = batches[index]
            handle = None
            if index == bad and not fired:
                fired.append(rt.step)
                handle = poison_param.register_hook(lambda g: torch.full_like(g, float("nan")))
            result = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
            if handle is not None:
                handle.remove()
            index += 1
            if result.dropped:
                assert result.rolled_back == 1  # steps 1-2 committed, step 3 undone with the bad step 4
                after = index
                for step in range(result.step, result.step + result.rolled_back):
                    replay = batches[positions[step]]
                    assert not rt.backward(rt.model(input_ids=replay, labels=replay).loss).dropped
                index = after
        assert fired == [3] and rt.step == len(batches) - 1
        trained = dict(rt.iter_weights())
    _check(trained, ref, start)

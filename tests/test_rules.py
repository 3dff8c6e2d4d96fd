"""Update rules against references (tolerance: fp32, max abs difference <= 1e-6 unless stated)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model
from lomo_runtime import SGD, Runtime
from lomo_runtime.native import stochastic_round_bf16
from lomo_runtime.rules import AdaLomo, AdamW
from lomo_runtime.runtime import LossScaler

STEPS = 4


def _batches(steps: int, seed: int = 1, batch: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (batch, 16), generator=gen) for _ in range(steps)]


def _reference(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    return model


def _unit_budget(model_dir: Path, tmp_path: Path, rule=None, **kwargs) -> int:
    """A budget of the embedding plus the largest block (state included): forces streaming on every step."""
    import tempfile

    with Runtime(model_dir, rule or SGD(), work_dir=tempfile.mkdtemp(dir=tmp_path), **kwargs) as rt:
        sizes = {n: r.nbytes for n, r in rt.store.units.items()}
    return sizes["embed"] + max(v for k, v in sizes.items() if k.startswith("block."))


def _assert_weights_match(rt: Runtime, reference: torch.nn.Module, tol: float = 1e-6) -> None:
    expected = reference.state_dict()
    for name, tensor in rt.iter_weights():
        diff = (tensor.float() - expected[name].float()).abs().max().item()
        assert diff <= tol, f"{name} differs by {diff}"


def test_sgd_with_global_norm_clipping_matches_lomo_optim(tmp_path: Path) -> None:
    from lomo_optim import Lomo

    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    ref = _reference(model_dir)
    lomo = Lomo(ref, lr=0.1, clip_grad_norm=0.5, weight_decay=0.01)
    rule = SGD(lr=0.1, clip_grad_norm=0.5, weight_decay=0.01)
    with Runtime(model_dir, rule, work_dir=tmp_path / "w", weights_budget=_unit_budget(model_dir, tmp_path)) as rt:
        for ids in _batches(STEPS):
            loss = ref(input_ids=ids, labels=ids).loss
            lomo.grad_norm(loss)
            lomo.fused_backward(loss, 0.1)
            result = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
            assert result.grad_norm is not None and result.grad_norm > 0.5  # clipping was active
        _assert_weights_match(rt, ref)


def test_streamed_adamw_matches_torch_adamw(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    ref = _reference(model_dir)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
    rule = AdamW(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    with Runtime(model_dir, rule, work_dir=tmp_path / "w", weights_budget=_unit_budget(model_dir, tmp_path, rule)) as rt:
        for ids in _batches(STEPS):
            loss = ref(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped
        _assert_weights_match(rt, ref)
        # The moments live in the unit files, beside the weights they belong to.
        names = [s.name for s in rt.store.units["block.0"].tensors]
        assert "model.layers.0.mlp.down_proj.weight::exp_avg_sq" in names


def _adalomo_reference_step(model: torch.nn.Module, state: dict, lr: float, step: int,
                            eps1: float = 1e-30, eps2: float = 1e-3, clip: float = 1.0, decay: float = -0.8) -> None:
    """AdaLomo from the paper's equations (arXiv 2310.10195, Algorithm 1), one tensor at a time."""
    beta2 = 1.0 - step ** decay
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = p.grad
            sq = g * g + eps1
            if g.dim() == 2:
                r = state.setdefault(name + ".r", torch.zeros(g.shape[0]))
                c = state.setdefault(name + ".c", torch.zeros(g.shape[1]))
                r.copy_(beta2 * r + (1 - beta2) * sq.mean(dim=1))
                c.copy_(beta2 * c + (1 - beta2) * sq.mean(dim=0))
                v = torch.outer(r, c) / r.mean()          # V = R C / (1^T R)
            else:
                v = state.setdefault(name + ".v", torch.zeros_like(g))
                v.copy_(beta2 * v + (1 - beta2) * sq)
            u = g / v.sqrt()
            u = u / max(1.0, (u.square().mean().sqrt() / clip).item())        # grouped update normalisation
            alpha = lr * max(eps2, p.square().mean().sqrt().item())           # relative step size
            p.sub_(alpha * u)
            p.grad = None


def test_adalomo_matches_reference_from_the_paper(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    ref = _reference(model_dir)
    state: dict = {}
    rule = AdaLomo(lr=1e-2)
    with Runtime(model_dir, rule, work_dir=tmp_path / "w", weights_budget=_unit_budget(model_dir, tmp_path, rule)) as rt:
        for step, ids in enumerate(_batches(STEPS), start=1):
            ref(input_ids=ids, labels=ids).loss.backward()
            _adalomo_reference_step(ref, state, lr=1e-2, step=step)
            assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped
        _assert_weights_match(rt, ref, tol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    ref = _reference(model_dir)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    k = 2
    with Runtime(model_dir, SGD(lr=0.1), work_dir=tmp_path / "w", grad_accumulation=True,
                 weights_budget=_unit_budget(model_dir, tmp_path, grad_accumulation=True)) as rt:
        for big in _batches(STEPS, batch=4):
            opt.zero_grad()
            ref(input_ids=big, labels=big).loss.backward()
            opt.step()
            for i, micro in enumerate(big.chunk(k)):
                loss = rt.model(input_ids=micro, labels=micro).loss / k
                result = rt.backward(loss, accumulate=i < k - 1)
                assert not result.dropped
        assert rt.step == STEPS
        _assert_weights_match(rt, ref)


def test_clip_mode_previous_and_unit(tmp_path: Path) -> None:
    """'previous' equals exact clipping on its first step; 'unit' clips each unit by its own norm."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    ids = _batches(1)[0]
    ref = _reference(model_dir)
    ref(input_ids=ids, labels=ids).loss.backward()
    units = {"embed": ["model.embed_tokens"], "head": ["model.norm", "lm_head"]}
    with torch.no_grad():
        for unit_prefixes in [["model.embed_tokens."], ["model.layers.0."], ["model.layers.1."], ["model.norm.", "lm_head."]]:
            params = [p for n, p in ref.named_parameters() if any(n.startswith(x) for x in unit_prefixes)]
            torch.nn.utils.clip_grad_norm_(params, 0.05)
        for p in ref.parameters():
            p.sub_(0.1 * p.grad)
    with Runtime(model_dir, SGD(lr=0.1, clip_grad_norm=0.05, clip_mode="unit"), work_dir=tmp_path / "u") as rt:
        rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        _assert_weights_match(rt, ref)
    del units

    exact = Runtime(model_dir, SGD(lr=0.1, clip_grad_norm=0.05), work_dir=tmp_path / "e")
    previous = Runtime(model_dir, SGD(lr=0.1, clip_grad_norm=0.05, clip_mode="previous"), work_dir=tmp_path / "p")
    with exact, previous:
        a = exact.backward(exact.model(input_ids=ids, labels=ids).loss)
        b = previous.backward(previous.model(input_ids=ids, labels=ids).loss)
        assert a.grad_norm == b.grad_norm
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(exact.iter_weights(), previous.iter_weights()))
        # The second step of 'previous' runs one backward only, clipped by step 1's norm.
        b2 = previous.backward(previous.model(input_ids=ids, labels=ids).loss)
        assert b2.grad_norm is None and not b2.dropped


def test_fp16_overflow_drops_step_halves_scale_then_window_doubles_it(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    ids = _batches(1)[0]
    scaler = LossScaler(scale=1024.0, window=2)
    with Runtime(model_dir, SGD(lr=0.01), work_dir=tmp_path / "w", dtype=torch.float16, loss_scaler=scaler,
                 weights_budget=_unit_budget(model_dir, tmp_path, dtype=torch.float16)) as rt:
        before = {k: v.clone() for k, v in rt.iter_weights()}
        # An infinite gradient in block 1, in the middle of backward: the head is already updated.
        poison = rt.model.get_parameter("model.layers.1.self_attn.o_proj.weight")
        handle = poison.register_hook(lambda g: torch.full_like(g, float("inf")))
        result = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        handle.remove()
        assert result.dropped and "o_proj" in result.reason
        assert rt.step == 0 and scaler.scale == 512.0
        assert all(torch.equal(before[k], v) for k, v in rt.iter_weights())
        for expected_scale in (512.0, 1024.0, 1024.0, 2048.0):
            result = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
            assert not result.dropped
            assert scaler.scale == expected_scale
        rt.commit()
        assert rt.store.meta["loss_scaler"]["scale"] == 2048.0  # committed, so a resume continues with it


def test_stochastic_rounding_is_unbiased() -> None:
    # 1 + 2^-10 lies between the bf16 neighbours 1 and 1 + 2^-7, one eighth of the way up.
    x = torch.full((200_000,), 1.0 + 2.0 ** -10)
    rounded = stochastic_round_bf16(x, seed=0).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2.0 ** -10, abs=3e-5)  # ~6 sigma of the mean
    assert (rounded > 1.0).float().mean().item() == pytest.approx(1 / 8, abs=0.005)
    negative = stochastic_round_bf16(-x, seed=1).float()
    assert negative.mean().item() == pytest.approx(-(1.0 + 2.0 ** -10), abs=3e-5)


def test_bf16_tiny_lr_learns_only_with_stochastic_rounding(tmp_path: Path) -> None:
    """At lr 3e-6 round-to-nearest loses virtually every update (only weights within a few
    ulps of zero can move); stochastic rounding keeps them on average and the loss falls."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    ids = _batches(1)[0]
    runs = {}
    for sr in (False, True):
        with Runtime(model_dir, SGD(lr=3e-6), work_dir=tmp_path / f"w{sr}", dtype=torch.bfloat16,
                     stochastic_rounding=sr) as rt:
            before = {k: v.clone() for k, v in rt.iter_weights()}
            losses = []
            for _ in range(30):
                out = rt.model(input_ids=ids, labels=ids)
                losses.append(out.loss.item())
                rt.backward(out.loss)
            changed = sum(int((before[k] != v).sum()) for k, v in rt.iter_weights())
            total = sum(v.numel() for v in before.values())
            runs[sr] = (losses[0] - losses[-1], changed / total)
    (nearest_drop, nearest_changed), (stochastic_drop, stochastic_changed) = runs[False], runs[True]
    assert nearest_changed < 0.001, f"round-to-nearest changed {nearest_changed:.2%} of the weights"
    assert stochastic_changed > 10 * nearest_changed
    assert stochastic_drop > 1e-4 and stochastic_drop > 10 * max(nearest_drop, 0.0)


def test_master_weights_keep_fp32_copy(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    ids = _batches(1)[0]
    with Runtime(model_dir, SGD(lr=2e-4), work_dir=tmp_path / "w", dtype=torch.bfloat16, master_weights=True,
                 stochastic_rounding=False) as rt:
        for _ in range(3):
            rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        tensors = dict(rt.store.iter_tensors())
    master = tensors["model.layers.0.mlp.up_proj.weight::master"]
    weight = tensors["model.layers.0.mlp.up_proj.weight"]
    assert master.dtype == torch.float32 and weight.dtype == torch.bfloat16
    assert torch.equal(master.to(torch.bfloat16), weight)
    original = _reference(model_dir).state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(master, original)  # small updates accumulate in fp32 even when bf16 loses them

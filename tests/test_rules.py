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
        names = [s.name for s in rt.store.units["block.0.mlp"].tensors]  # blocks split under a budget
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


def test_clip_mode_previous_applies_the_previous_steps_coefficient(tmp_path: Path) -> None:
    """Steps 2 and 3 of "previous" against torch: each step's gradient scaled by hand with
    min(1, max_norm / (norm of the step before + 1e-6)) (torch's clip_grad_norm_ formula), the norm
    taken from torch's own unclipped gradient. Different batches, so each step's norm differs from the
    last and using the current norm (or none) would show. fp32, max abs difference <= 1e-6."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=False)
    gen = torch.Generator().manual_seed(5)
    # Batches of different sizes: their gradient norms differ by tens of percent.
    batches = [torch.randint(0, 128, shape, generator=gen) for shape in ((2, 16), (1, 6), (4, 16))]
    max_norm, lr = 0.05, 0.1
    ref = _reference(model_dir)
    params = list(ref.parameters())
    prev_norm, norms, coefs = None, [], []
    for ids in batches:
        ref(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])).item()
            basis = norm if prev_norm is None else prev_norm  # step 1 has no previous norm: exact clipping
            coef = min(1.0, max_norm / (basis + 1e-6))
            for p in params:
                p.sub_(lr * coef * p.grad)
                p.grad = None
        norms.append(norm)
        coefs.append(coef)
        prev_norm = norm
    # Clipping is active on every step and the coefficients differ enough to tell apart.
    assert all(c < 1.0 for c in coefs)
    assert abs(norms[1] - norms[0]) / norms[0] > 0.1 and abs(norms[2] - norms[1]) / norms[1] > 0.1, norms
    budget = _unit_budget(model_dir, tmp_path)
    with Runtime(model_dir, SGD(lr=lr, clip_grad_norm=max_norm, clip_mode="previous"), work_dir=tmp_path / "p",
                 weights_budget=budget) as rt:
        results = [rt.backward(rt.model(input_ids=ids, labels=ids).loss) for ids in batches]
        assert not any(r.dropped for r in results)
        assert results[0].grad_norm == pytest.approx(norms[0], rel=1e-5)
        assert results[1].grad_norm is None and results[2].grad_norm is None  # one backward pass each
        _assert_weights_match(rt, ref)


def _fp16_reference(model_dir: Path, ids: torch.Tensor, scales: list[float], lr: float) -> dict[str, torch.Tensor]:
    """fp16 training by hand, the standard mixed-precision way: the loss times the scale is
    backpropagated in fp16, each gradient is unscaled in fp32, SGD updates an fp32 copy of the
    weight and it is rounded to nearest back into fp16. One step per entry of `scales`."""
    ref = _reference(model_dir, torch.float16)
    for scale in scales:
        (ref(input_ids=ids, labels=ids).loss * scale).backward()
        with torch.no_grad():
            for p in ref.parameters():
                work = p.float()
                work.add_(p.grad.float() / scale, alpha=-lr)
                p.copy_(work.to(torch.float16))
                p.grad = None
    return ref.state_dict()


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "resident"])
def test_fp16_overflow_drops_step_halves_scale_then_window_doubles_it(tmp_path: Path, streamed: bool) -> None:
    """The scaler's arithmetic, and the weights: after the dropped step and four good ones they equal
    a hand-written fp16 run that never took the dropped step (scales 512, 512, 1024, 1024: halved by
    the overflow, doubled after the 2-step window). Tolerance: 0 (same fp16 kernels in the same order).
    All resident, a unit the dropped step updated before the overflow (block 1's MLP) is never
    re-read from the store unless the rollback drops it: only the weights check sees a partial
    update left in memory."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    ids = _batches(1)[0]
    scaler = LossScaler(scale=1024.0, window=2)
    budget = _unit_budget(model_dir, tmp_path, dtype=torch.float16) if streamed else None
    with Runtime(model_dir, SGD(lr=0.01), work_dir=tmp_path / "w", dtype=torch.float16, loss_scaler=scaler,
                 weights_budget=budget) as rt:
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
        trained = dict(rt.iter_weights())
    expected = _fp16_reference(model_dir, ids, [512.0, 512.0, 1024.0, 1024.0], lr=0.01)
    moved = 0
    for name, tensor in trained.items():
        assert tensor.dtype == torch.float16
        diff = (tensor.float() - expected[name].float()).abs().max().item()
        assert diff == 0.0, f"{name} differs from the run that skipped the step by {diff}"
        moved += int((expected[name] != before[name]).sum())
    assert moved > 1000  # the reference really trained


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
    """bf16 weights with fp32 master weights against a hand-written mixed-precision run: forward and
    backward in bf16, the bf16 gradient taken to fp32, SGD on an fp32 master copy (starting from the
    bf16 weights, as the store does), the weight rounded to nearest from it. Streamed (one block at a
    time), 3 different batches. Master: max abs difference <= 1e-8 (below an fp32 ulp at 0.1, i.e. the
    same bits up to the order of an fp32 add); bf16 weights: identical."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    batches = _batches(3)
    lr = 2e-4
    ref = _reference(model_dir, torch.bfloat16)
    master = {n: p.detach().float().clone() for n, p in ref.named_parameters()}
    start = {n: m.clone() for n, m in master.items()}
    opt = torch.optim.SGD(list(master.values()), lr=lr)
    for ids in batches:
        ref(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                master[n].grad = p.grad.float()
                p.grad = None
            opt.step()
            for n, p in ref.named_parameters():
                p.copy_(master[n].to(torch.bfloat16))
    budget = _unit_budget(model_dir, tmp_path, dtype=torch.bfloat16, master_weights=True)
    with Runtime(model_dir, SGD(lr=lr), work_dir=tmp_path / "w", dtype=torch.bfloat16, master_weights=True,
                 stochastic_rounding=False, weights_budget=budget) as rt:
        for ids in batches:
            assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped
        rt.commit()  # the store's committed generation is what iter_tensors reads
        tensors = dict(rt.store.iter_tensors())
    weights = ref.state_dict()
    lost_in_bf16 = 0
    for name, expected in master.items():
        got = tensors[name + "::master"]
        assert got.dtype == torch.float32 and tensors[name].dtype == torch.bfloat16
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-8, f"{name}: master differs from the fp32 reference by {diff}"
        assert torch.equal(tensors[name], weights[name]), f"{name}: bf16 weight differs"
        # Updates bf16 alone would have lost: the master moved, the bf16 weight did not.
        lost_in_bf16 += int(((expected != start[name]) & (weights[name].float() == start[name])).sum())
    moved = (master["model.layers.0.mlp.up_proj.weight"] - start["model.layers.0.mlp.up_proj.weight"]).abs().max()
    assert moved.item() > 100 * 1e-8  # the tolerance is far below the updates it checks
    assert lost_in_bf16 > 0

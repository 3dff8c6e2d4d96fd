"""The fused C++ kernels against the PyTorch reference math (builds native/ on first use, ~1 min)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_model
from lomo_runtime import SGD, Runtime, native
from lomo_runtime.rules import AdamW, UpdateContext


@pytest.fixture(scope="module")
def kernels(monkeypatch_module=None):
    import os

    saved = os.environ.pop("LOMO_RUN_NO_NATIVE", None)
    native._module, native.load_error = None, None
    module = native.load()
    if saved is not None:
        os.environ["LOMO_RUN_NO_NATIVE"] = saved
    if module is None:
        # Skip only where there is no compiler; a kernel that fails to build next to one is a bug.
        if shutil.which(os.environ.get("CXX", "c++")) is not None:
            pytest.fail(f"native kernels failed to build although a C++ compiler is present: {native.load_error}")
        pytest.skip(f"native kernels cannot be built here: {native.load_error}")
    print(f"native kernels loaded: {module.__file__}")
    yield module
    native._module, native.load_error = None, None  # later tests go back to the reference path


def test_fused_adamw_matches_reference_math(kernels) -> None:
    torch.manual_seed(0)
    shape = (300, 257)
    ref_rule, fused_rule = AdamW(lr=1e-2, weight_decay=0.1, fused=False), AdamW(lr=1e-2, weight_decay=0.1, fused=True)
    p_ref = torch.randn(shape)
    p_fused = p_ref.clone()
    s_ref = {"exp_avg": torch.zeros(shape), "exp_avg_sq": torch.zeros(shape)}
    s_fused = {k: v.clone() for k, v in s_ref.items()}
    for step in range(1, 6):
        grad = torch.randn(shape)
        ref_rule.apply(p_ref, grad, s_ref, UpdateContext(lr=1e-2, step=step))
        fused_rule.apply(p_fused, grad, s_fused, UpdateContext(lr=1e-2, step=step))
    assert (p_ref - p_fused).abs().max().item() <= 1e-6
    assert (s_ref["exp_avg_sq"] - s_fused["exp_avg_sq"]).abs().max().item() <= 1e-6


def test_fused_adamw_matches_torch_optim_adamw(kernels) -> None:
    """The kernel against torch.optim.AdamW (single-tensor path), 5 steps on a 300 x 257 tensor with
    weight decay and random gradients. The kernel evaluates the same formula in one pass, so it may
    differ in the last bits: max abs difference <= 1e-6 on weights of magnitude up to ~5 (about two
    fp32 ulps there) and on both moments."""
    torch.manual_seed(0)
    shape = (300, 257)
    lr, betas, eps, wd = 1e-2, (0.9, 0.99), 1e-8, 0.1
    start = torch.randn(shape)
    reference = start.clone().requires_grad_(True)
    opt = torch.optim.AdamW([reference], lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False, fused=False)
    fused = start.clone()
    state = {"exp_avg": torch.zeros(shape), "exp_avg_sq": torch.zeros(shape)}
    rule = AdamW(lr=lr, betas=betas, eps=eps, weight_decay=wd, fused=True)
    ran = 0
    for step in range(1, 6):
        grad = torch.randn(shape) * (0.1 * step)  # a changing scale, so the moments' averaging matters
        reference.grad = grad.clone()
        opt.step()
        assert native.adamw_native(fused, grad, state["exp_avg"], state["exp_avg_sq"], lr, betas, eps, wd, step)
        ran += 1
    expected = opt.state[reference]
    assert ran == 5
    assert (fused - reference.detach()).abs().max().item() <= 1e-6
    assert (state["exp_avg"] - expected["exp_avg"]).abs().max().item() <= 1e-6
    assert (state["exp_avg_sq"] - expected["exp_avg_sq"]).abs().max().item() <= 1e-6
    assert (fused - start).abs().max().item() > 1e-2  # it moved far more than the tolerance
    # The rule's fused path (what a run calls) is the kernel, bit for bit.
    torch.manual_seed(0)
    torch.randn(shape)
    out, out_state = start.clone(), {"exp_avg": torch.zeros(shape), "exp_avg_sq": torch.zeros(shape)}
    for step in range(1, 6):
        rule.apply(out, torch.randn(shape) * (0.1 * step), out_state, UpdateContext(lr=lr, step=step))
    assert torch.equal(out, fused)


def test_native_stochastic_rounding_is_unbiased_and_reproducible(kernels) -> None:
    x = torch.full((200_000,), 1.0 + 2.0 ** -10)
    a = native.stochastic_round_bf16_native(x, seed=5)
    b = native.stochastic_round_bf16_native(x, seed=5)
    c = native.stochastic_round_bf16_native(x, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.float().unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert a.float().mean().item() == pytest.approx(1.0 + 2.0 ** -10, abs=3e-5)
    special = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 3.0])
    out = native.stochastic_round_bf16_native(special, seed=1).float()
    assert out.tolist() == [float("inf"), float("-inf"), 0.0, -0.0, 3.0]
    assert native.stochastic_round_bf16_native(torch.tensor([float("nan")]), seed=1).isnan().all()


# ---- stochastic rounding: the PyTorch version draws the kernel's bits ----------------------------

MASK64 = (1 << 64) - 1
SEEDS = [0, 1, 12345, 2**62, 2**62 + 987654321, 2**63 - 1]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _sr_inputs(n: int, gen: torch.Generator) -> torch.Tensor:
    """n fp32 values mixing every case: normal (both signs, many scales), subnormal, zero, bf16-exact,
    arbitrary bit patterns, +-inf, NaNs (quiet, signalling, negative, payload only in the low bits)."""
    scale = torch.pow(10.0, torch.randint(-40, 39, (n,), generator=gen).float())
    x = torch.randn(n, generator=gen) * scale
    kinds = torch.randint(0, 6, (n,), generator=gen)
    raw = torch.randint(-2**31, 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    subnormal = (torch.randint(1, 1 << 23, (n,), generator=gen, dtype=torch.int32)
                 * (1 - 2 * torch.randint(0, 2, (n,), generator=gen, dtype=torch.int32))).view(torch.float32)
    x = torch.where(kinds == 1, raw, x)
    x = torch.where(kinds == 2, subnormal, x)
    x = torch.where(kinds == 3, x.to(torch.bfloat16).float(), x)  # exactly representable
    special = torch.tensor([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF80FFFF,
                            0x7FBFFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x80000001, 0x00000000,
                            0x80000000, 0x3F800000, 0x3F800001, 0x3F80FFFF], dtype=torch.int64)
    special = special.to(torch.int32).view(torch.float32)  # wraps to the same 32 bits
    k = min(n, special.numel())
    where = torch.randperm(n, generator=gen)[:k]
    x[where] = special[:k]
    return x


@pytest.mark.parametrize("n", [1, 5, 65535, 65536, 65537, 3 * 65536 + 17, (1 << 20) + 3])
def test_torch_rounding_matches_kernel_bit_for_bit(kernels, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = _sr_inputs(n, gen)
    assert native.stochastic_round_bf16_native(x, 0) is not None  # the kernel really runs
    for seed in SEEDS + [native.rounding_seed(7, 3, n)]:
        expected = _bits(native.stochastic_round_bf16_native(x, seed))
        assert torch.equal(_bits(native.stochastic_round_bf16_torch(x, seed)), expected), seed
        assert torch.equal(_bits(native.stochastic_round_bf16(x, seed)), expected), seed


def test_torch_rounding_matches_kernel_across_chunks_shapes_and_threads(kernels, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(3)
    x = _sr_inputs(40_000, gen).view(200, 200)
    seed = 2**62 + 5
    expected = _bits(native.stochastic_round_bf16_native(x, seed))
    for chunk in (1, 999, 1 << 14):
        monkeypatch.setattr(native, "SR_CHUNK", chunk)
        assert torch.equal(_bits(native.stochastic_round_bf16_torch(x, seed)), expected), chunk
    monkeypatch.undo()
    assert native.stochastic_round_bf16_torch(x, seed).shape == (200, 200)
    # Non-contiguous input: element index means position in the row-major (contiguous) order.
    t = x.t()
    assert torch.equal(_bits(native.stochastic_round_bf16_torch(t, seed)), _bits(native.stochastic_round_bf16_native(t, seed)))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _bits(native.stochastic_round_bf16_native(x, seed))
        one_torch = _bits(native.stochastic_round_bf16_torch(x, seed))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, expected) and torch.equal(one_torch, expected)


def test_bf16_stochastic_rounding_run_is_identical_with_and_without_kernel(kernels, tmp_path: Path, monkeypatch) -> None:
    """The point of it all: a bf16 run with stochastic rounding gives the same weights whether or not
    the kernels are built (e.g. a run resumed on a machine without a compiler)."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    calls = {"native": 0}
    real_native = native.stochastic_round_bf16_native

    def counting(values, seed):
        out = real_native(values, seed)
        calls["native"] += out is not None
        return out

    weights = {}
    for use_kernel in (True, False):
        monkeypatch.setattr(native, "stochastic_round_bf16_native", counting if use_kernel else (lambda v, s: None))
        with Runtime(model_dir, SGD(lr=1e-3), work_dir=tmp_path / f"w{use_kernel}", dtype=torch.bfloat16,
                     stochastic_rounding=True, seed=11) as rt:
            for _ in range(2):
                rt.backward(rt.model(input_ids=ids, labels=ids).loss)
            weights[use_kernel] = {k: v.clone() for k, v in rt.iter_weights()}
    assert calls["native"] > 0
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.equal(_bits(weights[True][k]), _bits(weights[False][k])) for k in weights[True])


# Independent of both implementations: SplitMix64 and the rounding rule written out on Python ints.
def _ref_splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def _ref_round(bits: int, seed: int, i: int) -> int:
    if bits & 0x7F800000 == 0x7F800000:
        return (bits >> 16) | (0x0040 if bits & 0x007FFFFF else 0)
    noise = _ref_splitmix64(seed ^ ((i * 0xD1B54A32D192ED03) % 2**64)) & 0xFFFF
    return ((bits + noise) >> 16) & 0xFFFF


def test_splitmix64_known_answers() -> None:
    # The published SplitMix64 sequence from state 0 (state += golden gamma, then mix).
    outputs = [native.splitmix64(k * 0x9E3779B97F4A7C15 % 2**64) for k in range(3)]
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert all(native.splitmix64(x) == _ref_splitmix64(x) for x in (0, 1, 2**63, MASK64, 0xDEADBEEF))


def test_torch_rounding_matches_python_reference(monkeypatch) -> None:
    monkeypatch.setattr(native, "SR_CHUNK", 1000)  # so the checked indices fall in several chunks
    gen = torch.Generator().manual_seed(9)
    x = _sr_inputs(5000, gen)
    in_bits = x.view(torch.int32).tolist()
    for seed in (0, 42, 2**62 + 1, 2**63 - 1):
        out = native.stochastic_round_bf16_torch(x, seed).view(torch.int16).tolist()
        idx = sorted(set(range(0, 5000, 97)) | {0, 999, 1000, 1001, 4999} |
                     {i for i, b in enumerate(in_bits) if b & 0x7F800000 == 0x7F800000})
        for i in idx:
            assert out[i] & 0xFFFF == _ref_round(in_bits[i] & 0xFFFFFFFF, seed, i), (seed, i, hex(in_bits[i] & 0xFFFFFFFF))


@pytest.mark.parametrize("value", [1.0 + 2.0 ** -10, -(1.0 + 2.0 ** -10), 3.14159265, 1e-39])
def test_torch_rounding_is_unbiased(value: float) -> None:
    x = torch.full((400_000,), value)
    lo = x.to(torch.bfloat16).float()  # one neighbour; the other is the next bf16 away from x
    exact = x[0].item()
    rounded = native.stochastic_round_bf16_torch(x, seed=2**62 + 3).float()
    neighbours = set(rounded.unique().tolist())
    assert len(neighbours) == 2 and lo[0].item() in neighbours
    ulp = abs(max(neighbours) - min(neighbours))
    p = (exact - min(neighbours)) / ulp
    sigma = ulp * (p * (1 - p) / x.numel()) ** 0.5  # standard deviation of the mean
    # Within 6 standard deviations of the mean (a false failure has probability ~2e-9).
    assert abs(rounded.double().mean().item() - exact) <= 6 * sigma
    assert abs((rounded == max(neighbours)).double().mean().item() - p) <= 6 * (p * (1 - p) / x.numel()) ** 0.5


def test_rounding_seed_is_pure_and_spread() -> None:
    assert native.rounding_seed(0, 0, 0) == 1279368494785126216  # pinned: checkpoints resume bit-identically
    assert native.rounding_seed(1234, 56, 7) == 4898894036424572621
    grid = [(s, t, i) for s in (0, 1, 2**40, -1) for t in range(40) for i in range(60)]
    seeds = [native.rounding_seed(*k) for k in grid]
    assert len(set(seeds)) == len(grid)
    assert all(0 <= s < 2**63 for s in seeds)
    # Stable across processes whatever the hash salt.
    code = ("from lomo_runtime.native import rounding_seed; "
            f"print([rounding_seed(*k) for k in {grid[::97]!r}])")
    for hash_seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1])
        assert done.stdout.strip() == repr(seeds[::97])


def test_fused_adamw_in_a_streamed_training_run(kernels, tmp_path: Path, monkeypatch) -> None:
    """The kernels end to end: a streamed AdamW run (one block resident at a time, moments in the unit
    files) with the kernel on, against the same run on the PyTorch fallback and against
    torch.optim.AdamW on the Hugging Face model. The kernel must really run for every parameter at
    every step. Tolerance: max abs difference <= 2e-6 after 4 steps (the kernel's last-bit differences
    carried through the forward passes; 2e-7 measured here); the fallback equals torch.optim to 1e-6."""
    from transformers import AutoModelForCausalLM

    from helpers import torch_adamw_reference

    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(4)]
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)

    ref = torch_adamw_reference(model_dir, batches, **settings)
    expected = ref.state_dict()
    n_params = sum(1 for _ in ref.parameters())

    real = native.adamw_native
    calls = {"kernel": 0}

    def counting(*args, **kwargs):
        ran = real(*args, **kwargs)
        calls["kernel"] += bool(ran)
        return ran

    monkeypatch.setattr(native, "adamw_native", counting)
    with Runtime(model_dir, AdamW(fused=True, **settings), work_dir=tmp_path / "sizes") as rt:
        sizes = {n: r.nbytes for n, r in rt.store.units.items()}
    budget = sizes["embed"] + max(v for k, v in sizes.items() if k.startswith("block."))
    trained = {}
    for fused in (True, False):
        calls["kernel"] = 0
        with Runtime(model_dir, AdamW(fused=fused, **settings), work_dir=tmp_path / f"w{fused}",
                     weights_budget=budget) as rt:
            for ids in batches:
                assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped
            assert rt.scheduler.stats.reads > 4 * len(batches)  # streamed: units re-read every step
            trained[fused] = dict(rt.iter_weights())
        assert calls["kernel"] == (n_params * len(batches) if fused else 0)

    def max_diff(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in b)

    common = {k: v for k, v in expected.items() if k in trained[True]}  # the tied lm_head.weight is the embedding
    assert trained[True].keys() == trained[False].keys() == common.keys() and len(common) >= n_params
    print("kernel vs torch.optim", max_diff(trained[True], common), "fallback vs torch.optim",
          max_diff(trained[False], common), "kernel vs fallback", max_diff(trained[True], trained[False]))
    assert max_diff(trained[False], common) <= 1e-6
    assert max_diff(trained[True], common) <= 2e-6
    assert max_diff(trained[True], trained[False]) <= 2e-6
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    assert max_diff(trained[True], {k: start[k] for k in common}) > 1e-2  # trained far beyond the tolerance

"""LoRA adapters beside the fused LOMO update, against an in-memory reference.

Reference: the same Hugging Face model in memory, adapters injected by peft with
the same seed, every base weight trained by `torch.optim.SGD` and the adapters by
`torch.optim.AdamW`. lomo-run streams the base weights under a budget of about one
block. Tolerance: fp32, <= 1e-6 on every base weight and adapter after 4 steps.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, inject_adapter_in_model
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model
from lomo_runtime import SGD, Runtime
from lomo_runtime.errors import UserError
from lomo_runtime.lora import LoraSettings

STEPS = 4
LR = 0.05
LORA_LR = 1e-2
TOL = 1e-6
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _batches(seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(STEPS)]


def _settings(arch: str) -> LoraSettings:
    return LoraSettings(rank=4, alpha=8, target_modules=TARGETS[arch], lr=LORA_LR)


def _with_adapters(model_dir: Path, arch: str):
    """The model in memory with the adapters the runtime would inject (same seed), every base weight
    trainable; (model, SGD over the base weights, AdamW over the adapters)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    s = _settings(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the runtime seeds the adapters' initialisation with its seed (0)
        inject_adapter_in_model(LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=s.target_modules,
                                           lora_dropout=0.0, bias="none"), model)
    base = [p for n, p in model.named_parameters() if ".lora_" not in n]
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    for p in base:
        p.requires_grad_(True)
    return model, torch.optim.SGD(base, lr=LR), torch.optim.AdamW(lora, lr=LORA_LR, weight_decay=0.0)


def _reference(model_dir: Path, arch: str, batches: list[torch.Tensor]):
    model, sgd, adamw = _with_adapters(model_dir, arch)
    torch.manual_seed(0)
    for ids in batches:
        sgd.zero_grad(set_to_none=True)
        adamw.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        sgd.step()
        adamw.step()
    return model


def _budget(model_dir: Path, tmp: Path) -> int:
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp / "probe") as rt:
        return rt.minimum_weights_budget()


def _base_name(name: str) -> str:
    return name.replace(".base_layer", "")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_beside_streamed_sgd_equals_sgd_plus_adamw_in_memory(tmp_path: Path, arch: str) -> None:
    model_dir = make_tiny_model(tmp_path, arch=arch, tied=True)
    batches = _batches()
    ref = _reference(model_dir, arch, batches)
    expected = {_base_name(n): p.detach() for n, p in ref.named_parameters()}

    torch.manual_seed(0)
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "w", weights_budget=_budget(model_dir, tmp_path)) as rt:
        adapters = rt.add_lora(_settings(arch))
        assert 0 < adapters.numel < 0.2 * sum(u.nbytes for u in rt.scheduler.units.values()) / 4
        for ids in batches:
            assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped
        assert rt.scheduler.stats.reads > 0
        for name, p in adapters.params.items():
            diff = (p.detach() - expected[name]).abs().max().item()
            assert diff <= TOL, f"adapter {name} differs by {diff}"
        weights = dict(rt.iter_weights())
        # lr 0 for the adapters' first step would leave B at zero: check they moved
        assert any(p.abs().max() > 0 for n, p in adapters.params.items() if "lora_B" in n)

        out = rt.export(tmp_path / "merged")
        rt.export(tmp_path / "separate", adapters="separate")
        with torch.no_grad():
            rt.model.eval()
            ids = batches[0]
            live = rt.model(input_ids=ids).logits
    for name, tensor in weights.items():
        diff = (tensor - expected[name]).abs().max().item()
        assert diff <= TOL, f"base weight {name} differs by {diff}"

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "separate", dtype=torch.float32)
    separate = PeftModel.from_pretrained(base, tmp_path / "separate" / "adapter").eval()
    ref.eval()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - want).abs().max().item() <= 1e-5
        assert (separate(input_ids=ids).logits - want).abs().max().item() <= 1e-5
        assert (live - want).abs().max().item() <= 1e-5


def _run(model_dir: Path, work: Path, budget: int, commit_every: int, poison_at: int | None) -> tuple[dict, dict, list]:
    """Train STEPS good steps; a NaN gradient in the batch after `poison_at` good steps is dropped
    (rolling back to the last commit) and its batch skipped; replay the rolled-back steps."""
    batches = _batches() + _batches(seed=2)[:1]
    rolled = []
    with Runtime(model_dir, SGD(lr=LR), work_dir=work, weights_budget=budget, commit_every=commit_every) as rt:
        adapters = rt.add_lora(_settings("llama"))
        poison = rt.model.get_parameter("model.layers.0.mlp.up_proj.weight")
        i = 0
        good = []
        while rt.step < STEPS:
            ids = batches[i]
            handle = poison.register_hook(lambda g: g * float("nan")) if rt.step == poison_at and i == len(good) else None
            result = rt.backward(rt.model(input_ids=ids, labels=ids).loss)
            if handle is not None:
                handle.remove()
            if result.dropped:
                rolled.append(result.rolled_back)
                for ids_again in good[result.step:result.step + result.rolled_back]:
                    assert not rt.backward(rt.model(input_ids=ids_again, labels=ids_again).loss).dropped
                i += 1
                continue
            good.append(ids)
            i += 1
        adapter_state = {n: p.detach().clone() for n, p in adapters.params.items()}
        return dict(rt.iter_weights()), adapter_state, rolled


def test_a_rollback_restores_the_adapters_too(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    budget = _budget(model_dir, tmp_path)
    weights, adapters, rolled = _run(model_dir, tmp_path / "interval", budget, commit_every=10, poison_at=2)
    ref_weights, ref_adapters, ref_rolled = _run(model_dir, tmp_path / "every", budget, commit_every=1, poison_at=2)
    assert rolled == [2] and ref_rolled == [0]
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    for name in adapters:
        assert torch.equal(adapters[name], ref_adapters[name]), name


def test_resume_restores_the_committed_adapters(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    batches = _batches()
    whole = {}
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "whole") as rt:
        a = rt.add_lora(_settings("llama"))
        for ids in batches:
            rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        whole = {n: p.detach().clone() for n, p in a.params.items()}
    work = tmp_path / "split"
    with Runtime(model_dir, SGD(lr=LR), work_dir=work, commit_every=2) as rt:
        rt.add_lora(_settings("llama"))
        for ids in batches[:3]:  # step 3 is not committed: a crash loses it
            rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        rt.close(commit=False)
    assert len(list(work.glob("adapters-*.pt"))) == 1
    with Runtime(model_dir, SGD(lr=LR), work_dir=work, resume=True) as rt:
        ids = batches[2]
        with pytest.raises(UserError, match="trained with LoRA adapters"):
            rt.backward(rt.model(input_ids=ids, labels=ids).loss)
    with Runtime(model_dir, SGD(lr=LR), work_dir=work, resume=True) as rt:
        with pytest.raises(UserError, match="same --lora-"):
            rt.add_lora(LoraSettings(rank=2, target_modules=TARGETS["llama"], lr=LORA_LR))
    with Runtime(model_dir, SGD(lr=LR), work_dir=work, resume=True) as rt:
        a = rt.add_lora(_settings("llama"))
        assert rt.step == 2
        for ids in batches[2:]:
            rt.backward(rt.model(input_ids=ids, labels=ids).loss)
        for name, p in a.params.items():
            assert torch.equal(p.detach(), whole[name]), name


def test_bad_lora_settings_are_refused(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    with pytest.raises(UserError, match="--lora-rank"):
        LoraSettings(rank=0)
    with Runtime(model_dir, SGD(lr=LR), work_dir=tmp_path / "w") as rt:
        with pytest.raises(UserError, match="--lora-targets"):
            rt.add_lora(LoraSettings(rank=2, target_modules=["no_such_module"]))


def test_exact_clipping_clips_the_base_weights_and_leaves_the_adapters_gradients_whole(tmp_path: Path) -> None:
    """Exact clipping runs backward twice; the adapters must get one gradient, not two. The clip
    norm is the base weights' (the adapters have AdamW's own normalisation)."""
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    batches = _batches()
    clip = 0.3
    model, sgd, adamw = _with_adapters(model_dir, "llama")
    base = [p for n, p in model.named_parameters() if ".lora_" not in n]
    s = _settings("llama")
    for ids in batches:
        sgd.zero_grad(set_to_none=True)
        adamw.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(base, clip)
        assert norm > clip  # clipping is active
        sgd.step()
        adamw.step()
    expected = {_base_name(n): p.detach() for n, p in model.named_parameters()}
    with Runtime(model_dir, SGD(lr=LR, clip_grad_norm=clip, clip_mode="exact"), work_dir=tmp_path / "w",
                 weights_budget=_budget(model_dir, tmp_path)) as rt:
        adapters = rt.add_lora(s)
        for ids in batches:
            assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped
        for name, p in adapters.params.items():
            assert (p.detach() - expected[name]).abs().max().item() <= TOL, name
        for name, tensor in rt.iter_weights():
            assert (tensor - expected[name]).abs().max().item() <= TOL, name


def test_train_cli_with_lora_exports_merged_and_separate(tmp_path: Path) -> None:
    """`lomo-run train --lora-rank`: runs, resumes, and both export forms give the same logits."""
    import json
    import random
    import subprocess
    import sys

    from helpers import save_char_tokenizer

    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    save_char_tokenizer(model_dir)
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog".split()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(12))}) + "\n"
                            for _ in range(100)))

    def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "lomo_runtime", "train", "--model", str(model_dir), "--data", str(data),
               "--out", str(out), "--seq-len", "32", "--batch-size", "2", "--lr", "0.05", "--steps", "4",
               "--threads", "1", "--lora-rank", "4", "--lora-lr", "0.01", "--lora-targets", "q_proj,v_proj", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    merged, separate = tmp_path / "merged", tmp_path / "separate"
    for out, extra in ((merged, ()), (separate, ("--lora-export", "separate"))):
        proc = train(out, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (merged / "model" / "adapter").exists() and (separate / "model" / "adapter").exists()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    a = AutoModelForCausalLM.from_pretrained(merged / "model", dtype=torch.float32).eval()
    b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(separate / "model", dtype=torch.float32),
                                  separate / "model" / "adapter").eval()
    with torch.no_grad():
        assert (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item() <= 1e-5
    proc = train(tmp_path / "bad", "--lora-dropout", "1.5")
    assert proc.returncode != 0 and "--lora-dropout" in proc.stderr and "Traceback" not in proc.stderr

"""`LomoRunTrainer` against transformers' own Trainer on the same data order.

* gradient_accumulation_steps=1: the same per-step losses and final weights as
  `Trainer(optim="lomo")` (lomo-optim's fused SGD), fp32, <= 1e-5;
* gradient_accumulation_steps=2, with weight decay and max_grad_norm: the same as
  `Trainer(optim="sgd")` (torch.optim.SGD on the summed gradients, clipped by HF);
* both under a weights budget of about one block (units stream);
* resume_from_checkpoint after a crash ends where an uninterrupted run ends.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

from helpers import make_tiny_model
from lomo_runtime import SGD, Runtime
from lomo_runtime.errors import UserError
from lomo_runtime.integrations.transformers import LomoRunTrainer

TOL = 1e-5
STEPS = 8


def _dataset(n: int = 32, seq: int = 16, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, 128, (seq,), generator=gen)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _args(out: Path, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=STEPS, learning_rate=0.05,
                  lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_strategy="no", report_to=[],
                  use_cpu=True, seed=7, max_grad_norm=0.0, weight_decay=0.0, dataloader_num_workers=0,
                  disable_tqdm=True)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _one_block(model_dir: Path, tmp: Path, grad_accumulation: bool = False) -> int:
    with Runtime(model_dir, SGD(), work_dir=tmp / f"probe-budget-{grad_accumulation}",
                 grad_accumulation=grad_accumulation) as rt:
        return rt.minimum_weights_budget()


def _losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history if "loss" in h and "train_loss" not in h]


def _hf_run(model_dir: Path, args: TrainingArguments) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), data_collator=default_data_collator)
    trainer.train()
    return _losses(trainer.state.log_history), {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ours(model_dir: Path, args: TrainingArguments, budget: int, **kwargs) -> tuple[list[float], dict[str, torch.Tensor], LomoRunTrainer]:
    trainer = LomoRunTrainer(model=model_dir, args=args, train_dataset=_dataset(), data_collator=default_data_collator,
                             weights_budget=budget, **kwargs)
    trainer.train()
    weights = dict(trainer.runtime.iter_weights())
    trainer.close()
    return _losses(trainer.state.log_history), weights, trainer


def _compare(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> None:
    for name, tensor in ours.items():
        diff = (tensor - ref[name]).abs().max().item()
        assert diff <= TOL, f"{name} differs from transformers.Trainer by {diff} (moved {(ref[name] - start[name]).abs().max().item()})"


@pytest.mark.parametrize("tied", [True, False])
def test_equals_trainer_with_lomo_optim(tmp_path: Path, tied: bool) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=tied)
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    ref_losses, ref = _hf_run(model_dir, _args(tmp_path / "hf", optim="lomo"))
    losses, ours, trainer = _ours(model_dir, _args(tmp_path / "ours"), _one_block(model_dir, tmp_path))
    assert trainer.runtime.scheduler.stats.reads > 0  # it streamed
    assert len(losses) == STEPS
    assert losses == pytest.approx(ref_losses, abs=TOL)
    _compare(ours, ref, start)
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    assert all("learning_rate" in h and h["peak_host_mib"] > 0 for h in logged)
    # HF's linear warmup over 2 steps: step 1 runs at 0, step 2 at half the peak, step 3 at the peak.
    assert [h["learning_rate"] for h in logged[:3]] == pytest.approx([0.0, 0.025, 0.05])


def test_accumulation_weight_decay_and_clipping_equal_trainer_with_sgd(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    common = dict(gradient_accumulation_steps=2, weight_decay=0.1, max_grad_norm=0.5, lr_scheduler_type="cosine")
    ref_losses, ref = _hf_run(model_dir, _args(tmp_path / "hf", optim="sgd", **common))
    budget = _one_block(model_dir, tmp_path, grad_accumulation=True)  # the fp32 sums stream with the units
    losses, ours, trainer = _ours(model_dir, _args(tmp_path / "ours", **common), budget)
    assert trainer.runtime.no_weight_decay  # norms are exempt, as HF's optimizer groups exempt them
    assert losses == pytest.approx(ref_losses, abs=TOL)
    _compare(ours, ref, start)
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == STEPS and all(n > 0.5 for n in norms)  # clipping was active


class _Crash(TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"simulated crash at step {self.at}")


def test_resume_from_checkpoint_after_a_crash_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    budget = _one_block(model_dir, tmp_path)
    saving = dict(save_strategy="steps", save_steps=3)
    _, whole, _ = _ours(model_dir, _args(tmp_path / "whole", **saving), budget)

    out = tmp_path / "crashed"
    crashed = LomoRunTrainer(model=model_dir, args=_args(out, **saving), train_dataset=_dataset(),
                             data_collator=default_data_collator, weights_budget=budget, callbacks=[_Crash(5)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    crashed.runtime.close(commit=False)  # the process died: nothing after checkpoint-3 was committed
    assert (out / "checkpoint-3" / "lomo_run.json").exists()

    resumed = LomoRunTrainer(model=model_dir, args=_args(out, **saving), train_dataset=_dataset(),
                             data_collator=default_data_collator, weights_budget=budget)
    with pytest.raises(UserError, match="resume_from_checkpoint=True"):
        resumed.train()  # a store with steps in it is never silently trained over
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == STEPS
    weights = dict(resumed.runtime.iter_weights())
    resumed.close()
    for name, tensor in weights.items():
        assert torch.equal(tensor, whole[name]), f"{name}: resumed run differs from the uninterrupted one"


def test_save_model_exports_and_evaluate_matches_transformers(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    trainer = LomoRunTrainer(model=model_dir, args=_args(tmp_path / "o", max_steps=3), train_dataset=_dataset(),
                             eval_dataset=_dataset(8, seed=9), data_collator=default_data_collator,
                             weights_budget=_one_block(model_dir, tmp_path))
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(tmp_path / "export")
    trainer.close()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    reference = Trainer(model=exported, args=_args(tmp_path / "ref-eval"), eval_dataset=_dataset(8, seed=9),
                        data_collator=default_data_collator).evaluate()
    assert metrics["eval_loss"] == pytest.approx(reference["eval_loss"], abs=1e-6)
    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert not torch.equal(source.model.norm.weight, exported.model.norm.weight)  # it trained; the source is untouched


def test_a_model_in_memory_is_saved_as_the_source(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = LomoRunTrainer(model=model, args=_args(tmp_path / "o", max_steps=2), train_dataset=_dataset(),
                             data_collator=default_data_collator)
    trainer.train()
    trainer.close()
    assert (tmp_path / "o" / "lomo-run-source" / "config.json").exists()


@pytest.mark.parametrize("overrides,named", [
    (dict(bf16=True), "bf16"), (dict(optim="adafactor"), "optim='adafactor'"),
    (dict(load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps"), "load_best_model_at_end"),
    (dict(torch_compile=True), "torch_compile"),
])
def test_what_cannot_be_honoured_is_refused_naming_the_argument(tmp_path: Path, overrides: dict, named: str) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    try:
        args = _args(tmp_path / "o", **overrides)
    except ValueError as exc:  # transformers itself refuses some combinations on this machine (bf16 on CPU)
        pytest.skip(f"TrainingArguments refused it first: {exc}")
    with pytest.raises(UserError, match=f"LomoRunTrainer: {named}"):
        LomoRunTrainer(model=model_dir, args=args, train_dataset=_dataset(), data_collator=default_data_collator)
    assert not (tmp_path / "o" / "lomo-run-store").exists()


@pytest.mark.parametrize("arch,poisoned_param", [("llama", "model.layers.0.mlp.up_proj.weight"),
                                                  ("gpt2", "transformer.h.0.mlp.c_fc.weight")])
def test_a_nan_gradient_rolls_back_replays_and_equals_committing_every_step(tmp_path: Path, arch: str,
                                                                             poisoned_param: str) -> None:
    """A non-finite gradient at step 5 rolls the store back to its last commit (step 0 here, with
    the runtime's interval of 10): the trainer replays steps 1-4 from the micro-batches it kept and
    goes on past the dropped batch. It ends where a run that commits every step ends (that one
    rolls back nothing). GPT-2 has dropout: the replay must restore each micro-batch's RNG state."""
    model_dir = make_tiny_model(tmp_path, arch=arch, tied=True)
    budget = _one_block(model_dir, tmp_path)

    def run(label: str, commit_every: int) -> tuple[LomoRunTrainer, dict[str, torch.Tensor]]:
        trainer = LomoRunTrainer(model=model_dir, args=_args(tmp_path / label), train_dataset=_dataset(),
                                 data_collator=default_data_collator, weights_budget=budget,
                                 runtime_kwargs={"commit_every": commit_every})
        poisoned = []

        def poison(grad: torch.Tensor) -> torch.Tensor:
            if trainer.state.global_step == 4 and not poisoned:
                poisoned.append(True)
                return torch.full_like(grad, float("nan"))
            return grad

        trainer.runtime.model.get_parameter(poisoned_param).register_hook(poison)
        trainer.train()
        weights = dict(trainer.runtime.iter_weights())
        trainer.close()
        return trainer, weights

    replayed, weights = run("interval", 10)
    every, reference = run("every", 1)
    assert [d["rolled_back"] for d in replayed.dropped_steps] == [4]
    assert [d["rolled_back"] for d in every.dropped_steps] == [0]
    assert replayed.runtime.step == every.runtime.step == STEPS - 1
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference[name]), name


def test_lora_through_the_trainer_equals_sgd_plus_adamw_in_memory(tmp_path: Path) -> None:
    """LomoRunTrainer(lora=...) against transformers.Trainer(optim="sgd") on the same model with the
    same adapters injected: HF's SGD steps the base weights, a second AdamW (constant lr, as the
    adapters' lr follows HF's constant schedule) steps the adapters."""
    from peft import LoraConfig, inject_adapter_in_model
    from lomo_runtime.lora import LoraSettings

    model_dir = make_tiny_model(tmp_path, arch="llama", tied=True)
    settings = LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], lr=1e-2)
    args = dict(lr_scheduler_type="constant", warmup_steps=0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="none"), model)
    base = [p for n, p in model.named_parameters() if ".lora_" not in n]
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    for p in base:
        p.requires_grad_(True)
    adamw = torch.optim.AdamW(lora, lr=1e-2, weight_decay=0.0)

    class StepAdapters(TrainerCallback):
        def on_pre_optimizer_step(self, a, state, control, **kwargs):
            adamw.step()
            adamw.zero_grad(set_to_none=True)

    hf = Trainer(model=model, args=_args(tmp_path / "hf", optim="sgd", **args), train_dataset=_dataset(),
                 data_collator=default_data_collator, callbacks=[StepAdapters()],
                 optimizers=(torch.optim.SGD(base, lr=0.05), None))
    hf.train()
    ref = {n.replace(".base_layer", ""): p.detach() for n, p in model.named_parameters()}
    trainer = LomoRunTrainer(model=model_dir, args=_args(tmp_path / "ours", **args), train_dataset=_dataset(),
                             data_collator=default_data_collator, weights_budget=_one_block(model_dir, tmp_path),
                             lora=settings)
    trainer.train()
    assert _losses(trainer.state.log_history) == pytest.approx(_losses(hf.state.log_history), abs=TOL)
    for name, p in trainer.runtime.adapters.params.items():
        assert (p.detach() - ref[name]).abs().max().item() <= TOL, name
    for name, tensor in trainer.runtime.iter_weights():
        assert (tensor - ref[name]).abs().max().item() <= TOL, name
    trainer.close()

"""`LomoRunTrainer`: a `transformers.Trainer` whose model streams through a `Runtime`.

    trainer = LomoRunTrainer(model=MODEL_DIR_or_PreTrainedModel, args=TrainingArguments(...),
                             train_dataset=ds, data_collator=collator, rule="sgd", weights_budget="512MiB")
    trainer.train(); trainer.save_model(out_dir)

The Trainer's loop, data order, schedules, logging, callbacks and evaluation are
transformers' own; what changes is where the weights live and when they are
updated. Every parameter is updated inside backward by the runtime's fused rule
(`rt.backward`), so there is no optimizer step: the Trainer is given a stand-in
optimizer over one parameter that never gets a gradient, and its learning-rate
scheduler (warmup, linear, cosine, ...) drives that stand-in, whose learning
rate each step's fused update reads. The runtime clips (`max_grad_norm`, one of
lomo-run's clip modes), accumulates micro-batch gradients into fp32 buffers
(`gradient_accumulation_steps`: summed, one update per optimizer step; HF's own
`optim="lomo"` updates at every micro-batch instead) and exempts from weight
decay exactly the parameters `Trainer.get_decay_parameter_names` exempts.

Checkpoints. The working store is the model checkpoint: `save_steps` writes the
Trainer's own files into `checkpoint-N` (scheduler, RNG, trainer state), then
commits the store and writes `lomo_run.json` naming the store and its step. The
store commits only there (with saving by steps or epochs), so after a crash it is
at the newest complete checkpoint, and `resume_from_checkpoint` continues from
it. A non-finite gradient rolls the store back to that commit: the micro-batches
since (kept in memory, token ids only) are replayed with their learning rates
and RNG states, so the run continues as if the dropped step had been skipped.

`save_model(dir)` exports the weights in Hugging Face layout (`Runtime.export`).
`lora=LoraSettings(rank=...)` trains peft LoRA adapters (AdamW, in memory, at
`lora.lr` scaled by HF's schedule) beside the fused update (`lora_only=True`:
instead of it); `save_model` writes the merged model.

What the runtime cannot honour (fp16/bf16 autocast, DeepSpeed, FSDP, torch.compile,
HF activation checkpointing, another optimizer, more than one process, best-model
reloading) is refused with one line naming the argument.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments

from ..errors import UserError
from ..lora import LoraSettings
from ..rules import UpdateRule, rule_by_name
from ..runtime import Runtime
from ..sizes import format_size

MARKER = "lomo_run.json"  # in checkpoint-N: the store and step it belongs to (written last)
STORE_DIR = "lomo-run-store"
SOURCE_DIR = "lomo-run-source"  # where a PreTrainedModel passed in memory is saved as the store's source

# `optim` values that mean "whatever the default is" or name the fused rule itself.
_ACCEPTED_OPTIM = {"adamw_torch", "adamw_torch_fused", "lomo", "adalomo", "sgd"}


@dataclass
class _MicroBatch:
    """One micro-batch since the last commit, as needed to replay it bit for bit."""

    inputs: dict[str, Any]
    num_items_in_batch: Any
    lr: float
    rng_state: torch.Tensor
    accumulation_steps: int
    last: bool  # the optimizer step's last micro-batch


class LomoRunTrainer(Trainer):
    """A Hugging Face `Trainer` training every parameter with lomo-run's fused, streamed update."""

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel,
        args: TrainingArguments | None = None,
        *,
        rule: str | UpdateRule = "sgd",
        weights_budget: str | int | None = None,
        memory_budget: str | int | None = None,
        work_dir: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        clip_mode: str = "exact",
        seq_len: int | None = None,
        lora: LoraSettings | None = None,
        lora_only: bool = False,
        runtime_kwargs: dict[str, Any] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        args = args if args is not None else TrainingArguments(output_dir="trainer_output", report_to=[])
        _refuse_what_cannot_be_honoured(args, trainer_kwargs)
        output_dir = Path(args.output_dir)
        model_dir = _model_dir(model, output_dir)
        work = Path(work_dir) if work_dir is not None else output_dir / STORE_DIR
        self._store_existed = (work / "manifest.json").exists()
        saving = str(args.save_strategy) not in ("no", "SaveStrategy.NO")
        extra = dict(runtime_kwargs or {})
        if saving:
            # Commit only where the Trainer saves (`_save_checkpoint`): then the store after a crash is
            # at the newest complete checkpoint. A huge interval, not "never": commit_every is a count.
            extra.setdefault("commit_every", 2**62)
        self.runtime = Runtime(
            model_dir, _make_rule(rule, args, clip_mode), work_dir=work, weights_budget=weights_budget,
            memory_budget=memory_budget, seq_len=seq_len, batch_size=args.per_device_train_batch_size,
            dtype=dtype, grad_accumulation=args.gradient_accumulation_steps > 1, seed=args.seed,
            resume=self._store_existed, **extra)
        try:
            if lora is not None:
                self.runtime.add_lora(lora, train_base=not lora_only)
            elif lora_only:
                raise UserError("LomoRunTrainer: lora_only=True needs lora=LoraSettings(rank=...)")
        except BaseException:
            self.runtime.close(commit=False)
            raise
        self._replay: list[_MicroBatch] = []   # micro-batches since the last commit
        self._step_dropped = False             # a micro-batch of the current optimizer step was dropped
        self._grad_norm: float | None = None
        self._checkpointing = False
        self.dropped_steps: list[dict[str, Any]] = []  # what was dropped, when and why (also in log_history)
        try:
            super().__init__(model=self.runtime.model, args=args, **trainer_kwargs)
            # HF's optimizer groups exempt biases and norms from weight decay; so does the fused rule.
            # Names as the store has them (peft moves an adapted weight under `.base_layer`).
            def canonical(name: str) -> str:
                return name.replace(".base_layer", "")

            names = {canonical(n) for n, _ in self.runtime.model.named_parameters() if ".lora_" not in n}
            decayed = {canonical(n) for n in self.get_decay_parameter_names(self.runtime.model)}
            self.runtime.no_weight_decay = names - decayed
        except BaseException:
            self.runtime.close(commit=False)
            raise

    # ---- the optimizer the Trainer thinks it has ---------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """A stand-in over one parameter that never gets a gradient: it carries the learning rate
        the Trainer's scheduler sets, and its `step()` changes nothing."""
        if self.optimizer is None:
            self._lr_carrier = nn.Parameter(torch.zeros(1))
            self.optimizer = torch.optim.SGD([self._lr_carrier], lr=self.args.learning_rate)
        return self.optimizer

    # ---- one micro-batch -----------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        last = bool(self.accelerator.gradient_state.sync_gradients)
        if self._step_dropped:  # an earlier micro-batch of this optimizer step was dropped: so is the step
            self._step_dropped = not last
            return torch.tensor(float("nan"), device=self.args.device)
        record = _MicroBatch(inputs=self._prepare_inputs(inputs), num_items_in_batch=num_items_in_batch,
                             lr=float(self._get_learning_rate()), rng_state=torch.get_rng_state(),
                             accumulation_steps=self.current_gradient_accumulation_steps, last=last)
        loss, result = self._run(model, record)
        if result.dropped:
            self._on_dropped(model, result)
            self._step_dropped = not last
            return loss
        self._replay.append(record)
        if result.committed:  # the runtime's own interval (save_strategy="no")
            self._replay.clear()
        if last:
            self._grad_norm = result.grad_norm if result.grad_norm is not None else self.runtime.last_grad_norm
        return loss

    def _run(self, model: nn.Module, record: _MicroBatch):
        model.train()
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, record.inputs, num_items_in_batch=record.num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = (self.model_accepts_loss_kwargs and record.num_items_in_batch is not None) \
            or self.compute_loss_func is not None
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        if not scaled:  # as Trainer.training_step: a mean over the optimizer step's micro-batches
            loss = loss / record.accumulation_steps
        adapters = self.runtime.adapters
        adapter_lr = None
        if adapters is not None and self.args.learning_rate > 0:  # the adapters follow HF's schedule too
            adapter_lr = adapters.settings.lr * record.lr / self.args.learning_rate
        result = self.runtime.backward(loss, lr=record.lr, accumulate=not record.last, adapter_lr=adapter_lr)
        return loss.detach(), result

    def _on_dropped(self, model: nn.Module, result) -> None:
        """The runtime dropped the step (non-finite loss or gradient). If it rolled the weights back
        to the last commit, replay the completed steps since, then carry on past this batch."""
        self.dropped_steps.append({"global_step": self.state.global_step + 1, "reason": result.reason,
                                   "rolled_back": result.rolled_back})
        if self.state.log_history is not None:
            self.state.log_history.append({"step": self.state.global_step + 1, "dropped": result.reason,
                                           "rolled_back_steps": result.rolled_back})
        # The micro-batches of this step (if accumulated before the drop) are gone with it.
        while self._replay and not self._replay[-1].last:
            self._replay.pop()
        if not result.rolled_back:
            return
        steps, current = [], []
        for record in self._replay:
            current.append(record)
            if record.last:
                steps.append(current)
                current = []
        if len(steps) != result.rolled_back:
            raise RuntimeError(f"internal error: {result.rolled_back} steps rolled back, {len(steps)} kept for replay")
        rng = torch.get_rng_state()
        try:
            for step in steps:
                for record in step:
                    torch.set_rng_state(record.rng_state)
                    _, again = self._run(model, record)
                    if again.dropped:
                        raise RuntimeError(f"a replayed step was dropped again ({again.reason}); it was not on its first run")
        finally:
            torch.set_rng_state(rng)

    def _clip_grad_norm(self, model: nn.Module) -> float | None:
        return self._grad_norm  # the runtime clipped inside backward; this is the norm it saw

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> float | None:
        return self._grad_norm

    # ---- logging --------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: the memory the runtime measured since the last one
            report = self.runtime.memory_report()
            logs["peak_host_mib"] = round(report["peak_host_bytes"] / 2**20, 1)
            logs["weights_resident_peak_mib"] = round(report["weights_resident_peak_bytes"] / 2**20, 3)
            stats = self.runtime.scheduler.stats
            logs["read_mib"] = round(stats.read_bytes / 2**20, 3)
            logs["written_mib"] = round(stats.write_bytes / 2**20, 3)
            self.runtime.reset_peaks()
        super().log(logs, start_time)

    # ---- checkpoints ----------------------------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's files first, then the commit, then the marker: a checkpoint with a marker
        always has its weights in the store."""
        self._checkpointing = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpointing = False
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        step = self.runtime.commit()
        self._replay.clear()
        marker = {"store": str(self.runtime.work_dir.resolve()), "step": step, "global_step": self.state.global_step}
        tmp = folder / (MARKER + ".tmp")
        tmp.write_text(json.dumps(marker, indent=2) + "\n")
        os.replace(tmp, folder / MARKER)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self._checkpointing:
            os.makedirs(output_dir, exist_ok=True)  # the weights are the store's; committed after HF's files
            return
        if state_dict is not None:
            raise UserError("LomoRunTrainer.save_model: state_dict= is not supported; the weights are exported from the working store")
        self.runtime.export(output_dir)
        self._replay.clear()  # export commits
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Nothing to load: the working store holds the weights. Check it is the checkpoint's."""
        folder = Path(resume_from_checkpoint)
        marker = folder / MARKER
        if not marker.exists():
            raise UserError(f"{folder}: no {MARKER}; it was not written by LomoRunTrainer, or the run stopped "
                            "while saving it: resume from an earlier checkpoint")
        info = json.loads(marker.read_text())
        store = self.runtime.store
        if info.get("step") != store.step:
            raise UserError(f"{folder} holds step {info.get('step')} of the working store, but "
                            f"{self.runtime.work_dir} is at step {store.step}: resume from the checkpoint that "
                            "matches it (resume_from_checkpoint=True picks it)")

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any):
        """`Trainer.train`; commits the store at the end (the trained weights are then durable)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._matching_checkpoint()
        if not resume_from_checkpoint and self.runtime.store.step > 0:
            raise UserError(f"{self.runtime.work_dir} holds a working store trained {self.runtime.store.step} steps "
                            "by an earlier run: pass resume_from_checkpoint=True to continue it, or use a new "
                            "output_dir (or work_dir)")
        output = super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial, **kwargs)
        self.runtime.commit()
        self._replay.clear()
        return output

    def _matching_checkpoint(self) -> str:
        """The newest checkpoint-N in output_dir whose marker names the store's committed step."""
        step = self.runtime.store.step
        found = []
        for folder in Path(self.args.output_dir).glob("checkpoint-*"):
            marker = folder / MARKER
            if marker.exists() and json.loads(marker.read_text()).get("step") == step:
                found.append((int(folder.name.split("-")[-1]), folder))
        if not found:
            raise UserError(f"{self.args.output_dir}: no checkpoint-N matches the working store "
                            f"{self.runtime.work_dir} (step {step})")
        return str(max(found)[1])

    def close(self) -> None:
        """Commit and release the runtime (its I/O threads, the store's lock)."""
        self.runtime.close()

    def __repr__(self) -> str:
        budget = self.runtime.weights_budget
        return (f"LomoRunTrainer(rule={type(self.runtime.rule).__name__}, "
                f"weights_budget={format_size(budget) if budget else 'all resident'}, store={self.runtime.work_dir})")


def _model_dir(model: str | os.PathLike | PreTrainedModel, output_dir: Path) -> Path:
    """The checkpoint directory the store is built from; a model in memory is saved there first
    (the caller's own files are never written)."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not (path / "config.json").exists():
            raise UserError(f"model: {path} is not a Hugging Face model directory (no config.json)")
        return path
    if isinstance(model, PreTrainedModel):
        target = output_dir / SOURCE_DIR
        if not (target / "config.json").exists():
            model.save_pretrained(target)
        return target
    raise UserError(f"model: a model directory or a transformers PreTrainedModel, got {type(model).__name__}")


def _make_rule(rule: str | UpdateRule, args: TrainingArguments, clip_mode: str) -> UpdateRule:
    clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
    if not isinstance(rule, str):
        return rule
    kwargs: dict[str, Any] = dict(lr=args.learning_rate, weight_decay=args.weight_decay, clip_grad_norm=clip,
                                  clip_mode=clip_mode)
    if rule == "adamw":
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    return rule_by_name(rule, **kwargs)


def _refuse_what_cannot_be_honoured(args: TrainingArguments, trainer_kwargs: dict[str, Any]) -> None:
    def refuse(name: str, why: str) -> None:
        raise UserError(f"LomoRunTrainer: {name} is not supported: {why}")

    if args.fp16 or args.bf16:
        refuse("fp16/bf16" if args.fp16 and args.bf16 else ("fp16" if args.fp16 else "bf16"),
               "weights are stored and trained in one dtype; pass LomoRunTrainer(dtype=torch.bfloat16) instead")
    if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
        refuse("activation_checkpointing", "lomo-run checkpoints and recomputes every unit itself")
    if args.deepspeed:
        refuse("deepspeed", "the runtime streams and updates the weights itself")
    if args.fsdp:
        refuse("fsdp", "the runtime streams and updates the weights itself")
    if args.torch_compile:
        refuse("torch_compile", "streamed parameters change storage between uses")
    if args.load_best_model_at_end:
        refuse("load_best_model_at_end", "the working store keeps one line of weights; export the model you want")
    if args.auto_find_batch_size:
        refuse("auto_find_batch_size", "size the job with `lomo-run plan` instead")
    if args.neftune_noise_alpha is not None:
        refuse("neftune_noise_alpha", "not implemented")
    if getattr(args, "use_liger_kernel", False):
        refuse("use_liger_kernel", "not implemented")
    if args.world_size > 1:
        refuse(f"world_size {args.world_size}", "one process only for now")
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in _ACCEPTED_OPTIM:
        refuse(f"optim={optim!r}", "the update rule is LomoRunTrainer(rule='sgd'|'adamw'|'adalomo'), fused into backward")
    for name in ("model_init", "optimizers", "optimizer_cls_and_kwargs"):
        if trainer_kwargs.get(name) not in (None, (None, None)):
            refuse(name, "the runtime owns the model and its update rule")

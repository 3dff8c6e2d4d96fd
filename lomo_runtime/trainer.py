"""The training loop, top to bottom: data, runtime, steps, eval, metrics, export.

Durability: the runtime commits every `--commit-every` steps together with the
data stream's position (`trainer` in the store's meta), so `--resume` continues
from the last committed step with exactly the batches an uninterrupted run would
have seen. Everything random or scheduled is a function of the step: dropout
draws from a generator seeded by (seed, step), the learning rate comes from the
schedule at the step, stochastic rounding is seeded by (seed, step, parameter).
So a replayed step repeats itself bit for bit. metrics.jsonl lines past the
committed step are dropped on resume: they describe work that did not survive.

A dropped step (non-finite loss or gradient) never keeps any part of its update.
When its gradient was found non-finite after some units were updated, the
runtime rolls every unit back to the last commit; the loop then replays the
steps since that commit from their recorded data positions (without logging
them twice) and retries the dropped step with the batch after the dropped one,
exactly as a run committing every step does.

Several ranks (`--parallel replicate|shard` under torchrun): every rank reads the global batch
stream (`--batch-size` x W sequences per step, the batches one process with that batch size
would see) and takes its rank's consecutive share, so the data position is the same on every
rank and resumes as one. The loss each rank backpropagates is its label tokens' summed loss
over the global batch's label-token count, times W: the runtime averages gradients over the
ranks, so the update is that of the mean over the global batch, as one process computes it.
Rank 0 alone writes metrics.jsonl, plan.json, config.yaml and the exported model; the logged
loss and tokens are the global batch's, the memory figures rank 0's.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import TrainConfig, parse_duration
from .data import Batches, load_examples, load_tokenizer, pack, pad_id_of, split_holdout, tokenize_examples, tokens_in
from .errors import LomoError, UserError
from .evaluation import ChoiceExample, ChoiceResult, load_choice_examples, score_choices
from .lora import LoraSettings
from .progress import MetricsWriter, Progress, SilentStream
from .rules import rule_by_name
from .dist import Parallel, launched, stop_on_sigterm
from .runtime import Runtime
from .schedule import LRSchedule


class TrainingStopped(LomoError):
    """Training cannot make progress (e.g. every step is non-finite); the store is intact."""

    exit_code = 1


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    eval_loss: float | None
    model_dir: Path


def build_data(cfg: TrainConfig, max_positions: int, tokenizer: Any, world: int = 1) -> tuple[Batches, Batches | None]:
    """Tokenise the data file with the model's tokenizer, pack it, split off the eval share.
    The training stream's batches are global: `world` x `--batch-size` sequences (ranks take shares)."""
    if cfg.seq_len > max_positions:
        raise UserError(
            f"--seq-len {cfg.seq_len} exceeds the model's maximum positions ({max_positions}); "
            f"use --seq-len {max_positions} or less"
        )
    examples = load_examples(cfg.data)
    train_ex, eval_ex = split_holdout(examples, cfg.eval_fraction, cfg.seed) if cfg.eval_fraction > 0 else (examples, [])
    pad = pad_id_of(tokenizer)
    train_seqs = pack(tokenize_examples(train_ex, tokenizer), cfg.seq_len, pad_id=pad)
    train = Batches(train_seqs, cfg.batch_size * world, seed=cfg.seed)
    evaluation = None
    if eval_ex:
        eval_seqs = pack(tokenize_examples(eval_ex, tokenizer), cfg.seq_len, pad_id=pad, drop_tail=False)
        evaluation = Batches(eval_seqs, cfg.batch_size, seed=cfg.seed, shuffle=False, epochs=1)
    return train, evaluation


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while evaluating, back on for training."""
    model.eval()
    try:
        yield
    finally:
        model.train()


def evaluate(rt: Runtime, batches: Batches | None, max_batches: int) -> float | None:
    """Mean loss per label token over up to `max_batches` held-out batches (weights streamed, no grad)."""
    if batches is None:
        return None
    total, count = 0.0, 0
    batches.load_state_dict({**batches.state_dict(), "epoch": 0, "index": 0})
    with torch.no_grad(), eval_mode(rt.model):
        for i, (ids, labels) in enumerate(batches):
            if i >= max_batches:
                break
            n = tokens_in((ids, labels))
            if n == 0:
                continue
            total += rt.model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return total / count if count else None


def train(cfg: TrainConfig) -> TrainResult:
    """Run `cfg` to completion (or resume it), writing metrics, the plan and the model under `cfg.out`."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if launched() and cfg.parallel is None:
        raise UserError(f"started as one of {os.environ.get('WORLD_SIZE')} processes: pass --parallel replicate "
                        "(each rank trains on its share of the batch), or start one process")
    par = Parallel(cfg.parallel) if cfg.parallel else None
    if par is not None:
        stop_on_sigterm()
    try:
        return _train(cfg, par)
    finally:
        if par is not None:
            par.close()


def _train(cfg: TrainConfig, par: Parallel | None) -> TrainResult:
    main = par is None or par.is_main  # writes the outputs and prints progress
    world = 1 if par is None else par.world
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    work_dir = Path(cfg.offload_dir) if cfg.offload_dir else out / "store"
    if cfg.resume and par is None and not (work_dir / "manifest.json").exists():
        raise UserError(f"--resume: no working store at {work_dir} to resume from")
    if par is not None:
        par.same_everywhere(cfg.to_yaml(), "the settings")

    from .aio import open_engine
    from .checkpoint import Checkpoint

    # --io-engine aio: say at once when it cannot build here, and build it (minutes, once) before data work.
    open_engine(cfg.io_engine, sys.stderr if main else None)
    checkpoint = Checkpoint.open(cfg.model)  # validate weights before any data work
    tokenizer = load_tokenizer(cfg.model)  # one tokenizer for training data and multiple-choice eval
    train_batches, eval_batches = build_data(cfg, checkpoint.arch.max_positions(checkpoint.config), tokenizer,
                                             world=world)
    choices = load_choice_examples(cfg.eval_data) if cfg.eval_data else None

    rule = rule_by_name(cfg.rule, lr=cfg.lr, weight_decay=cfg.weight_decay, clip_grad_value=cfg.clip_grad_value,
                        clip_grad_norm=cfg.clip_grad_norm, clip_mode=cfg.clip_mode)
    schedule = LRSchedule(cfg.schedule, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    rt = Runtime(
        cfg.model, rule, work_dir=work_dir, memory_budget=cfg.memory_budget, weights_budget=cfg.weights_budget,
        device=cfg.device, host_budget=cfg.host_memory_budget,
        dtype=cfg.torch_dtype, prefetch_depth=cfg.prefetch_depth, io_threads=cfg.io_threads, resume=cfg.resume,
        seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed, master_weights=cfg.master_weights,
        stochastic_rounding=cfg.stochastic_rounding, grad_accumulation=cfg.grad_accum_steps > 1,
        checkpoint=checkpoint, heap_keep=cfg.heap_keep or 0, heap_trim=cfg.heap_trim, commit_every=cfg.commit_every,
        progress_stream=sys.stderr if main else None, parallel=par, io_engine=cfg.io_engine,
        commit_interval_s=parse_duration(cfg.commit_interval, "--commit-interval") if cfg.commit_interval else None,
    )
    with rt:
        if cfg.lora_rank:
            targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()] if cfg.lora_targets else None
            rt.add_lora(LoraSettings(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                     target_modules=targets, lr=cfg.lora_lr), train_base=not cfg.lora_only)
        # Written only now, under the store's lock: a refused second run must not touch this run's files.
        if main:
            (out / "config.yaml").write_text(cfg.to_yaml())
            _write_plan(rt, cfg, out)
        state = rt.store.meta.get("trainer")
        if cfg.resume and state:
            train_batches.load_state_dict(state["batches"])
        if main:
            metrics = MetricsWriter(out / "metrics.jsonl", truncate_after_step=rt.step)
            _recover_last_metrics(metrics, out / "metrics.jsonl", state, rt.step)
        else:
            metrics = _NoMetrics()
        progress = Progress(cfg.steps, start_step=rt.step, stream=None if main else SilentStream())
        last_loss: float | None = None
        eval_loss: float | None = None
        dropped_in_a_row = 0
        evaluated_at, scored = None, None  # step of the last periodic eval, and its multiple-choice result
        dropped_total = int((state or {}).get("dropped_total", 0))  # survives --resume
        positions: dict[int, dict] = {}  # data position at the start of each step since the last commit
        retry_from: dict[int, dict] = {}  # a step retried after a drop starts past the dropped batch
        replayed_to: set[int] = set()  # dropped steps whose retry follows a replay (commit before it)
        logged_upto = rt.step  # training steps already in metrics.jsonl: a replay does not log them again
        stats = rt.scheduler.stats
        try:
            while rt.step < cfg.steps:
                step = rt.step  # 0-based index of the step being run
                if step in retry_from:
                    if step in replayed_to:
                        replayed_to.discard(step)
                        rt.commit()  # replayed up to the dropped step: a second drop there rolls back no further
                    train_batches.load_state_dict(retry_from[step])
                positions[step] = train_batches.state_dict()
                replay = step < logged_upto
                lr = schedule.lr_at(step)
                # Dropout masks depend on (seed, step, rank) only; rank 0 draws what one process would.
                torch.manual_seed(cfg.seed * 1_000_003 + step + (0 if par is None else par.rank * 7_919_000_003))
                read0, write0 = stats.read_bytes, stats.write_bytes
                rt.reset_peaks()
                started = time.perf_counter()
                k = cfg.grad_accum_steps
                last_loss, tokens, loss_tokens = 0.0, 0, 0
                phases = dict.fromkeys(("forward_s", "backward_s", "read_wait_s", "write_wait_s", "commit_s"), 0.0)
                if par is not None:
                    phases["reduce_wait_s"] = 0.0  # waits on gradient all-reduces, out of backward_s
                for micro in range(k):
                    ids, labels = next(train_batches)
                    if par is not None:  # this rank's share of the global batch
                        share = slice(par.rank * cfg.batch_size, (par.rank + 1) * cfg.batch_size)
                        ids, labels = ids[share], labels[share]
                    with _phase(phases, "forward_s", stats):
                        output = rt.model(input_ids=ids, labels=labels)
                    n = tokens_in((ids, labels))  # positions the loss covers (prompt tokens excluded)
                    # Each micro-batch's mean loss is scaled by 1/k, so the applied gradient is the mean over all.
                    if par is None:
                        loss, n_all = output.loss / k, n
                        last_loss += float(loss.item())
                    else:
                        loss, mean_loss, n_all = _global_loss(par, output, n)
                        loss = loss / k
                        last_loss += mean_loss / k
                    tokens += ids.numel() * world  # positions run through forward and backward (the compute)
                    loss_tokens += n_all
                    final = micro == k - 1
                    # What a crash between commit and the metrics line must not lose travels with the commit.
                    summary = {"step": step + 1, "loss": last_loss, "tokens": tokens, "loss_tokens": loss_tokens, "lr": lr}
                    reduce_waits = rt.reduce_wait_s
                    with _phase(phases, "backward_s", stats):
                        result = rt.backward(loss, lr=lr, accumulate=not final, adapter_lr=cfg.lora_lr * lr / cfg.lr, commit_meta={
                            "trainer": {"batches": train_batches.state_dict(), "last_metrics": summary,
                                        "dropped_total": dropped_total}} if final else None)
                    # The output holds the logits (batch x seq x vocab fp32: 62.5 MiB for 2 x 256 x 32k):
                    # kept until the next forward's assignment, they would sit beside its peak.
                    output = loss = None
                    phases["backward_s"] -= result.commit_s
                    if par is not None:
                        phases["reduce_wait_s"] += rt.reduce_wait_s - reduce_waits
                        phases["backward_s"] -= rt.reduce_wait_s - reduce_waits
                    phases["commit_s"] += result.commit_s
                    if result.dropped:
                        break
                elapsed = time.perf_counter() - started
                if result.dropped:
                    retry_from[step] = train_batches.state_dict()  # the retry takes the batch after the dropped one
                    if result.rolled_back:
                        # Units went back to the last commit: replay from there, with the batches those steps had.
                        train_batches.load_state_dict(positions[result.step])
                        replayed_to.add(step)
                        progress.write(f"step {step + 1} dropped ({result.reason}); replaying steps "
                                       f"{result.step + 1}-{step} from the last commit")
                if result.committed:
                    positions = {s: p for s, p in positions.items() if s >= rt.step}
                    retry_from = {s: p for s, p in retry_from.items() if s >= rt.step}
                if replay and not result.dropped:
                    continue  # logged, evaluated and exported when it first ran; this run is identical
                record = {
                    **summary,
                    "step": rt.step if not result.dropped else step,
                    "step_time_s": elapsed,
                    "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
                    **rt.memory_report(),  # measured peaks per category (plan.json predicts the same ones)
                    "io_read_bytes": stats.read_bytes - read0,
                    "io_write_bytes": stats.write_bytes - write0,
                    "io_wait_s": phases["read_wait_s"] + phases["write_wait_s"],
                    **phases,  # disjoint: forward and backward exclude their I/O waits, backward its commit
                    "committed": result.committed,
                    "dropped": result.dropped,
                }
                if not result.dropped:
                    logged_upto = rt.step
                dropped_in_a_row = dropped_in_a_row + 1 if result.dropped else 0
                dropped_total += result.dropped
                record["dropped_total"] = dropped_total
                if result.loss_scale is not None:
                    record["loss_scale"] = result.loss_scale
                if result.grad_norm is not None:
                    record["grad_norm"] = result.grad_norm
                if result.dropped:
                    # The data position was not committed: a resumed run replays this batch and,
                    # being deterministic, drops it again, so both runs stay identical.
                    record["dropped_reason"] = result.reason
                    if result.rolled_back:
                        record["rolled_back_steps"] = result.rolled_back
                if cfg.eval_every and rt.step % cfg.eval_every == 0 and not result.dropped:
                    eval_loss = evaluate(rt, eval_batches, cfg.eval_batches)
                    record["eval_loss"] = eval_loss
                    if choices:
                        scored = _score(rt, tokenizer, choices, cfg)
                        record["eval_accuracy"], record["eval_choice_loss"] = scored.accuracy, scored.loss
                    evaluated_at = rt.step
                metrics.write(record)
                progress.update(rt.step, last_loss, tokens, record["peak_host_bytes"])
                if dropped_in_a_row >= cfg.max_dropped_steps:
                    raise TrainingStopped(
                        f"{dropped_in_a_row} consecutive steps were dropped ({result.reason}); stopping. "
                        f"The working store holds the last good step, {rt.committed_step}; lower --lr or check the "
                        "data, then continue with --resume"
                    )
                if cfg.export_every and rt.step % cfg.export_every == 0 and not result.dropped:
                    _export(rt, out / f"checkpoint-{rt.step}", cfg.lora_export)  # commits first
            rt.commit()
            if evaluated_at != rt.step:  # the last step's periodic eval already scored these weights
                eval_loss = evaluate(rt, eval_batches, cfg.eval_batches)
                scored = _score(rt, tokenizer, choices, cfg) if choices else None
            if eval_loss is not None:
                metrics.write({"step": rt.step, "final_eval_loss": eval_loss})
                progress.write(f"eval loss {eval_loss:.4f}")
            if scored is not None:
                metrics.write({"step": rt.step, "final_eval_accuracy": scored.accuracy, "final_eval_choice_loss": scored.loss})
                progress.write(f"eval accuracy {scored.accuracy:.3f} ({len(choices)} examples)")
        finally:
            progress.close()
            metrics.close()
        model_dir = _export(rt, out / "model", cfg.lora_export)
    return TrainResult(steps=cfg.steps, final_loss=last_loss, eval_loss=eval_loss, model_dir=model_dir)


def _global_loss(par: Parallel, output: Any, n: int) -> tuple[torch.Tensor, float, int]:
    """(the loss this rank backpropagates, the global batch's mean loss, its label tokens).

    Its label tokens' summed loss over the global count, times W: averaged over the ranks the
    gradient is that of the global mean. A rank without label tokens contributes zeros."""
    totals = torch.tensor([float(n), float(output.loss.detach()) * n if n else 0.0], dtype=torch.float64)
    par.sum_(totals)
    n_all, summed = int(totals[0].item()), float(totals[1].item())
    if n_all == 0:
        return output.loss, float("nan"), 0  # nothing to learn from anywhere: the step is dropped
    loss = output.loss * (n * par.world / n_all) if n else output.logits.sum() * 0.0
    return loss, summed / n_all, n_all


class _NoMetrics:
    """metrics.jsonl on ranks other than 0: rank 0 writes it."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _phase(phases: dict[str, float], name: str, stats: Any) -> Iterator[None]:
    """Add the wall time of the block to `phases[name]`, less the I/O waits inside it, which go to
    `read_wait_s` and `write_wait_s`: the phases of a step are disjoint and sum to about its time."""
    reads, writes = stats.read_waits_s, stats.write_waits_s
    started = time.perf_counter()
    try:
        yield
    finally:
        read_wait, write_wait = stats.read_waits_s - reads, stats.write_waits_s - writes
        phases[name] += time.perf_counter() - started - read_wait - write_wait
        phases["read_wait_s"] += read_wait
        phases["write_wait_s"] += write_wait


def _score(rt: Runtime, tokenizer: Any, choices: list[ChoiceExample], cfg: TrainConfig) -> ChoiceResult:
    """Multiple-choice accuracy and answer loss of the current weights (eval mode, streamed)."""
    with eval_mode(rt.model):
        return score_choices(rt.model, tokenizer, choices, batch_size=2 * cfg.batch_size)


def _recover_last_metrics(metrics: MetricsWriter, path: Path, state: dict | None, step: int) -> None:
    """A kill between a commit and its metrics line loses the line; the commit carries a copy."""
    from .progress import read_metrics

    if not state or "last_metrics" not in state or step == 0:
        return
    logged = {r.get("step") for r in read_metrics(path) if "loss" in r}
    if step not in logged:
        metrics.write({**state["last_metrics"], "recovered": True})


def _export(rt: Runtime, target: Path, adapters: str = "merged") -> Path:
    """Export to a temporary sibling and rename, so a crash never leaves a half-written model."""
    tmp = target.with_name(target.name + ".partial")
    if rt.parallel is not None and not rt.parallel.is_main:
        rt.export(tmp, adapters=adapters)  # commits with the others; rank 0 writes
        return target
    if tmp.exists():
        shutil.rmtree(tmp)
    rt.export(tmp, adapters=adapters)
    if target.exists():
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    return target


def _write_plan(rt: Runtime, cfg: TrainConfig, out: Path) -> None:
    """Write OUT/plan.json: the planner's prediction for this run, to check against metrics.jsonl."""
    import json

    from .planner import RunConfig, plan
    from .planner.spec import ModelSpec
    from .probe import load_machine
    from .sizes import parse_size

    spec = ModelSpec.from_config(rt.checkpoint.config, cfg.dtype, cfg.rule)
    run = RunConfig(seq_len=cfg.seq_len, batch_size=cfg.batch_size, dtype=cfg.dtype, rule=cfg.rule, device=rt.device,
                    memory_budget=parse_size(cfg.memory_budget) if cfg.memory_budget else None,
                    weights_budget=rt.weights_budget, prefetch_depth=cfg.prefetch_depth,
                    host_budget=rt.host_budget if rt.compute_device is not None else None,
                    master_weights=rt.master_weights, grad_accumulation=rt.grad_accumulation,
                    row_updates=rt.row_updates,
                    heap_keep=rt.heap_keep, heap_trim=rt._trim, commit_every=rt.commit_every,
                    split_blocks=rt.checkpoint.split,
                    **({} if rt.parallel is None else {"nproc": rt.parallel.world, "parallel": rt.parallel.mode}))
    device = "cuda" if rt.device.startswith("cuda") else "cpu"  # the tests' simulated device plans as cpu
    memory = None
    if device == "cuda" and cfg.memory_budget is None:  # the plan's budget: the whole device
        import torch

        memory = torch.cuda.mem_get_info(rt.compute_device.torch_device)[1]
    run.device = device
    machine = load_machine(device, cfg.dtype, device_memory=memory)
    if rt.planned_framework_bytes is not None:  # the framework the runtime sized its budget with
        machine.framework_bytes = rt.planned_framework_bytes
        machine.source["framework_bytes"] = "measured"
    predicted = plan(spec, run, machine)
    tmp = out / "plan.json.tmp"
    tmp.write_text(json.dumps(predicted.to_json(), indent=1))
    os.replace(tmp, out / "plan.json")

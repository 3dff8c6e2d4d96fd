"""`lomo-run train`: flags over the YAML config over defaults, then `trainer.train`."""
from __future__ import annotations

import os

import click

from . import cli
from ..config import load_yaml, merge


@cli.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file with the same settings as the flags.")
@click.option("--model", help="Model directory (config.json, safetensors, tokenizer).")
@click.option("--data", help="Training data: JSONL with text or prompt/completion, or plain text.")
@click.option("--out", help="Output directory (metrics.jsonl, plan.json, model/).")
@click.option("--steps", type=int)
@click.option("--lr", type=float)
@click.option("--schedule", type=click.Choice(["constant", "linear", "cosine"]))
@click.option("--warmup-steps", type=int)
@click.option("--weight-decay", type=float)
@click.option("--clip-grad-value", type=float)
@click.option("--clip-grad-norm", type=float, help="Clip the gradient's global norm to this value.")
@click.option("--clip-mode", type=click.Choice(["exact", "previous", "unit"]),
              help="exact: two backward passes; previous: last step's norm; unit: each unit's own norm.")
@click.option("--rule", type=click.Choice(["sgd", "adamw", "adalomo"]), help="Update rule (default sgd).")
@click.option("--grad-accum-steps", type=int, help="Micro-batches per optimizer step.")
@click.option("--master-weights/--no-master-weights", default=None, help="Keep fp32 master weights (bf16/fp16).")
@click.option("--stochastic-rounding/--no-stochastic-rounding", default=None, help="Round into bf16 stochastically.")
@click.option("--seq-len", type=int)
@click.option("--batch-size", type=int)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--device", help="Compute device: cpu (default), cuda or cuda:N.")
@click.option("--memory-budget", help="Memory the process may use, e.g. 2GiB (CPU: resident set size; cuda: device memory).")
@click.option("--host-memory-budget", help="cuda: host memory for units between uses, pinned (default: what fits in RAM).")
@click.option("--weights-budget", help="Cap on resident weight bytes, e.g. 160KB.")
@click.option("--heap-keep", help="Freed heap kept mapped between units, e.g. 256MiB: faster steps, higher RSS (default 0).")
@click.option("--heap-trim", type=click.Choice(["step", "unit"]),
              help="Return freed heap to the OS a few times a step or after every unit (least RSS, slower; the "
                   "default with --memory-budget, so the plan's peak holds).")
@click.option("--offload-dir", help="Where the working store lives (default OUT/store).")
@click.option("--seed", type=int)
@click.option("--eval-fraction", type=float)
@click.option("--eval-data", help="Multiple-choice JSONL (prompt, completion, choices) scored for accuracy at each eval.")
@click.option("--eval-every", type=int)
@click.option("--eval-batches", type=int)
@click.option("--export-every", type=int)
@click.option("--prefetch-depth", type=int)
@click.option("--io-engine", type=click.Choice(["posix", "aio"]),
              help="How unit files move: posix (O_DIRECT, the default) or aio (DeepSpeed async I/O; needs "
                   "libaio-dev, built on first use in several minutes).")
@click.option("--threads", type=int, help="torch intra-op threads.")
@click.option("--max-dropped-steps", type=int, help="Stop after this many consecutive non-finite steps (default 5).")
@click.option("--commit-every", type=int, help="Make the run durable every N steps (default 10; 1: every step).")
@click.option("--commit-interval", help="Also commit when this much time has passed, e.g. 10m, 90s.")
@click.option("--resume", is_flag=True, default=None, help="Continue the run in OUT from its last committed step.")
@click.option("--lora-rank", type=int, help="Also train LoRA adapters of this rank (AdamW, in memory) beside the fused update.")
@click.option("--lora-alpha", type=float, help="Adapter scaling alpha / rank (default 2 x rank).")
@click.option("--lora-dropout", type=float)
@click.option("--lora-lr", type=float, help="The adapters' AdamW learning rate (default 1e-4; follows --schedule).")
@click.option("--lora-targets", help="Comma-separated module names to adapt (default: peft's for the model type).")
@click.option("--lora-only/--no-lora-only", default=None, help="Freeze the base weights: train only the adapters.")
@click.option("--lora-export", type=click.Choice(["merged", "separate"]),
              help="Export W + BA (default), or the trained base model plus OUT/model/adapter.")
@click.option("--parallel", type=click.Choice(["replicate", "shard"]),
              help="Under torchrun: replicate (every rank holds the model, gradients averaged); "
                   "--batch-size is per rank.")
def train_command(config_file: str | None, **flags: object) -> None:
    """Fine-tune every parameter with fused LOMO updates, streaming weights within the budget."""
    from ..trainer import train

    layers = [load_yaml(config_file)] if config_file else []
    cfg = merge(*layers, flags)
    result = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # one line from a run of several ranks
        click.echo(f"trained {result.steps} steps; model written to {result.model_dir}")

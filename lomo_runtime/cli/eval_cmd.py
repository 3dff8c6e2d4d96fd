"""`lomo-run eval --model DIR --data FILE [--json]`: multiple-choice accuracy and held-out loss.

Lines with `"choices"` are scored as multiple choice (accuracy, and the loss on
their completions, from the same forward pass); a file without any is scored
for loss alone (mean per label token, one example per row). The model is
loaded whole with transformers, or, given `--weights-budget`, streamed unit by
unit through a `Runtime` over a temporary working store, so a model larger
than memory can be evaluated.
"""
from __future__ import annotations

import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from . import cli
from ..errors import UserError


def _examples_have_choices(path: str) -> bool:
    with open(path, encoding="utf-8-sig", errors="replace") as lines:
        return any('"choices"' in line for line in lines)


@cli.command("eval")
@click.option("--model", "model_dir", required=True, help="Model directory (config.json, safetensors, tokenizer).")
@click.option("--data", required=True, help="JSONL: prompt/completion lines, with \"choices\" for multiple choice.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Rows per forward pass.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Row length cap for loss-only files.")
@click.option("--limit", type=int, help="Evaluate only the first N examples.")
@click.option("--weights-budget", help="Stream the weights under this cap (e.g. 200MiB) instead of loading them whole.")
@click.option("--threads", type=int, help="torch intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(model_dir: str, data: str, batch_size: int, seq_len: int, limit: int | None,
                 weights_budget: str | None, threads: int | None, as_json: bool) -> None:
    """Accuracy over the choices and held-out loss of MODEL on DATA."""
    import torch

    from ..data import load_examples, load_tokenizer
    from ..evaluation import heldout_loss, load_choice_examples, score_choices

    if threads:
        torch.set_num_threads(threads)
    if batch_size < 1 or (limit is not None and limit < 1):
        raise UserError("--batch-size and --limit must be positive")
    # Data first: a bad line fails in a second, before the model is read.
    choices = load_choice_examples(data)[:limit] if _examples_have_choices(data) else None
    plain = load_examples(data)[:limit] if choices is None else None
    tokenizer = load_tokenizer(model_dir)
    started = time.perf_counter()
    result: dict[str, Any] = {"model": model_dir, "data": data}
    with ExitStack() as stack:
        model = _open_model(model_dir, weights_budget, stack)
        if choices is not None:
            scored = score_choices(model, tokenizer, choices, batch_size)
            result.update(examples=len(choices), accuracy=scored.accuracy, loss=scored.loss,
                          predicted=_counts([ex.choices[p] for ex, p in zip(choices, scored.predictions)]))
        else:
            result.update(examples=len(plain), accuracy=None,
                          loss=heldout_loss(model, tokenizer, plain, seq_len, batch_size))
    result["seconds"] = round(time.perf_counter() - started, 2)
    if as_json:
        click.echo(json.dumps(result))
        return
    accuracy = "n/a" if result["accuracy"] is None else f"{result['accuracy']:.4f}"
    click.echo(f"{result['examples']} examples: accuracy {accuracy}, held-out loss {result['loss']:.4f} "
               f"({result['seconds']:.1f} s)")


def _open_model(model_dir: str, weights_budget: str | None, stack: ExitStack) -> Any:
    """A callable causal LM: the whole HF model, or a Runtime's streamed model under the budget."""
    import torch

    if weights_budget is None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from ..checkpoint import Checkpoint

        Checkpoint.open(model_dir)  # validate first, so bad input gets one clear line
        hf_logging.disable_progress_bar()
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    from ..runtime import Runtime

    scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="lomo-eval-"))
    rt = stack.enter_context(Runtime(model_dir, work_dir=Path(scratch) / "store", weights_budget=weights_budget))
    return rt.model


def _counts(values: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts

"""Evaluation: multiple-choice accuracy and held-out loss, for any causal LM.

Both functions take a *model callable*: anything called like a Hugging Face
causal LM, `model(input_ids=..., labels=..., logits_to_keep=...)`, returning an
object with `.logits` (and `.loss` when labels are given). A `Runtime`'s
`rt.model` is one (weights stream unit by unit; under `torch.no_grad()` no
backward state is kept), and so is a plain `AutoModelForCausalLM`, so the
benchmark's in-memory baselines are measured by exactly the same code.

Multiple choice, as the LOMO paper evaluates SuperGLUE: each eval line is
`{"prompt": str, "completion": str, "choices": [str, ...]}` with the completion
one of the choices. Each choice is scored by the summed log-probability of its
tokens given the prompt, log P(choice | prompt); the prediction is the
highest-scoring choice. The sum (not the per-token mean) is the model's
probability of the whole answer, which is what fine-tuning on the completion
raises; the mean would favour a long choice whose later tokens are easy
continuations of its first. When all choices have the same number of tokens
(the demo's "positive"/"negative" are one token each) the two rank alike.
EOS is not scored: it says where an answer stops, not which answer it is.

Tokenisation matches training exactly (`data.tokenize_examples`: prompt with
special tokens, then the completion on its own), so the token boundary the
model was trained on is the one it is scored on.

Invariants:
- One forward gives both figures: an example's first row is its prompt,
  answer and EOS, which yields the held-out loss (answer tokens and EOS,
  exactly the training labels) and the answer's score; a choice whose input
  is a prefix of that row (every single-token choice is) reads the same row,
  so a single-token task costs one row per example, whatever the choices.
- Rows are right-padded; in a causal LM no real position attends to a later
  pad, so no attention mask is needed and scores do not depend on the batch.
- Only the logits at the positions that predict choice tokens are computed
  (`logits_to_keep`), so the vocabulary projection (49152 x 576 for SmolLM2,
  about a fifth of a 135M model's forward FLOPs) runs on a few positions.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .data import Example, IGNORE_INDEX, load_examples, pad_each, pad_id_of, tokenize_examples, tokens_in
from .errors import UserError

ModelCallable = Callable[..., Any]


@dataclass(frozen=True)
class ChoiceExample:
    """One multiple-choice question: the prompt, the right completion, and every candidate."""

    prompt: str
    completion: str
    choices: tuple[str, ...]
    source: str = ""

    @property
    def answer(self) -> int:
        return self.choices.index(self.completion)


@dataclass
class ChoiceResult:
    """Per-example outcome of `score_choices`."""

    scores: list[list[float]]      # [example][choice] summed log-probability
    predictions: list[int]
    answers: list[int]
    loss: float                    # mean NLL per answer token (answer + EOS, as trained): the held-out loss

    @property
    def accuracy(self) -> float:
        if not self.answers:
            return math.nan
        return sum(p == a for p, a in zip(self.predictions, self.answers)) / len(self.answers)


# --------------------------------------------------------------------------- reading


def load_choice_examples(path: str | os.PathLike[str]) -> list[ChoiceExample]:
    """Read the lines of a JSONL file that carry `"choices"`; raise `UserError` naming file:line on bad ones.

    Lines without `choices` are skipped (a file may mix plain training lines
    and multiple-choice eval lines); a file with none at all is an error.
    """
    path = Path(path)
    load_examples(path)  # the common checks: existence, UTF-8, JSON, prompt/completion shape
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "choices" not in record:
            continue
        where = f"{path}:{number}"
        choices = record["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UserError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
        if len(set(choices)) != len(choices):
            raise UserError(f"{where}: \"choices\" has duplicates")
        if "prompt" not in record or record.get("completion") not in choices:
            raise UserError(f"{where}: a multiple-choice line needs a \"prompt\" and a \"completion\" that is one of its choices")
        examples.append(ChoiceExample(record["prompt"], record["completion"], tuple(choices), where))
    if not examples:
        raise UserError(f"{path}: no multiple-choice lines (JSONL with \"prompt\", \"completion\" and \"choices\")")
    return examples


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class _Target:
    """Tokens to score in one row: the logit at `positions[i]` predicts `tokens[i]`."""

    example: int
    choice: int                     # index into the example's choices; -1 for the answer+EOS loss target
    row: int
    positions: tuple[int, ...]
    tokens: tuple[int, ...]


def _plan_rows(examples: list[ChoiceExample], tokenizer: Any) -> tuple[list[tuple[int, ...]], list[_Target]]:
    """Input rows and what to read from them.

    Per example, the first row is the prompt + answer + EOS (minus the last
    token): it carries the held-out loss target (answer tokens and EOS, as in
    training) and the answer's choice score. A choice whose input is a prefix
    of a row already planned for the example reuses that row, since in a
    causal LM the logit at position p depends only on tokens 0..p; with
    single-token choices every choice reads the last prompt position of the
    first row, so an example costs one row.
    """
    rows: list[tuple[int, ...]] = []
    targets: list[_Target] = []
    for e, example in enumerate(examples):
        answer = tokenize_examples([Example(example.prompt, example.completion, example.source)], tokenizer)[0]
        start = _first_label(answer.labels, example.source)
        own = [len(rows)]
        rows.append(tuple(answer.input_ids[:-1]))
        targets.append(_Target(e, -1, own[0], tuple(range(start - 1, len(answer.input_ids) - 1)),
                               tuple(answer.input_ids[start:])))
        pairs = [Example(example.prompt, choice, example.source) for choice in example.choices]
        for c, tokenized in enumerate(tokenize_examples(pairs, tokenizer, add_eos=False)):
            start = _first_label(tokenized.labels, example.source)
            needed = tuple(tokenized.input_ids[:-1])
            row = next((r for r in own if rows[r][: len(needed)] == needed), None)
            if row is None:
                row = len(rows)
                own.append(row)
                rows.append(needed)
            targets.append(_Target(e, c, row, tuple(range(start - 1, len(needed))),
                                   tuple(tokenized.input_ids[start:])))
    return rows, targets


def _first_label(labels: list[int], source: str) -> int:
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    if start == 0:
        raise UserError(f"{source}: the prompt tokenizes to no tokens; nothing to condition the choices on")
    return start


def score_choices(model: ModelCallable, tokenizer: Any, examples: list[ChoiceExample], batch_size: int = 8) -> ChoiceResult:
    """Score every choice of every example (summed log-probability) and the answer's held-out loss.

    `batch_size` is rows per forward. One pass gives both the accuracy and the
    loss (mean negative log-likelihood per answer token, EOS included).
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    rows, targets = _plan_rows(examples, tokenizer)
    by_row: dict[int, list[_Target]] = {}
    for target in targets:
        by_row.setdefault(target.row, []).append(target)
    scores = [[0.0] * len(ex.choices) for ex in examples]
    nll, nll_tokens = 0.0, 0
    pad = pad_id_of(tokenizer)
    # Longest rows first: similar lengths share a batch, so little padding is computed.
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    with torch.no_grad():
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            width = len(rows[batch[0]])
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            for b, r in enumerate(batch):
                ids[b, : len(rows[r])] = torch.tensor(rows[r], dtype=torch.long)
            earliest = min(t.positions[0] for r in batch for t in by_row[r])
            # Only the logits at positions [earliest, width) are computed.
            logits = model(input_ids=ids, logits_to_keep=width - earliest).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for b, r in enumerate(batch):
                for t in by_row[r]:
                    picked = logprobs[b, torch.tensor(t.positions) - earliest, torch.tensor(t.tokens)]
                    if t.choice < 0:
                        nll -= float(picked.sum())
                        nll_tokens += len(t.tokens)
                    else:
                        scores[t.example][t.choice] = float(picked.sum())
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    return ChoiceResult(scores, predictions, [ex.answer for ex in examples], nll / max(nll_tokens, 1))


def evaluate_choices(model: ModelCallable, tokenizer: Any, examples: list[ChoiceExample], batch_size: int = 8) -> float:
    """Multiple-choice accuracy of `model` on `examples` (fraction whose argmax choice is the completion)."""
    return score_choices(model, tokenizer, examples, batch_size).accuracy


# --------------------------------------------------------------------------- loss


def heldout_loss(
    model: ModelCallable, tokenizer: Any, examples: Iterable[Example], seq_len: int, batch_size: int = 8
) -> float:
    """Mean loss per label token over `examples`, one example per row (completion tokens and EOS, as trained).

    Examples are not packed, so each is scored without its neighbours, as at
    inference. Rows longer than `seq_len` are cut at the right.
    """
    rows = pad_each(tokenize_examples(list(examples), tokenizer), seq_len, pad_id=pad_id_of(tokenizer))
    if not rows:
        raise UserError("no held-out examples with completion tokens")
    total, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(rows), batch_size):
            chunk = rows[first:first + batch_size]
            ids = torch.stack([r.input_ids for r in chunk])
            labels = torch.stack([r.labels for r in chunk])
            # Trim the common right padding: it costs compute and changes nothing.
            width = int((labels != IGNORE_INDEX).nonzero()[:, 1].max()) + 1
            ids, labels = ids[:, :width], labels[:, :width]
            n = tokens_in((ids, labels))
            if n == 0:
                continue
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count

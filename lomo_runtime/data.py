"""Training data: read examples, tokenize with the model's tokenizer, pack, batch.

The pipeline, each stage a plain function or small object:

    load_examples(path)        -> list[Example]            (text or prompt/completion)
    split_holdout(ex, f, seed) -> (train, eval)            (by example, before tokenizing)
    tokenize_examples(ex, tok) -> list[TokenizedExample]   (labels -100 on prompt tokens)
    pack(tok_ex, seq_len)      -> list[Sequence]           (fixed-length blocks, for training)
    pad_each(tok_ex, seq_len)  -> list[Sequence]           (one example per row, for eval)
    Batches(seqs, B, seed)     -> (input_ids[B, T], labels[B, T]), resumable

Invariants:
- Labels are unshifted: `labels[t]` is the target *at* position t, the same
  position as `input_ids[t]`. Hugging Face causal-LM losses shift internally
  (logits[..., :-1] against labels[..., 1:]), so shifting here would be wrong.
- `labels[t]` is either `input_ids[t]` or -100 (ignored): -100 on prompt
  tokens and on padding, never anything else. Packing and padding keep the two
  lists aligned token for token.
- Every bad input raises `UserError` naming the file and the 1-based line
  (and, for undecodable bytes, the byte offset), so the CLI prints one line.
- `Batches` is a pure function of (sequences, batch size, seed, position):
  `state_dict()` records the position, and a run resumed from it sees exactly
  the batches the uninterrupted run would have seen. The state also carries a
  fingerprint of the data so resuming against different data is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value the HF / torch cross-entropy ignores."""

# Files named like this are read as JSON Lines; `.txt` as plain text; anything
# else is sniffed from its first non-blank line (JSONL if it starts with "{").
_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_TEXT_SUFFIXES = {".txt", ".text", ".md"}

# Any of these makes a directory loadable by AutoTokenizer without a hub.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model",
)


@dataclass(frozen=True)
class Example:
    """One training example. The loss covers `completion` only.

    A plain-text example (a `{"text": ...}` line or a document of a text file)
    has an empty `prompt`, so the loss covers all of it.
    """

    prompt: str
    completion: str
    source: str = ""
    """Where it came from, "file:line", for messages."""

    @property
    def text(self) -> str:
        """The whole example as the model sees it."""
        return self.prompt + self.completion


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example with aligned, unshifted labels (-100 on prompt tokens)."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")


@dataclass(frozen=True)
class Sequence:
    """One row of a batch: `input_ids` and `labels`, both int64 tensors of shape [seq_len].

    Tensors rather than lists: a Python int costs about 36 bytes in a list,
    an int64 element 8, and a packed corpus is held for the whole run.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor


# --------------------------------------------------------------------------- reading


def load_examples(path: str | os.PathLike[str]) -> list[Example]:
    """Read examples from a JSONL file or a plain text file.

    JSONL lines are `{"text": str}` or `{"prompt": str, "completion": str}`;
    other keys are ignored and blank lines skipped. A plain text file is split
    into documents on blank lines. Raises `UserError` naming the file and line
    for a missing or empty file, invalid UTF-8 or JSON, and malformed records.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: data file not found")
    if not path.is_file():
        raise UserError(f"{path}: data path is not a file")
    raw = path.read_bytes()
    text = _decode(raw, path)
    if not text.strip():
        raise UserError(f"{path}: data file is empty")
    # Split on "\n" only (str.splitlines also breaks on \x0c, \u2028, ...), so
    # line numbers agree with an editor's and with the byte offsets above.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if _is_jsonl(path, lines):
        examples = _parse_jsonl(lines, path)
    else:
        examples = _parse_text(lines, path)
    if not examples:
        raise UserError(f"{path}: data file is empty (no examples)")
    return examples


def _decode(raw: bytes, path: Path) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        raw = raw[3:]
        offset_shift = 3
    else:
        offset_shift = 0
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte offset "
            f"{err.start + offset_shift}, column {err.start - line_start + 1}); save the file as UTF-8"
        ) from None


def _is_jsonl(path: Path, lines: list[str]) -> bool:
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return True
    if suffix in _TEXT_SUFFIXES:
        return False
    first = next((line for line in lines if line.strip()), "")
    return first.lstrip().startswith("{")


def _parse_jsonl(lines: list[str], path: Path) -> list[Example]:
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
        examples.append(_example_from_record(record, where))
    return examples


def _example_from_record(record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    has_text = "text" in record
    has_pair = "prompt" in record or "completion" in record
    if has_text and has_pair:
        raise UserError(f"{where}: has both \"text\" and \"prompt\"/\"completion\"; use one form per line")
    if has_text:
        text = record["text"]
        if not isinstance(text, str):
            raise UserError(f"{where}: \"text\" must be a string, got {_json_type(text)}")
        if not text.strip():
            raise UserError(f"{where}: \"text\" is empty")
        return Example(prompt="", completion=text, source=where)
    if not has_pair:
        raise UserError(f"{where}: expected \"text\" or \"prompt\" and \"completion\"; found keys {sorted(record)}")
    for key in ("prompt", "completion"):
        if key not in record:
            raise UserError(f"{where}: has {'completion' if key == 'prompt' else 'prompt'} but no \"{key}\"")
        if not isinstance(record[key], str):
            raise UserError(f"{where}: \"{key}\" must be a string, got {_json_type(record[key])}")
    if not record["completion"].strip():
        # Nothing to learn from: every label would be -100.
        raise UserError(f"{where}: \"completion\" is empty")
    return Example(prompt=record["prompt"], completion=record["completion"], source=where)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _parse_text(lines: list[str], path: Path) -> list[Example]:
    examples: list[Example] = []
    block: list[str] = []
    start = 0
    for number, line in enumerate([*lines, ""], start=1):  # the sentinel closes the last document
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            examples.append(Example(prompt="", completion="\n".join(block), source=f"{path}:{start}"))
            block = []
    return examples


# --------------------------------------------------------------------------- splitting


def split_holdout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split examples into (train, eval), `fraction` of them (rounded, at least one) held out.

    The choice is a seeded permutation (torch.Generator), so it is the same on
    every run with the same seed; each part keeps the file's order. A fraction
    of 0 holds out nothing.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise UserError(f"eval fraction: expected a number in [0, 1), got {fraction!r}")
    if fraction == 0.0:
        return list(examples), []
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise UserError(
            f"eval fraction: holding out {fraction} of {len(examples)} examples leaves none to train on"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    held = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evaluation = [ex for i, ex in enumerate(examples) if i in held]
    return train, evaluation


# --------------------------------------------------------------------------- tokenizing


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Any:
    """Load the model's own tokenizer from `model_dir` (offline; no hub).

    Raises `UserError` when the directory holds no tokenizer files or they
    cannot be loaded.
    """
    from transformers import AutoTokenizer  # heavy import, only when tokenizing

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model directory not found")
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(
            f"{model_dir}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)}); "
            "copy the tokenizer from the model you fine-tune into this directory"
        )
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as err:  # transformers raises many types; the user sees one message
        raise UserError(f"{model_dir}: cannot load the tokenizer: {err}") from err


def tokenize_examples(examples: list[Example], tokenizer: Any, add_eos: bool = True) -> list[TokenizedExample]:
    """Tokenize examples; labels equal input_ids except -100 on prompt tokens.

    The prompt and the completion are tokenized separately and concatenated:
    at generation time the prompt is tokenized alone and the model continues
    it, so this is the token boundary the model must learn; tokenizing the
    joined string could merge a token across the boundary and blur the mask.
    The tokenizer's special tokens (e.g. Llama's BOS) are added to the start of
    each example; with `add_eos` the tokenizer's EOS ends each example and is
    a label (the model learns to stop), and it separates examples when packed.
    """
    eos_id = tokenizer.eos_token_id
    if add_eos and eos_id is None:
        raise UserError("the model's tokenizer has no EOS token; tokenize with add_eos=False")
    result = []
    for example in examples:
        if example.prompt:
            prompt_ids = _encode(tokenizer, example.prompt, special=True)
            completion_ids = _encode(tokenizer, example.completion, special=False)
        else:
            prompt_ids = []
            completion_ids = _encode(tokenizer, example.completion, special=True)
        if add_eos and (not completion_ids or completion_ids[-1] != eos_id):
            completion_ids.append(eos_id)
        if not completion_ids:
            raise UserError(f"{example.source or 'example'}: completion tokenizes to no tokens")
        result.append(
            TokenizedExample(
                input_ids=prompt_ids + completion_ids,
                labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
            )
        )
    return result


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def pad_id_of(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else EOS, else 0.

    The value hardly matters: padded positions carry label -100 and, with
    right padding in a causal LM, no real position attends to them.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


# --------------------------------------------------------------------------- packing


def pack(
    tokenized: list[TokenizedExample], seq_len: int, *, pad_id: int = 0, drop_tail: bool = True
) -> list[Sequence]:
    """Concatenate examples and cut the stream into blocks of exactly `seq_len` tokens.

    Examples are joined in order; the EOS that `tokenize_examples(add_eos=True)`
    puts at the end of each example is the separator (none is added here, so
    there is never a doubled EOS). The last partial block is dropped, or with
    `drop_tail=False` right-padded with `pad_id` and label -100. Raises
    `UserError` when the data does not fill a single block.
    """
    _check_seq_len(seq_len)
    ids = torch.tensor([t for ex in tokenized for t in ex.input_ids], dtype=torch.long)
    labels = torch.tensor([t for ex in tokenized for t in ex.labels], dtype=torch.long)
    total = ids.numel()
    n_full, tail = divmod(total, seq_len)
    if tail and not drop_tail:
        pad = seq_len - tail
        ids = torch.cat([ids, torch.full((pad,), pad_id, dtype=torch.long)])
        labels = torch.cat([labels, torch.full((pad,), IGNORE_INDEX, dtype=torch.long)])
        n_full += 1
    if n_full == 0:
        raise UserError(
            f"the data has {total} tokens, fewer than one sequence of seq_len={seq_len}; "
            "use a smaller sequence length or more data"
        )
    ids, labels = ids[: n_full * seq_len], labels[: n_full * seq_len]
    # .clone() per row so each Sequence owns its storage rather than a view of the whole corpus.
    return [
        Sequence(input_ids=row_ids.clone(), labels=row_labels.clone())
        for row_ids, row_labels in zip(ids.view(n_full, seq_len), labels.view(n_full, seq_len))
    ]


def pad_each(tokenized: list[TokenizedExample], seq_len: int, *, pad_id: int = 0) -> list[Sequence]:
    """One example per row, right-padded to `seq_len` (unpacked; for prompt/completion eval).

    Pad positions get label -100; a causal LM needs no attention mask for right
    padding since real tokens never attend forward. An example longer than
    `seq_len` is cut at the right (keeping its prompt, as generation would see
    it); one left with no label tokens is dropped, with a warning.
    """
    _check_seq_len(seq_len)
    rows = []
    dropped = 0
    for example in tokenized:
        ids, labels = example.input_ids[:seq_len], example.labels[:seq_len]
        # Position 0's label is never predicted (the loss shifts), so count from 1.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        pad = seq_len - len(ids)
        rows.append(
            Sequence(
                input_ids=torch.tensor(ids + [pad_id] * pad, dtype=torch.long),
                labels=torch.tensor(labels + [IGNORE_INDEX] * pad, dtype=torch.long),
            )
        )
    if dropped:
        log.warning("%d of %d examples have no completion tokens within seq_len=%d; skipped",
                    dropped, len(tokenized), seq_len)
    return rows


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        # One token has nothing to predict: the loss compares position t with t+1.
        raise UserError(f"seq_len: expected an integer >= 2, got {seq_len!r}")


# --------------------------------------------------------------------------- batching


def tokens_in(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Label tokens in a batch that the loss is taken over.

    Counts labels != -100 from position 1 on: HF's causal-LM loss compares
    logits[..., :-1] with labels[..., 1:], so a row's first label is never
    used. This is the count the loss is averaged over (`num_items_in_batch`).
    """
    _, labels = batch
    return int((labels[..., 1:] != IGNORE_INDEX).sum().item())


class Batches:
    """Batches of `(input_ids, labels)`, LongTensor[B, T], in a seeded order, epoch after epoch.

    The stream is the concatenation of epochs; epoch e visits every sequence
    once in a permutation drawn from a `torch.Generator` seeded by (seed, e),
    so any epoch's order is computed directly, without replaying earlier ones.
    Batches are consecutive slices of the stream and may straddle an epoch
    boundary, so every batch is full and no sequence is skipped. With
    `epochs=N` the stream ends after N epochs (the last batch may be short);
    with `epochs=None` it never ends.
    """

    def __init__(
        self,
        sequences: list[Sequence],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
    ) -> None:
        if not sequences:
            raise UserError("no training sequences: the data is empty after packing")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if epochs is not None and epochs < 1:
            raise UserError(f"epochs: expected an integer >= 1, got {epochs!r}")
        self.sequences = sequences
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epochs = epochs
        self.epoch = 0
        self.index = 0
        """Position of the next sequence: `index` within epoch `epoch`'s order."""
        self._order_epoch = -1
        self._order: list[int] = []
        self._fingerprint: str | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked: list[int] = []
        while len(picked) < self.batch_size:
            if self.epochs is not None and self.epoch >= self.epochs:
                break
            order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(picked), len(order) - self.index)
            picked.extend(order[self.index : self.index + take])
            self.index += take
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
        if not picked:
            raise StopIteration
        input_ids = torch.stack([self.sequences[i].input_ids for i in picked])
        labels = torch.stack([self.sequences[i].labels for i in picked])
        return input_ids, labels

    def __len__(self) -> int:
        """Batches left in a finite stream (raises TypeError for an endless one)."""
        if self.epochs is None:
            raise TypeError("an endless Batches stream has no length")
        left = (self.epochs - self.epoch) * len(self.sequences) - self.index
        return -(-max(0, left) // self.batch_size)

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            n = len(self.sequences)
            if self.shuffle:
                generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
                self._order = torch.randperm(n, generator=generator).tolist()
            else:
                self._order = list(range(n))
            self._order_epoch = epoch
        return self._order

    def fingerprint(self) -> str:
        """A hash of the sequences' tokens and labels (computed once), to detect changed data on resume."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for seq in self.sequences:
                digest.update(seq.input_ids.numpy().tobytes())
                digest.update(seq.labels.numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """The stream position (epoch, index) and what it is a position in; JSON-serialisable."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "num_sequences": len(self.sequences),
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. Raises `UserError` when the data or settings differ."""
        for key, mine in (
            ("seed", self.seed), ("shuffle", self.shuffle), ("batch_size", self.batch_size),
            ("num_sequences", len(self.sequences)), ("fingerprint", self.fingerprint()),
        ):
            if key in state and state[key] != mine:
                raise UserError(
                    f"cannot resume the data stream: {key} was {state[key]!r} in the saved run, "
                    f"now {mine!r}; resume with the same data, seed, batch size and sequence length"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < len(self.sequences):
            raise UserError(f"cannot resume the data stream: position (epoch {epoch}, index {index}) is out of range")
        self.epoch, self.index = epoch, index


def _epoch_seed(seed: int, epoch: int) -> int:
    # Hash (seed, epoch) rather than add them, so seed 0's epoch 1 is not seed 1's epoch 0.
    digest = hashlib.sha256(f"lomo-run/data/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)

"""Data pipeline: reading (every bad-input case), tokenizing, packing, batching, resuming."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lomo_runtime.data import (
    IGNORE_INDEX,
    Batches,
    Example,
    TokenizedExample,
    load_examples,
    load_tokenizer,
    pack,
    pad_each,
    pad_id_of,
    split_holdout,
    tokenize_examples,
    tokens_in,
)
from lomo_runtime.errors import UserError

WORDS = "the cat sat on a mat dog ran far away question answer is what why yes no".split()


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def _jsonl(path: Path, records: list[dict]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a tiny word-level tokenizer that adds BOS, saved the HF way."""
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like Llama's: BOS before every encoded text when special tokens are added.
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    directory = tmp_path_factory.mktemp("model")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(text.split())


# --------------------------------------------------------------------------- bad input, one case each


def _error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        load_examples(path)
    return str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    assert f"{tmp_path / 'nope.jsonl'}: data file not found" in _error(tmp_path / "nope.jsonl")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert f"{tmp_path}: data path is not a file" in _error(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    assert f"{tmp_path / 'e.jsonl'}: data file is empty" in _error(_write(tmp_path / "e.jsonl", ""))


def test_whitespace_only_file(tmp_path: Path) -> None:
    assert f"{tmp_path / 'e.txt'}: data file is empty" in _error(_write(tmp_path / "e.txt", "\n  \n\t\n"))


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": "b"\n')
    assert f"{path}:3: invalid JSON" in _error(path)


def test_text_not_a_string(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": 5}])
    assert f"{path}:2: \"text\" must be a string, got a number" in _error(path)


def test_prompt_not_a_string(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": ["q"], "completion": "a"}])
    assert f"{path}:1: \"prompt\" must be a string, got an array" in _error(path)


def test_completion_not_a_string(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": None}])
    assert f"{path}:1: \"completion\" must be a string, got null" in _error(path)


def test_neither_text_nor_prompt_completion(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"body": "x"}])
    assert f"{path}:2: expected \"text\" or \"prompt\" and \"completion\"" in _error(path)


def test_prompt_without_completion(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q"}])
    assert f"{path}:1: has prompt but no \"completion\"" in _error(path)


def test_completion_without_prompt(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"completion": "a"}])
    assert f"{path}:1: has completion but no \"prompt\"" in _error(path)


def test_empty_completion(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": " "}])
    assert f"{path}:2: \"completion\" is empty" in _error(path)


def test_empty_text(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": ""}])
    assert f"{path}:1: \"text\" is empty" in _error(path)


def test_both_forms_on_one_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "t", "prompt": "q", "completion": "a"}])
    assert f"{path}:1: has both" in _error(path)


def test_line_not_an_object(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a"}\n["a", "b"]\n')
    assert f"{path}:2: expected a JSON object, got list" in _error(path)


def test_non_utf8_names_line_and_byte_offset(tmp_path: Path) -> None:
    # Line 1 is 14 bytes + newline; the bad byte is the 11th byte of line 2, offset 15 + 10 = 25.
    path = _write(tmp_path / "d.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n')
    assert f"{path}:2: not valid UTF-8 (byte 0xff at byte offset 25, column 11)" in _error(path)


def test_non_utf8_in_text_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.txt", b"first doc\n\nsecond \xc3\x28 doc\n")
    assert f"{path}:3: not valid UTF-8 (byte 0xc3 at byte offset 18" in _error(path)


def test_model_dir_without_tokenizer(tmp_path: Path) -> None:
    _write(tmp_path / "config.json", "{}")
    with pytest.raises(UserError) as info:
        load_tokenizer(tmp_path)
    assert f"{tmp_path}: no tokenizer files" in str(info.value)


def test_model_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        load_tokenizer(tmp_path / "absent")
    assert f"{tmp_path / 'absent'}: model directory not found" in str(info.value)


# --------------------------------------------------------------------------- reading good input


def test_jsonl_text_and_pairs(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.jsonl",
        '{"text": "the cat", "id": 7}\n\n{"prompt": "question", "completion": " answer"}\n',
    )
    assert load_examples(path) == [
        Example(prompt="", completion="the cat", source=f"{path}:1"),
        Example(prompt="question", completion=" answer", source=f"{path}:3"),
    ]


def test_text_file_split_on_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.txt", "\nthe cat\nsat\n\n  \n\na dog\r\nran\n")
    examples = load_examples(path)
    assert [(e.text, e.source) for e in examples] == [("the cat\nsat", f"{path}:2"), ("a dog\nran", f"{path}:7")]


def test_unknown_suffix_is_sniffed(tmp_path: Path) -> None:
    assert load_examples(_write(tmp_path / "a.data", '{"text": "x"}\n'))[0].text == "x"
    assert load_examples(_write(tmp_path / "b.data", "plain words\n"))[0].text == "plain words"


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    assert load_examples(_write(tmp_path / "d.jsonl", b'\xef\xbb\xbf{"text": "x"}\n'))[0].text == "x"


# --------------------------------------------------------------------------- tokenizing


def test_load_tokenizer(model_dir: Path) -> None:
    assert load_tokenizer(model_dir).eos_token == "</s>"


def test_tokenize_masks_prompt_and_appends_eos(tokenizer) -> None:
    [tokenized] = tokenize_examples([Example(prompt="what is the cat", completion="a dog")], tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = [bos] + _ids(tokenizer, "what is the cat")  # BOS only at the start of the example
    completion = _ids(tokenizer, "a dog") + [eos]
    assert tokenized.input_ids == prompt + completion
    assert tokenized.labels == [IGNORE_INDEX] * len(prompt) + completion


def test_tokenize_text_example_labels_everything(tokenizer) -> None:
    [tokenized] = tokenize_examples([Example(prompt="", completion="the cat sat")], tokenizer)
    assert tokenized.labels == tokenized.input_ids
    assert tokenized.input_ids[0] == tokenizer.bos_token_id and tokenized.input_ids[-1] == tokenizer.eos_token_id


def test_tokenize_without_eos(tokenizer) -> None:
    [tokenized] = tokenize_examples([Example(prompt="", completion="the cat")], tokenizer, add_eos=False)
    assert tokenized.input_ids == [tokenizer.bos_token_id] + _ids(tokenizer, "the cat")


def test_pad_id_prefers_pad_token(tokenizer) -> None:
    assert pad_id_of(tokenizer) == tokenizer.pad_token_id


# --------------------------------------------------------------------------- packing


def _tok(n: int, start: int, prompt: int = 0) -> TokenizedExample:
    ids = list(range(start, start + n))
    return TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:])


def test_pack_cuts_exact_blocks_and_keeps_labels_aligned() -> None:
    examples = [_tok(5, 100, prompt=2), _tok(7, 200), _tok(4, 300, prompt=3)]  # 16 tokens
    sequences = pack(examples, seq_len=5)
    assert len(sequences) == 3  # the 1-token tail is dropped
    ids = torch.cat([s.input_ids for s in sequences]).tolist()
    labels = torch.cat([s.labels for s in sequences]).tolist()
    stream_ids = [t for e in examples for t in e.input_ids]
    stream_labels = [t for e in examples for t in e.labels]
    assert ids == stream_ids[:15] and labels == stream_labels[:15]
    assert all(s.input_ids.shape == (5,) and s.input_ids.dtype == torch.long for s in sequences)


def test_pack_pads_tail_when_asked() -> None:
    sequences = pack([_tok(7, 10)], seq_len=4, pad_id=0, drop_tail=False)
    assert sequences[-1].input_ids.tolist() == [14, 15, 16, 0]
    assert sequences[-1].labels.tolist() == [14, 15, 16, IGNORE_INDEX]


def test_pack_refuses_less_than_one_block() -> None:
    with pytest.raises(UserError, match="fewer than one sequence of seq_len=8"):
        pack([_tok(5, 10)], seq_len=8)


def test_pack_of_real_tokenizer_output_separates_with_single_eos(tokenizer) -> None:
    tokenized = tokenize_examples([Example("", "the cat"), Example("", "a dog")], tokenizer)
    [row] = pack(tokenized, seq_len=8)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    assert row.input_ids.tolist() == [bos, *_ids(tokenizer, "the cat"), eos, bos, *_ids(tokenizer, "a dog"), eos]


def test_pad_each_right_pads_and_drops_rows_without_completion() -> None:
    rows = pad_each([_tok(3, 10, prompt=1), _tok(9, 50, prompt=6)], seq_len=5, pad_id=0)
    assert len(rows) == 1  # the second keeps only prompt tokens within 5
    assert rows[0].input_ids.tolist() == [10, 11, 12, 0, 0]
    assert rows[0].labels.tolist() == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, IGNORE_INDEX]


def test_bad_seq_len() -> None:
    with pytest.raises(UserError, match="seq_len"):
        pack([_tok(5, 10)], seq_len=1)


# --------------------------------------------------------------------------- batching


def _sequences(n: int, seq_len: int = 4) -> list:
    return pack([_tok(n * seq_len, 0)], seq_len=seq_len)


def _first_ids(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    return (batch[0][:, 0] // 4).tolist()  # sequence i starts with token 4 * i


def test_batches_shape_and_epoch_permutations() -> None:
    batches = Batches(_sequences(6), batch_size=3, seed=1)
    seen = [_first_ids(next(batches)) for _ in range(4)]
    input_ids, labels = next(batches)
    assert input_ids.shape == labels.shape == (3, 4) and input_ids.dtype == torch.long
    assert sorted(seen[0] + seen[1]) == list(range(6)) and sorted(seen[2] + seen[3]) == list(range(6))
    assert seen[0] + seen[1] != seen[2] + seen[3]  # each epoch reshuffled


def test_batches_deterministic_per_seed() -> None:
    def run(seed: int) -> list[list[int]]:
        batches = Batches(_sequences(10), batch_size=4, seed=seed)
        return [_first_ids(next(batches)) for _ in range(6)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_batches_straddle_epochs_when_size_does_not_divide() -> None:
    batches = Batches(_sequences(5), batch_size=2, seed=0, shuffle=False)
    assert [_first_ids(next(batches)) for _ in range(3)] == [[0, 1], [2, 3], [4, 0]]


def test_resume_sees_the_same_batches() -> None:
    sequences = _sequences(7)
    uninterrupted = Batches(sequences, batch_size=3, seed=5)
    expected = [next(uninterrupted) for _ in range(9)]

    first = Batches(sequences, batch_size=3, seed=5)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # it is saved as JSON beside the store
    resumed = Batches(sequences, batch_size=3, seed=5)
    resumed.load_state_dict(state)
    for want in expected[4:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_resume_with_different_data_is_refused() -> None:
    state = Batches(_sequences(7), batch_size=3, seed=5).state_dict()
    other = Batches(pack([_tok(28, 1)], seq_len=4), batch_size=3, seed=5)
    with pytest.raises(UserError, match="fingerprint"):
        other.load_state_dict(state)


def test_finite_stream_ends_with_short_batch() -> None:
    batches = Batches(_sequences(5), batch_size=2, shuffle=False, epochs=1)
    assert len(batches) == 3
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]


def test_tokens_in_counts_labels_the_loss_uses() -> None:
    labels = torch.tensor([[5, 6, IGNORE_INDEX, 7], [IGNORE_INDEX, IGNORE_INDEX, 8, 9]])
    # Position 0 of each row is never a target after the shift: 2 + 2.
    assert tokens_in((labels.clamp(min=0), labels)) == 4


def test_tokens_in_matches_transformers_loss_normaliser() -> None:
    """The mean loss HF computes equals the summed token losses divided by tokens_in."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config).eval()
    tokenized = [_tok(6, 3, prompt=3), _tok(5, 20), _tok(9, 30, prompt=4)]
    batch = next(Batches(pack(tokenized, seq_len=10), batch_size=2, shuffle=False))
    with torch.no_grad():
        out = model(input_ids=batch[0], labels=batch[1])
        summed = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, 64), batch[1][:, 1:].reshape(-1), reduction="sum"
        )
    torch.testing.assert_close(out.loss, summed / tokens_in(batch), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- holdout


def _examples(n: int) -> list[Example]:
    return [Example("", f"doc {i}", source=f"f:{i}") for i in range(n)]


def test_split_holdout_is_deterministic_and_disjoint() -> None:
    examples = _examples(20)
    train, held = split_holdout(examples, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15
    assert sorted(train + held, key=examples.index) == examples
    assert train == [e for e in examples if e in train]  # file order kept
    assert split_holdout(examples, 0.25, seed=1) == (train, held)
    assert split_holdout(examples, 0.25, seed=2) != (train, held)


def test_split_holdout_zero_and_minimum() -> None:
    assert split_holdout(_examples(3), 0.0, seed=0) == (_examples(3), [])
    assert len(split_holdout(_examples(3), 0.01, seed=0)[1]) == 1


def test_split_holdout_bad_fraction() -> None:
    with pytest.raises(UserError, match="eval fraction"):
        split_holdout(_examples(3), 1.0, seed=0)


def test_split_holdout_leaves_nothing_to_train() -> None:
    with pytest.raises(UserError, match="leaves none to train on"):
        split_holdout(_examples(1), 0.5, seed=0)

"""Evaluation: multiple-choice scores and held-out loss against brute-force references, HF vs streamed, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model, save_char_tokenizer
from lomo_runtime import SGD, Runtime
from lomo_runtime.data import Example, load_tokenizer, tokenize_examples
from lomo_runtime.errors import UserError
from lomo_runtime.evaluation import ChoiceExample, heldout_loss, load_choice_examples, score_choices

REPO = Path(__file__).resolve().parents[1]

# Choices of different lengths (the char tokenizer makes one token per
# character), one a prefix of another, so the prefix-sharing path is exercised.
EXAMPLES = [
    ChoiceExample("the fox is ", "quick", ("quick", "slow", "qu")),
    ChoiceExample("a lazy dog ", "sleeps", ("runs", "sleeps")),
    ChoiceExample("seven wizards hex bright vixens and ", "jump", ("jump", "judge", "j")),
    ChoiceExample("x", "yes", ("no", "yes")),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_tiny_model(tmp_path_factory.mktemp("eval"), "llama", tied=True, sharded=True)
    save_char_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _reference_logprob(model, tokenizer, prompt: str, completion: str, add_eos: bool) -> tuple[float, int]:
    """Sum of log P(completion tokens [+ EOS] | prompt), one unbatched full forward: the definition."""
    tokenized = tokenize_examples([Example(prompt, completion)], tokenizer, add_eos=add_eos)[0]
    ids = torch.tensor([tokenized.input_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total, count = 0.0, 0
    for t, label in enumerate(tokenized.labels):
        if t > 0 and label != -100:  # position 0 has nothing before it to predict it
            total += float(logprobs[t - 1, label])
            count += 1
    return total, count


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_scores_and_loss_match_unbatched_reference(model_dir: Path, hf_model, batch_size: int) -> None:
    tokenizer = load_tokenizer(model_dir)
    result = score_choices(hf_model, tokenizer, EXAMPLES, batch_size=batch_size)
    nll, count = 0.0, 0
    for e, example in enumerate(EXAMPLES):
        for c, choice in enumerate(example.choices):
            expected, _ = _reference_logprob(hf_model, tokenizer, example.prompt, choice, add_eos=False)
            assert result.scores[e][c] == pytest.approx(expected, abs=1e-4)
        total, n = _reference_logprob(hf_model, tokenizer, example.prompt, example.completion, add_eos=True)
        nll, count = nll - total, count + n
    assert result.loss == pytest.approx(nll / count, abs=1e-5)
    assert result.predictions == [max(range(len(s)), key=s.__getitem__) for s in result.scores]
    assert result.answers == [0, 1, 0, 1]
    assert result.accuracy == sum(p == a for p, a in zip(result.predictions, result.answers)) / 4


def test_heldout_loss_matches_hf_loss_per_example(model_dir: Path, hf_model) -> None:
    tokenizer = load_tokenizer(model_dir)
    examples = [Example(ex.prompt, ex.completion) for ex in EXAMPLES] + [Example("", "plain text example")]
    nll, count = 0.0, 0
    for example in examples:
        total, n = _reference_logprob(hf_model, tokenizer, example.prompt, example.completion, add_eos=True)
        nll, count = nll - total, count + n
    assert heldout_loss(hf_model, tokenizer, examples, seq_len=60, batch_size=2) == pytest.approx(nll / count, abs=1e-5)


def test_streamed_model_scores_like_the_whole_model(model_dir: Path, hf_model, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    expected = score_choices(hf_model, tokenizer, EXAMPLES, batch_size=4)
    # A budget of about one block: every forward streams units through the store.
    with Runtime(model_dir, SGD(lr=0.1), work_dir=tmp_path / "store", weights_budget="70KB") as rt:
        got = score_choices(rt.model, tokenizer, EXAMPLES, batch_size=4)
        loss = heldout_loss(rt.model, tokenizer, [Example(e.prompt, e.completion) for e in EXAMPLES], 60, 4)
        assert rt.scheduler.stats.read_bytes > 0
        # Eval under no_grad leaves the runtime ready for a training step.
        ids = torch.tensor([tokenize_examples([Example("", "the fox")], tokenizer)[0].input_ids])
        assert not rt.backward(rt.model(input_ids=ids, labels=ids).loss).dropped
    for a, b in zip(got.scores, expected.scores):
        assert a == pytest.approx(b, abs=1e-4)
    assert got.loss == pytest.approx(expected.loss, abs=1e-5)
    assert loss == pytest.approx(expected.loss, abs=1e-5)


def test_load_choice_examples_skips_plain_lines_and_names_bad_ones(tmp_path: Path) -> None:
    data = tmp_path / "eval.jsonl"
    data.write_text(
        json.dumps({"text": "a plain line"}) + "\n"
        + json.dumps({"prompt": "p", "completion": " b", "choices": [" a", " b"]}) + "\n"
    )
    [example] = load_choice_examples(data)
    assert example.answer == 1 and example.source == f"{data}:2"
    for bad, message in [
        ({"prompt": "p", "completion": " c", "choices": [" a", " b"]}, "one of its choices"),
        ({"prompt": "p", "completion": " a", "choices": " a"}, "list of at least two"),
        ({"prompt": "p", "completion": " a", "choices": [" a", " a"]}, "duplicates"),
    ]:
        data.write_text(json.dumps(bad) + "\n")
        with pytest.raises(UserError, match=message) as err:
            load_choice_examples(data)
        assert f"{data}:1" in str(err.value)
    data.write_text(json.dumps({"prompt": "p", "completion": " a"}) + "\n")
    with pytest.raises(UserError, match="no multiple-choice lines"):
        load_choice_examples(data)


def _eval_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from lomo_runtime.cli import main; main()", "eval", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_eval_cli_json_whole_and_streamed(model_dir: Path, hf_model, tmp_path: Path) -> None:
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion, "choices": list(e.choices)}) + "\n"
                            for e in EXAMPLES))
    expected = score_choices(hf_model, load_tokenizer(model_dir), EXAMPLES, batch_size=4)
    for extra in ([], ["--weights-budget", "70KB"]):
        proc = _eval_cli("--model", str(model_dir), "--data", str(data), "--json", "--threads", "1", *extra)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["examples"] == 4
        assert result["accuracy"] == pytest.approx(expected.accuracy)
        assert result["loss"] == pytest.approx(expected.loss, abs=1e-5)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "the quick brown fox"}) + "\n")
    proc = _eval_cli("--model", str(model_dir), "--data", str(plain))
    assert proc.returncode == 0, proc.stderr
    assert "accuracy n/a, held-out loss" in proc.stdout


def test_eval_cli_bad_data_is_one_line_exit_2(model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": " c", "choices": [" a", " b"]}) + "\n")
    proc = _eval_cli("--model", str(model_dir), "--data", str(data))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and f"{data}:1" in proc.stderr

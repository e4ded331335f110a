"""Trainer data: JSONL validation with file:line errors, completion-only targets, shipped tasks."""

from __future__ import annotations

import datetime
import json
import random
import re
from pathlib import Path

import pytest

from server.trainer.base import load_tokenizer
from server.trainer.data import IGNORE, DataError, collate, load_jsonl
from server.trainer.tasks import TASKS, TOPIC_LABELS, task_splits, write_task


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    return load_tokenizer(tiny_llama_dir)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_reported_with_file_and_line(tmp_path: Path, tokenizer) -> None:
    good = json.dumps({"prompt": "Q: 1+1?\nA:", "completion": " 2"})
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    path = _write(tmp_path / "rows.jsonl", [
        good,                                                           # 1 ok
        '{"prompt": "x", "completion": ',                               # 2 invalid JSON
        json.dumps({"prompt": "only a prompt"}),                        # 3 missing completion
        json.dumps({"prompt": "p", "completion": "   "}),               # 4 empty completion
        json.dumps({"prompt": "word " * 200, "completion": " long"}),   # 5 over max length
        "",                                                             # 6 blank: skipped silently
        json.dumps(["a", "list"]),                                      # 7 not an object
        json.dumps({"prompt": 3, "completion": "x"}),                   # 8 wrong type
        chat,                                                           # 9 ok (chat)
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),  # 10 no assistant completion
    ])
    result = load_jsonl(path, tokenizer, max_length=64)
    assert len(result.examples) == 2
    assert [e.source for e in result.examples] == [f"{path}:1", f"{path}:9"]
    expected = {2: "invalid JSON", 3: "missing field 'completion'", 4: "empty completion", 5: "exceed --max-length 64",
                7: "expected a JSON object", 8: "'prompt' must be a string", 10: "at least two messages"}
    assert len(result.errors) == len(expected)
    for error, (line, words) in zip(result.errors, sorted(expected.items()), strict=True):
        assert error.startswith(f"{path}:{line}: "), error
        assert words in error, error


def test_file_without_valid_rows_is_refused(tmp_path: Path, tokenizer) -> None:
    path = _write(tmp_path / "bad.jsonl", ["not json", json.dumps({"completion": "x"})])
    with pytest.raises(DataError) as info:
        load_jsonl(path, tokenizer, max_length=64)
    message = str(info.value)
    assert "no valid rows" in message and f"{path}:1: invalid JSON" in message and f"{path}:2: missing field" in message
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="no valid rows"):
        load_jsonl(empty, tokenizer, max_length=64)
    with pytest.raises(DataError, match="cannot read"):
        load_jsonl(tmp_path / "missing.jsonl", tokenizer, max_length=64)


def test_targets_cover_completion_tokens_only(tmp_path: Path, tokenizer) -> None:
    rows = [{"prompt": "Sentence: " + " ".join(random.choices(["a", "bb", "ccc"], k=random.randint(1, 9))),
             "completion": " " + random.choice(["yes", "no way", "maybe later"])} for _ in range(6)]
    path = _write(tmp_path / "rows.jsonl", [json.dumps(r) for r in rows])
    examples = load_jsonl(path, tokenizer, max_length=64).examples
    batch = collate(examples, tokenizer.pad_token_id)
    for row, e in enumerate(examples):
        assert e.completion_ids[-1] == tokenizer.eos_token_id
        n_prompt, n = len(e.prompt_ids), e.length
        assert batch.input_ids[row, :n].tolist() == list(e.prompt_ids + e.completion_ids)
        assert batch.attention_mask[row].sum() == n
        # the logit at position t predicts token t+1: only completion tokens are targets
        picked = batch.targets[row][batch.targets[row] != IGNORE].tolist()
        assert picked == list(e.completion_ids)
        assert (batch.targets[row, : n_prompt - 1] == IGNORE).all() and (batch.targets[row, n - 1 :] == IGNORE).all()
    assert (batch.targets[:, : batch.input_ids.shape[1] - batch.keep] == IGNORE).all()  # keep covers every target
    assert batch.tokens == int(batch.attention_mask.sum())


def _parse_date(prompt: str) -> datetime.date:
    """An independent reading of the date words: month name, day (1-2 digits), year (4 digits)."""
    text = prompt.removeprefix("Date: ").split("\n")[0]
    months = [datetime.date(2000, m, 1).strftime("%B") for m in range(1, 13)]
    month = next(i + 1 for i, m in enumerate(months) if m[:3] in text)
    day = int(re.search(r"\b(\d{1,2})(st|nd|rd|th)?\b", text)[1])
    return datetime.date(int(re.search(r"\b(\d{4})\b", text)[1]), month, day)


@pytest.mark.parametrize("name", list(TASKS))
def test_shipped_tasks_are_deterministic_disjoint_and_correct(name: str, tmp_path: Path) -> None:
    train, test = task_splits(name, n_train=64, n_test=16, seed=3)
    assert (train, test) == task_splits(name, n_train=64, n_test=16, seed=3)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train + test:
        answer = r["completion"].strip()
        assert r["completion"].startswith(" ") and answer and "\n" not in answer
        if name == "topic":
            assert answer in TOPIC_LABELS
        elif name == "dates":
            assert datetime.date.fromisoformat(answer) == _parse_date(r["prompt"])
        else:
            assert answer.isdigit()
    train_path, test_path = write_task(name, tmp_path, n_train=64, n_test=16, seed=3)
    assert [json.loads(x) for x in train_path.read_text().splitlines()] == train
    assert len(test_path.read_text().splitlines()) == 16


def test_arithmetic_answers(tmp_path: Path) -> None:
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    for r in TASKS["arithmetic"]():
        q = r["prompt"].removeprefix("Question: what is ").split("?")[0].split()
        if q[0] in words and q[2] in words:
            a, b = words.index(q[0]), words.index(q[2])
            want = {"plus": a + b, "minus": a - b, "times": a * b}[q[1]]
            assert int(r["completion"]) == want

"""Training rows: JSONL loading with per-line validation, tokenization, and padded batches.

A row is `{"prompt": str, "completion": str}` (plain text; the completion follows the prompt directly)
or `{"messages": [{"role", "content"}, ...]}` (chat; the last message is the assistant's completion and
the rest goes through the tokenizer's chat template). The completion is followed by EOS so that a
tuned model learns to stop. The loss is taken on completion tokens only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100  # target id that takes no part in the loss


class DataError(ValueError):
    """The data cannot be trained on (e.g. no valid row); the message lists what was wrong."""


@dataclass(frozen=True, slots=True)
class Example:
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]  # completion tokens followed by EOS
    completion: str  # the reference text, for exact-match
    source: str  # "file:line" (or "task:split:index"), for messages about this row

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass(frozen=True, slots=True)
class LoadResult:
    examples: list[Example]
    errors: list[str]  # "file:line: what is wrong", one per rejected row


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; completions could not be terminated")
    return int(tokenizer.eos_token_id)


def _template_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _parse_messages(messages: object) -> tuple[list[dict], str]:
    """(context messages, assistant completion) or ValueError naming the problem."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("'messages' must be a list of at least two messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must have role 'assistant' (it is the completion)")
    return messages[:-1], messages[-1]["content"]


def encode_row(row: object, tokenizer, max_length: int, source: str) -> Example:
    """One validated, tokenized row; ValueError with a readable reason otherwise."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        context, completion = _parse_messages(row["messages"])
        if not tokenizer.chat_template:
            raise ValueError("chat rows need a tokenizer with a chat template")
        prompt_ids = _template_ids(tokenizer, context)
    else:
        for key in ("prompt", "completion"):
            if key not in row:
                raise ValueError(f"missing field '{key}' (rows need 'prompt' and 'completion', or 'messages')")
            if not isinstance(row[key], str):
                raise ValueError(f"field '{key}' must be a string, got {type(row[key]).__name__}")
        completion = row["completion"]
        prompt_ids = tokenizer.encode(row["prompt"])
    if not prompt_ids:
        raise ValueError("empty prompt")
    if not completion.strip():
        raise ValueError("empty completion")
    completion_ids = [*tokenizer.encode(completion, add_special_tokens=False), _eos_id(tokenizer)]
    total = len(prompt_ids) + len(completion_ids)
    if total > max_length:
        raise ValueError(f"{total} tokens (prompt {len(prompt_ids)} + completion {len(completion_ids)}) "
                         f"exceed --max-length {max_length}")
    return Example(tuple(prompt_ids), tuple(completion_ids), completion, source)


def encode_rows(rows: Iterable[tuple[str, object]], tokenizer, max_length: int) -> LoadResult:
    """Validate (source, row) pairs; bad rows become error lines, good ones Examples."""
    examples: list[Example] = []
    errors: list[str] = []
    for source, row in rows:
        try:
            examples.append(encode_row(row, tokenizer, max_length, source))
        except ValueError as exc:
            errors.append(f"{source}: {exc}")
    return LoadResult(examples, errors)


def read_jsonl(path: Path) -> Iterable[tuple[str, object]]:
    """(\"file:line\", parsed row) for every non-blank line; unparsable lines yield the error instead."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            yield source, json.loads(line)
        except json.JSONDecodeError as exc:
            yield source, _Invalid(f"invalid JSON ({exc.msg} at column {exc.colno})")


class _Invalid:
    """Stands in for a line that is not JSON; encode_row reports its message."""

    def __init__(self, message: str) -> None:
        self.message = message


def load_jsonl(path: Path, tokenizer, max_length: int) -> LoadResult:
    """Load and validate a JSONL file; DataError when not a single row is usable."""
    rows = []
    errors = []
    for source, row in read_jsonl(path):
        if isinstance(row, _Invalid):
            errors.append(f"{source}: {row.message}")
        else:
            rows.append((source, row))
    result = encode_rows(rows, tokenizer, max_length)
    errors = sorted(errors + result.errors, key=_line_order)
    if not result.examples:
        shown = "\n  ".join(errors[:20]) or "(the file is empty)"
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(f"{path}: no valid rows; refusing to train:\n  {shown}{more}")
    return LoadResult(result.examples, errors)


def _line_order(error: str) -> tuple[str, int]:
    head, _, rest = error.partition(": ")
    file, _, line = head.rpartition(":")
    return (file, int(line)) if line.isdigit() else (head, 0)


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L] 1 on real tokens
    targets: torch.Tensor  # [B, L] next-token id where that token is a completion token, else IGNORE
    keep: int  # logits needed for the last `keep` positions only (every target lies there)
    tokens: int  # real tokens in the batch (for tokens/s)


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad a batch (positions stay 0..n-1 per row, as the server gives them)."""
    length = max(e.length for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        seq = torch.tensor(e.prompt_ids + e.completion_ids)
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        start = len(e.prompt_ids) - 1  # the logit at this position predicts the first completion token
        targets[row, start : len(seq) - 1] = torch.tensor(e.completion_ids)
    keep = length - min(len(e.prompt_ids) for e in examples) + 1
    return Batch(ids, mask, targets, min(keep, length), int(mask.sum()))

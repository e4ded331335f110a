"""Shipped tasks, generated deterministically by code (no downloads), each with disjoint train/test splits.

- `topic`: a sentence -> one of four fixed label words (sports, food, weather, music).
- `dates`: a date written out in words ("March 3rd, 2021", "the 3rd of March 2021") -> ISO "2021-03-03".
- `arithmetic`: "what is seven plus five?" -> "12" (plus, minus, times on numbers written as words).
- `units`: "how many metres are in four kilometres?" -> "4000".

Rows are `{"prompt", "completion"}` dicts; the completion starts with a space so that it tokenizes the way
a model would continue the prompt. `write_task` saves them as JSONL for `--data`.
"""

from __future__ import annotations

import datetime
import json
import random
from collections.abc import Callable
from pathlib import Path

TOPIC_LABELS = ("sports", "food", "weather", "music")
_SUBJECTS = ("Anna", "My brother", "The old man", "Our teacher", "A tourist", "The kids", "My aunt", "Tom")
_WHEN = ("", " yesterday", " this morning", " on Sunday", " last night")
_TOPIC_PHRASES = {
    "sports": ("scored a goal in the final", "ran a marathon", "won the tennis match", "kicked the ball over the fence",
               "trained with the football team", "swam ten laps in the pool", "lost the chess tournament",
               "cheered for the home team", "hit a home run", "finished the cycling race"),
    "food": ("baked a loaf of bread", "cooked spicy noodles", "ate a bowl of soup", "ordered a pizza",
             "tasted the new cheese", "made pancakes for breakfast", "grilled some fish", "peeled the potatoes",
             "shared a chocolate cake", "roasted a chicken"),
    "weather": ("got caught in the rain", "watched the snow fall", "felt the strong wind", "saw a thunderstorm coming",
                "complained about the heat", "noticed the thick fog", "heard the hail on the roof",
                "enjoyed the sunny sky", "shivered in the freezing cold", "saw a rainbow after the storm"),
    "music": ("played the guitar", "sang in the choir", "listened to a new album", "practised the piano",
              "went to a jazz concert", "wrote a song", "played the drums", "learned to play the violin",
              "hummed a tune", "danced to the band"),
}
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
_UNITS = (("metres", "kilometre", 1000), ("grams", "kilogram", 1000), ("minutes", "hour", 60),
          ("seconds", "minute", 60), ("centimetres", "metre", 100), ("hours", "day", 24),
          ("days", "week", 7), ("months", "year", 12))  # (small unit, big unit singular, factor)


def _topic_rows() -> list[dict]:
    rows = []
    for label in TOPIC_LABELS:
        for phrase in _TOPIC_PHRASES[label]:
            for subject in _SUBJECTS:
                for when in _WHEN:
                    rows.append({"prompt": f"Sentence: {subject} {phrase}{when}.\nTopic:", "completion": f" {label}"})
    return rows


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _date_rows() -> list[dict]:
    rng = random.Random(1234)
    start = datetime.date(1990, 1, 1).toordinal()
    days = rng.sample(range(start, start + 40 * 365), 1200)
    rows = []
    for i, ordinal in enumerate(days):
        d = datetime.date.fromordinal(ordinal)
        month = _MONTHS[d.month - 1]
        text = (f"{month} {_ordinal(d.day)}, {d.year}", f"{d.day} {month} {d.year}", f"{month[:3]} {d.day}, {d.year}",
                f"the {_ordinal(d.day)} of {month} {d.year}")[i % 4]
        rows.append({"prompt": f"Date: {text}\nISO:", "completion": f" {d.isoformat()}"})
    return rows


def _arithmetic_rows() -> list[dict]:
    ops: dict[str, Callable[[int, int], int]] = {"plus": int.__add__, "minus": int.__sub__, "times": int.__mul__}
    rows = []
    for a, word_a in enumerate(_NUMBER_WORDS):
        for b, word_b in enumerate(_NUMBER_WORDS[:11]):
            for op, fn in ops.items():
                if op == "minus" and b > a:
                    continue
                rows.append({"prompt": f"Question: what is {word_a} {op} {word_b}?\nAnswer:",
                             "completion": f" {fn(a, b)}"})
    return rows


def _unit_rows() -> list[dict]:
    rows = []
    for small, big, factor in _UNITS:
        for n, word in enumerate(_NUMBER_WORDS[1:], start=1):
            plural = "" if n == 1 else "s"
            rows.append({"prompt": f"Question: how many {small} are in {word} {big}{plural}?\nAnswer:",
                         "completion": f" {n * factor}"})
    return rows


TASKS: dict[str, Callable[[], list[dict]]] = {
    "topic": _topic_rows,
    "dates": _date_rows,
    "arithmetic": _arithmetic_rows,
    "units": _unit_rows,
}


def task_splits(name: str, n_train: int = 256, n_test: int = 48, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows): a seeded shuffle of every row the task generates, split without overlap."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; shipped: {', '.join(TASKS)}")
    rows = TASKS[name]()
    random.Random(seed).shuffle(rows)
    if n_train + n_test > len(rows):
        raise ValueError(f"task {name!r} has {len(rows)} rows; asked for {n_train} train + {n_test} test")
    return rows[n_test : n_test + n_train], rows[:n_test]


def write_task(name: str, out_dir: Path, **split_args) -> tuple[Path, Path]:
    """Write `{name}.train.jsonl` and `{name}.test.jsonl` under out_dir; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, rows in zip(("train", "test"), task_splits(name, **split_args), strict=True):
        path = out_dir / f"{name}.{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]

"""The bundled demo task: rewrite a date written in everyday English as ISO 8601 (``YYYY-MM-DD``).

It is generated, deterministically from a seed, so nothing has to be downloaded. A small instruct model
answers it poorly out of the box (it chats, or keeps the input's format) and well after a short fine-tune, and
exact match scores it without judgement calls. Train and test dates are drawn from disjoint sets of days.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

SYSTEM_PROMPT = "Rewrite the date in ISO 8601 format (YYYY-MM-DD). Answer with the date only."

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _render(date: dt.date, style: int) -> str:
    month, short = _MONTHS[date.month - 1], _MONTHS[date.month - 1][:3]
    day, year, weekday = date.day, date.year, _WEEKDAYS[date.weekday()]
    styles = [
        f"{month} {day}, {year}",
        f"{day} {month} {year}",
        f"{month} {_ordinal(day)}, {year}",
        f"the {_ordinal(day)} of {month}, {year}",
        f"{short} {day} {year}",
        f"{day}-{short}-{year}",
        f"{weekday}, {month} {day}, {year}",
        f"{short}. {_ordinal(day)} {year}",
    ]
    return styles[style % len(styles)]


def date_records(n: int, seed: int, split: str, fmt: str = "messages") -> list[dict]:
    """``n`` records of the date task. ``split`` is ``train`` or ``test``: days with an even ordinal (days since
    1950-01-01) go to train, odd to test, so no test date is ever seen in training."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    rng = random.Random(f"{seed}-{split}")
    start, span = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    parity = 0 if split == "train" else 1
    records = []
    for _ in range(n):
        offset = rng.randrange(span // 2) * 2 + parity
        date = start + dt.timedelta(days=offset)
        question, answer = _render(date, rng.randrange(8)), date.isoformat()
        if fmt == "messages":
            records.append({"messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]})
        elif fmt == "prompt_completion":
            records.append({"prompt": f"{SYSTEM_PROMPT}\nDate: {question}\nISO 8601:", "completion": f" {answer}"})
        else:
            raise ValueError("fmt must be 'messages' or 'prompt_completion'")
    return records


def write_demo_data(folder: str | Path, n_train: int = 400, n_test: int = 100, seed: int = 0,
                    fmt: str = "messages") -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` of the date task into ``folder``; return their paths."""
    return write_splits(folder, lambda split, n: date_records(n, seed, split, fmt), n_train, n_test)


def write_splits(folder: str | Path, records, n_train: int, n_test: int) -> tuple[Path, Path]:
    """Write ``records(split, n)`` for the train and test splits as ``train.jsonl`` and ``test.jsonl``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        path = folder / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for record in records(split, n):
                f.write(json.dumps(record) + "\n")
        paths.append(path)
    return paths[0], paths[1]

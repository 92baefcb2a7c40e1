"""The bundled preference task: the date task of :mod:`hfbridge.data.demo` as pairs.

The prompt asks for a date in ISO 8601 (the system prompt says: the date only); the chosen answer is the ISO
date, the rejected one is what a small instruct model tends to answer instead: the input's own format, a chatty
sentence around the date, or the European day/month order. Held-out prompts use days never seen in training, so
exact match of the greedy answer against the chosen one measures a change of behaviour, not memory. KTO records
are the same answers unpaired: the chosen as desirable, the rejected as undesirable.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

from hfbridge.data.demo import date_records, write_splits


def _rejected(question: str, iso: str, rng: random.Random) -> str:
    date = dt.date.fromisoformat(iso)
    styles = [
        question,
        f"The date in ISO 8601 format is {iso}.",
        f"Sure! {question} in ISO 8601 format is {iso}.",
        f"{date.day:02d}/{date.month:02d}/{date.year}",
    ]
    return styles[rng.randrange(len(styles))]


def preference_records(n: int, seed: int, split: str, fmt: str = "preference") -> list[dict]:
    """``n`` records (``preference``: conversational pairs; ``kto``: ``2n`` unpaired examples)."""
    rng = random.Random(f"{seed}-{split}-rejected")
    records = []
    for record in date_records(n, seed, split, "messages"):
        prompt, answer = record["messages"][:-1], record["messages"][-1]["content"]
        rejected = _rejected(prompt[-1]["content"], answer, rng)
        if fmt == "preference":
            records.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer}],
                            "rejected": [{"role": "assistant", "content": rejected}]})
        elif fmt == "kto":
            records.append({"prompt": prompt, "completion": [{"role": "assistant", "content": answer}], "label": True})
            records.append({"prompt": prompt, "completion": [{"role": "assistant", "content": rejected}],
                            "label": False})
        else:
            raise ValueError("fmt must be 'preference' or 'kto'")
    return records


def write_preference_data(folder: str | Path, n_train: int = 400, n_test: int = 100, seed: int = 0,
                          fmt: str = "preference") -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` of the preference date task into ``folder``."""
    return write_splits(folder, lambda split, n: preference_records(n, seed, split, fmt), n_train, n_test)

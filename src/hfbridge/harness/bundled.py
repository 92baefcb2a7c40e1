"""The tasks shipped with hfbridge, and the records under them.

Both tasks ask the demo task's question (:mod:`hfbridge.data.demo`: a date in everyday English, rewritten as ISO
8601) about the same records, generated deterministically from that module, so nothing is downloaded:

* ``hfbridge_dates``: the demo task's 100 held-out records (seed 0, the ``test`` split a ``hfbridge finetune`` of
  the demo task scores), answered by greedy generation and scored by exact match;
* ``hfbridge_dates_mc``: the same questions as a 4-way choice between ISO dates (the right one and three near
  misses among: day and month swapped, a day off, a year off, another month), scored by log-likelihood (``acc``).

Few-shot examples come from a ``train`` split: the first 50 records of the demo task's training split, never a
held-out date. ``python -m hfbridge.harness.bundled`` writes the files again; a test checks that the shipped files
equal what this module generates.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
BUNDLED_TASKS = ("hfbridge_dates", "hfbridge_dates_mc")
SPLITS = {"train": 50, "test": 100}  # records per split
SEED = 0  # the seed of `hfbridge finetune`'s demo data (train.seed's default)


def _distractors(date: dt.date, rng: random.Random) -> list[str]:
    """Three ISO dates near ``date`` that a model confusing formats or arithmetic would pick: three of day and
    month swapped (when that is a date), a day off, a year off, another month."""
    pool = []
    if date.day <= 12 and date.day != date.month:
        pool.append(dt.date(date.year, date.day, date.month))
    pool.append(date + dt.timedelta(days=rng.choice((-1, 1))))
    pool.append(dt.date(date.year + rng.choice((-1, 1)), date.month, min(date.day, 28)))
    month = rng.choice([m for m in range(1, 13) if m != date.month])
    pool.append(dt.date(date.year, month, min(date.day, 28)))
    unique = list(dict.fromkeys(d.isoformat() for d in pool if d != date))
    return rng.sample(unique, 3)


def records(split: str) -> list[dict]:
    """The records of one split: ``question`` (the everyday date), ``answer`` (ISO 8601), and for the
    multiple-choice task ``choices`` (four ISO dates) and ``label`` (the index of the answer)."""
    from hfbridge.data.demo import date_records

    rng = random.Random(f"hfbridge-harness-{split}")
    out = []
    for record in date_records(SPLITS[split], SEED, split, fmt="messages"):
        question, answer = record["messages"][1]["content"], record["messages"][2]["content"]
        choices = [answer, *_distractors(dt.date.fromisoformat(answer), rng)]
        rng.shuffle(choices)
        out.append({"question": question, "answer": answer, "choices": choices, "label": choices.index(answer)})
    return out


def data_file(split: str) -> Path:
    return TASKS_DIR / f"dates_{split}.jsonl"


def write_bundled_data(folder: str | Path = TASKS_DIR) -> list[Path]:
    """Write ``dates_train.jsonl`` and ``dates_test.jsonl`` into ``folder`` (the package's task folder by
    default); return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in SPLITS:
        path = folder / data_file(split).name
        path.write_text("".join(json.dumps(r) + "\n" for r in records(split)), encoding="utf-8")
        paths.append(path)
    return paths


def load_dates(**_task_metadata):
    """The bundled tasks' ``custom_dataset``: both splits read from the jsonl files beside the task YAMLs
    (lm-evaluation-harness passes the task's metadata as keyword arguments; none is needed)."""
    import datasets

    splits = {}
    for split in SPLITS:
        rows = [json.loads(line) for line in data_file(split).read_text(encoding="utf-8").splitlines() if line]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


if __name__ == "__main__":
    for written in write_bundled_data():
        print(f"wrote {written}")

"""The example data sets of ``examples/llm_*.yaml``, as tables: one file with a ``split`` column.

``dates``: the core's demo task (:mod:`hfbridge.data.demo`), columns ``date`` and ``iso``.
``tickets``: the generated support-ticket classification (:mod:`hfbridge.data.demo_category`), columns
``ticket`` and ``department``.
"""

from __future__ import annotations

from pathlib import Path

from hfbridge.declarative.dataset import write_rows

TASKS = ("dates", "tickets")


def date_rows(n: int, seed: int, split: str) -> list[dict]:
    from hfbridge.data.demo import date_records

    rows = []
    for record in date_records(n, seed, split, fmt="messages"):
        user = next(m["content"] for m in record["messages"] if m["role"] == "user")
        answer = next(m["content"] for m in record["messages"] if m["role"] == "assistant")
        rows.append({"date": user, "iso": answer})
    return rows


def ticket_rows(n: int, seed: int, split: str) -> list[dict]:
    from hfbridge.data.demo_category import ticket_records

    return ticket_records(n, seed, split)


def write_example_data(task: str, path: str | Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write ``n_train`` train and ``n_test`` test rows of ``task`` to ``path`` (.csv, .jsonl or .parquet)."""
    make = {"dates": date_rows, "tickets": ticket_rows}.get(task)
    if make is None:
        raise ValueError(f"unknown example task {task!r}; choose one of {', '.join(TASKS)}")
    rows = [{**r, "split": "train"} for r in make(n_train, seed, "train")]
    rows += [{**r, "split": "test"} for r in make(n_test, seed, "test")]
    return write_rows(rows, path)

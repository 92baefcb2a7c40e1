"""Read a data set (CSV, JSONL, Parquet or a ``datasets`` folder), check it against the config, split it.

Every check runs before any model is loaded and names the file and line: a column the config names but the data
lacks, an empty output value, a category value that is not one of the labels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from hfbridge.data.sources import DataSourceError, read_records
from hfbridge.declarative.prompt import value_text
from hfbridge.declarative.schema import LLMConfig

SPLIT_NAMES = ("train", "validation", "test")
_SPLIT_VALUES = {"train": 0, "training": 0, "0": 0, "validation": 1, "val": 1, "valid": 1, "1": 1,
                 "test": 2, "2": 2}


class DatasetError(ValueError):
    """A data set that does not fit the config; the message names the file and line."""


@dataclass
class Splits:
    train: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)

    def get(self, name: str) -> list[dict]:
        if name == "all":
            return [*self.train, *self.validation, *self.test]
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; choose all, {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)


def check_rows(rows: list[tuple[str, dict]], cfg: LLMConfig, need_target: bool = True) -> None:
    """Every input column present in every row; the output column too (when ``need_target``), not empty, and
    for a category one of its labels."""
    if not rows:
        raise DatasetError("the data set is empty")
    inputs = [f.name for f in cfg.input_features]
    output = cfg.output_feature
    labels = set(output.labels or [])
    for where, record in rows:
        for name in inputs:
            if name not in record:
                raise DatasetError(
                    f"{where}: column {name!r} is named in input_features but absent from the data "
                    f"(columns: {', '.join(map(str, record))})"
                )
        if not need_target:
            continue
        if output.name not in record:
            raise DatasetError(
                f"{where}: column {output.name!r} is named in output_features but absent from the data "
                f"(columns: {', '.join(map(str, record))})"
            )
        value = value_text(record[output.name])
        if not value.strip():
            raise DatasetError(f"{where}: the output column {output.name!r} is empty")
        if output.type == "category" and value not in labels:
            raise DatasetError(
                f"{where}: {output.name}={value!r} is not one of the category labels "
                f"[{', '.join(output.labels)}]; add it to output_features[0].labels or fix the data"
            )


def read_dataset(path: str | Path, cfg: LLMConfig, need_target: bool = True) -> list[tuple[str, dict]]:
    """All rows of a data file with where each came from, checked against ``cfg``."""
    try:
        rows = read_records(path)
    except DataSourceError as e:
        raise DatasetError(str(e)) from None
    rows = [(where, _normalise(record, cfg)) for where, record in rows]
    check_rows(rows, cfg, need_target)
    return rows


def _normalise(record: dict, cfg: LLMConfig) -> dict:
    """Category values as text, so that ``1`` in JSONL matches the label ``"1"``."""
    name = cfg.output_feature.name
    if cfg.output_feature.type == "category" and name in record and record[name] is not None:
        value = record[name]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        record = {**record, name: str(value)}
    return record


def split_rows(rows: list[tuple[str, dict]], cfg: LLMConfig, seed: int) -> Splits:
    """Split by a column (``fixed``) or at random by probabilities (``random``); ``auto`` picks ``fixed`` when
    the first row has the split column."""
    split = cfg.preprocessing.split
    kind = split.type
    if kind == "auto":
        kind = "fixed" if rows and split.column in rows[0][1] else "random"
    splits = Splits()
    buckets = (splits.train, splits.validation, splits.test)
    if kind == "fixed":
        for where, record in rows:
            if split.column not in record:
                raise DatasetError(f"{where}: no split column {split.column!r} (preprocessing.split.column)")
            key = value_text(record[split.column]).strip().lower()
            if key.endswith(".0"):
                key = key[:-2]
            if key not in _SPLIT_VALUES:
                raise DatasetError(
                    f"{where}: {split.column}={record[split.column]!r} is not a split; use train, validation "
                    "or test (or 0, 1, 2)"
                )
            buckets[_SPLIT_VALUES[key]].append(record)
    else:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_train = round(split.probabilities[0] * len(rows))
        n_val = round(split.probabilities[1] * len(rows))
        for rank, i in enumerate(order):
            bucket = 0 if rank < n_train else 1 if rank < n_train + n_val else 2
            buckets[bucket].append(rows[i][1])
    return splits


def load_splits(path: str | Path, cfg: LLMConfig, seed: int) -> Splits:
    return split_rows(read_dataset(path, cfg), cfg, seed)


OUTPUT_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write rows as CSV, JSONL or Parquet, by the file's suffix."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif suffix == ".csv":
        import csv

        columns = list(dict.fromkeys(k for row in rows for k in row))
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"{path}: unknown file type {suffix!r}; use .csv, .jsonl or .parquet")
    return path

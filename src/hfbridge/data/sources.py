"""Read records from JSONL, CSV, Parquet files and ``datasets`` folders saved with ``save_to_disk``.

Every reader returns a list of ``(where, record)`` pairs, ``where`` naming the file and line or row, so that a
later check can say exactly which record is wrong. Problems with the file itself (missing, malformed line, empty)
raise :class:`DataSourceError` before any model is loaded.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class DataSourceError(ValueError):
    """A data file that cannot be read; the message names the file and, where it applies, the line."""


# A CSV cell may hold a long document; the csv module's default limit (128 KiB) would stop at it.
CSV_FIELD_LIMIT = 1 << 30


@contextlib.contextmanager
def _text_errors(path: Path, line: Callable[[], int]) -> Iterator[None]:
    """Name the file and line of a text file that is not UTF-8."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise DataSourceError(
            f"{path}:{line()}: not UTF-8 text ({e.reason} at byte {e.start} of the line's chunk); re-save the file "
            "as UTF-8"
        ) from e


def source_kind(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "datasets"
        raise DataSourceError(f"{path} is a folder but not a dataset saved with datasets' save_to_disk")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataSourceError(
            f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .csv, .parquet or a datasets folder"
        )
    return kind


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    lineno = 0
    with path.open(encoding="utf-8-sig") as f, _text_errors(path, lambda: lineno + 1):
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataSourceError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise DataSourceError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            rows.append((f"{path}:{lineno}", record))
    return rows


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    limit = csv.field_size_limit()
    csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        # utf-8-sig: a byte-order mark (as spreadsheet programs write) is not part of the first column's name
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            with _text_errors(path, lambda: reader.line_num + 1):
                if not reader.fieldnames:
                    return []
                rows = []
                for record in reader:
                    if None in record:
                        raise DataSourceError(f"{path}:{reader.line_num}: more values than the header has columns")
                    rows.append((f"{path}:{reader.line_num}", dict(record)))
    except csv.Error as e:
        raise DataSourceError(f"{path}:{reader.line_num}: not readable as CSV ({e})") from e
    finally:
        csv.field_size_limit(limit)
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataSourceError(f"{path}: not a readable Parquet file ({e})") from e
    return [(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())]


def _read_datasets_dir(path: Path, split: str | None) -> list[tuple[str, dict]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in loaded else next(iter(loaded))
        if split not in loaded:
            raise DataSourceError(f"{path}: no split {split!r}; it has {', '.join(loaded)}")
        loaded = loaded[split]
    return [(f"{path} row {i}", r) for i, r in enumerate(loaded)]


def read_records(path: str | Path, split: str | None = None) -> list[tuple[str, dict]]:
    """All records of a data file or folder, each with where it came from. Raises on a missing or empty file."""
    path = Path(path)
    if not path.exists():
        raise DataSourceError(f"data file not found: {path}")
    kind = source_kind(path)
    if kind == "jsonl":
        rows = _read_jsonl(path)
    elif kind == "csv":
        rows = _read_csv(path)
    elif kind == "parquet":
        rows = _read_parquet(path)
    else:
        rows = _read_datasets_dir(path, split)
    if not rows:
        raise DataSourceError(f"{path}: the data set is empty")
    return rows

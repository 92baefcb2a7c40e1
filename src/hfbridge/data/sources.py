"""Read records from JSONL, CSV, Parquet files and ``datasets`` folders saved with ``save_to_disk``, and hub
datasets named ``owner/name`` (:func:`resolve_source`, :mod:`hfbridge.data.hub`).

One lazy reader per file type (:func:`iter_rows`) serves the in-memory path (:func:`read_records`, a list) and
streaming (:mod:`hfbridge.data.streaming`). Every reader returns ``(where, record)`` pairs, ``where`` naming the file and line or row, so that a
later check can say exactly which record is wrong. Problems with the file itself (missing, malformed line, empty)
raise :class:`DataSourceError` before any model is loaded.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from hfbridge.data.hub import HubDataset, as_hub_dataset, looks_like_hub_id, read_hub_records

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class DataSourceError(ValueError):
    """A data file that cannot be read; the message names the file and, where it applies, the line."""


# A CSV cell may hold a long document; the csv module's default limit (128 KiB) would stop at it.
CSV_FIELD_LIMIT = 1 << 30
PARQUET_BATCH = 1024  # rows per Parquet record batch read
DATASETS_SLICE = 1000  # rows per slice of a datasets folder


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


def _iter_jsonl(path: Path, start: int) -> Iterator[tuple[str, dict]]:
    index = 0
    lineno = 0
    with path.open(encoding="utf-8-sig") as f, _text_errors(path, lambda: lineno + 1):
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            index += 1
            if index <= start:  # skipped when resuming: read, not parsed
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataSourceError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise DataSourceError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield f"{path}:{lineno}", record


def _iter_csv(path: Path, start: int) -> Iterator[tuple[str, dict]]:
    limit = csv.field_size_limit()
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = None
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            with _text_errors(path, lambda: reader.line_num + 1):
                if not reader.fieldnames:
                    return
                for index, record in enumerate(reader):
                    if None in record:
                        raise DataSourceError(f"{path}:{reader.line_num}: more values than the header has columns")
                    if index >= start:
                        yield f"{path}:{reader.line_num}", dict(record)
    except csv.Error as e:
        raise DataSourceError(f"{path}:{reader.line_num if reader else 1}: not readable as CSV ({e})") from e
    finally:
        csv.field_size_limit(limit)


def _iter_parquet(path: Path, start: int) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        groups, first = [], 0  # whole row groups before `start` are not read at all
        for g in range(file.metadata.num_row_groups):
            rows = file.metadata.row_group(g).num_rows
            if first + rows <= start and not groups:
                first += rows
                continue
            groups.append(g)
        batches = file.iter_batches(batch_size=PARQUET_BATCH, row_groups=groups) if groups else iter(())
    except Exception as e:
        raise DataSourceError(f"{path}: not a readable Parquet file ({e})") from e
    index = first
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            raise DataSourceError(f"{path}: not a readable Parquet file ({e})") from e
        for record in batch.to_pylist():
            if index >= start:
                yield f"{path} row {index}", record
            index += 1


def _iter_datasets(path: Path, start: int, split: str | None) -> Iterator[tuple[str, dict]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))  # memory-mapped: rows are read as they are sliced
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in loaded else next(iter(loaded))
        if split not in loaded:
            raise DataSourceError(f"{path}: no split {split!r}; it has {', '.join(loaded)}")
        loaded = loaded[split]
    for first in range(start, len(loaded), DATASETS_SLICE):
        columns = loaded[first : first + DATASETS_SLICE]
        names = list(columns)
        for k, values in enumerate(zip(*(columns[n] for n in names))):
            yield f"{path} row {first + k}", dict(zip(names, values))


def iter_rows(path: str | Path, start: int = 0, split: str | None = None) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` pairs of a data file or folder, lazily, from record ``start`` (0-based, in file order;
    the records before it are read but not parsed where the format allows). Raises on a missing file; an empty
    one gives no records."""
    path = Path(path)
    if not path.exists():
        raise DataSourceError(f"data file not found: {path}")
    kind = source_kind(path)
    if kind == "jsonl":
        return _iter_jsonl(path, start)
    if kind == "csv":
        return _iter_csv(path, start)
    if kind == "parquet":
        return _iter_parquet(path, start)
    return _iter_datasets(path, start, split)


def resolve_source(path: str | Path, config: str | None = None, split: str = "train",
                   revision: str | None = None) -> str | Path | HubDataset:
    """What a data path names: an existing local file or folder always wins; a string ``owner/name`` that is not
    a local path (and does not end in a data file's suffix) is a hub dataset (read with ``config``, ``split`` and
    ``revision``); anything else stays a path (a missing one is "data file not found" when read)."""
    if isinstance(path, HubDataset) or not isinstance(path, str) or Path(path).exists():
        return path
    return as_hub_dataset(path, config, split, revision) if looks_like_hub_id(path.strip()) else path


def read_records(path: str | Path, split: str | None = None) -> list[tuple[str, dict]]:
    """All records of a data file or folder, or of a hub dataset (:func:`resolve_source`), each with where it came
    from. Raises on a missing or empty file."""
    source = resolve_source(path, split=split or "train")
    if isinstance(source, HubDataset):
        return read_hub_records(source)
    rows = list(iter_rows(path, split=split))
    if not rows:
        raise DataSourceError(f"{path}: the data set is empty")
    return rows

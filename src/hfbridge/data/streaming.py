"""Streaming training data: records read, checked and tokenized as training goes, never all held in memory.

``data.streaming: true`` (``--streaming``) reads one training file lazily: JSONL line by line, CSV row by row (the
``csv`` module), Parquet in record batches (``pyarrow``'s ``iter_batches``), a ``datasets`` folder in slices of its
memory-mapped table. Each record is checked as the in-memory path checks it (the same format detection, the same
error text naming the file and line) and tokenized with :func:`hfbridge.data.formats.tokenize_record`.

The rules (docs/data.md, "Streaming"):

* **order**: file order, every epoch (no shuffling);
* **sharding**: record ``i`` (counted from 0 in file order) goes to data-parallel rank ``i % world``; the stream is
  padded to a multiple of ``world`` by repeating its first records, as the in-memory sampler pads, so every rank
  has the same number of micro-batches;
* **micro-batches**: each rank's records, ``batch_size`` at a time, collated by the data module's collator (packed
  with best-fit decreasing, or padded), as the in-memory path collates a micro-batch: so micro-batch ``b`` of rank
  ``r`` holds records ``b * B * world + r + k * world`` (``k < B``). Samples left with no trained token are
  dropped from their micro-batch (a micro-batch left with none keeps them: it trains nothing, its loss is 0);
* **resume**: the checkpoint's data position (epoch, micro-batches trained) re-derives the stream's position:
  ``batches * B * world`` records, which are skipped by reading without tokenizing (JSONL lines are not even
  parsed; whole Parquet row groups are not read). Lightning reads one batch of a loader of unknown length before
  it restores a checkpoint, so the position is given before ``trainer.fit`` (:meth:`StreamingDataModule.resume_at`,
  called by the pipeline);
* **up-front checks**: the first :data:`PEEK` records are read and checked before any model is loaded; a malformed
  later record stops the run with an error naming its file and line (checkpoints already written stay).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from hfbridge.data.collators import StepTokenCounter
from hfbridge.data.datamodule import CausalLMDataModule, resolve_format
from hfbridge.data.formats import (
    FORMATS,
    TokenizedSample,
    check_record,
    detect_format,
    tokenize_record,
)
from hfbridge.data.sources import DataSourceError, iter_rows, source_kind

log = logging.getLogger(__name__)

PEEK = 100  # records read and checked before any model is loaded


# --------------------------------------------------------------------------------------------------- the source
def file_fingerprint(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's size and of its first and last ``chunk`` bytes (a folder: of each file's), cheap for any
    size: what a streamed run's checkpoints are tied to (a resume on another file is refused)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{size}\n".encode())
        with file.open("rb") as f:
            h.update(f.read(chunk))
            if size > chunk:
                f.seek(max(size - chunk, chunk))
                h.update(f.read(chunk))
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class StreamSource:
    """A training file to stream: its path, kind and format (detected from its first record), and a fingerprint of
    its content (in ``repr``, so the run identity of a checkpoint folder names the file's content)."""

    path: str
    kind: str
    format: str
    fingerprint: str

    def rows(self, start: int = 0) -> Iterator[tuple[str, dict]]:
        return iter_rows(self.path, start)


def open_stream(path: str | Path, fmt: str = "auto", peek: int = PEEK, task_label: str = "this task") -> StreamSource:
    """Check a training file for streaming without reading all of it: it exists and has a known type, its first
    ``peek`` records are readable and fit the format (``auto``: detected from the first record, as the in-memory
    path detects it). Raises the in-memory path's errors."""
    from hfbridge.data.mixture import _clash

    path = Path(path)
    head = list(islice(iter_rows(path), peek))
    if not head:
        raise DataSourceError(f"{path}: the data set is empty")
    clash = _clash(head[0][1], str(path), task_label)
    if clash:
        raise DataSourceError(clash)
    fmt = resolve_format(head, fmt, detect_format, FORMATS)
    for where, record in head:
        check_record(record, fmt, where)
    return StreamSource(str(path), source_kind(path), fmt, file_fingerprint(path))


# --------------------------------------------------------------------------------------------------- the data module
class StreamedBatches:
    """One rank's micro-batches of a :class:`StreamSource` (the rules of the module docstring), collated by
    ``collate``. Iterating starts a pass over the file; ``start_batch`` skips micro-batches (resuming)."""

    def __init__(self, source: StreamSource, tokenizer, max_length: int | None, batch_size: int, collate,
                 rank: int = 0, world: int = 1, start_batch: int = 0):
        self.source, self.tokenizer, self.max_length = source, tokenizer, max_length
        self.batch_size, self.collate = batch_size, collate
        self.rank, self.world, self.start_batch = rank, world, start_batch
        self.truncated = self.dropped = self.samples = 0

    def _records(self) -> Iterator[tuple[int, str, dict]]:
        """``(index, where, record)`` of the padded stream from record ``start_batch * B * world``; every record
        is checked (on every rank, so that all ranks stop at a bad one together)."""
        start = self.start_batch * self.batch_size * self.world
        fmt = self.source.format
        total = start
        for index, (where, record) in enumerate(self.source.rows(start), start=start):
            check_record(record, fmt, where)
            yield index, where, record
            total = index + 1
        if total == start and start > 0:  # resumed at (or past) the end of the file: count its records
            total = sum(1 for _ in self.source.rows())
        pad = -total % self.world
        if start < total + pad:  # pad to a multiple of world with the first records, as the sampler pads
            skip = max(start - total, 0)
            for k, (where, record) in enumerate(islice(self.source.rows(skip), pad - skip), start=total + skip):
                yield k, where, record

    def __iter__(self) -> Iterator[dict]:
        group: list[TokenizedSample] = []
        for index, _where, record in self._records():
            if index % self.world != self.rank:
                continue
            sample = tokenize_record(self.tokenizer, record, self.source.format, self.max_length)
            self.samples += 1
            self.truncated += sample.truncated
            group.append(sample)
            if len(group) == self.batch_size:
                yield self._batch(group)
                group = []
        if group:
            yield self._batch(group)
        if self.truncated:
            log.warning("train (streamed): %d of %d samples were longer than max_length=%s tokens and were truncated",
                        self.truncated, self.samples, self.max_length)
        if self.dropped:
            log.warning("train (streamed): %d samples had no trained token left and were dropped", self.dropped)

    def _batch(self, group: list[TokenizedSample]) -> dict:
        kept = [s for s in group if s.num_label_tokens > 0]
        self.dropped += len(group) - len(kept) if kept else 0
        return self.collate(kept or group)


class StreamingDataModule(CausalLMDataModule):
    """:class:`~hfbridge.data.datamodule.CausalLMDataModule` whose training data is a :class:`StreamSource`, read
    as training goes (module docstring); validation records (a list or a file, small) are in memory as always.
    Collating, packing and data-parallel ranks are the base class's."""

    def __init__(self, tokenizer, source: StreamSource, val_data=None, **kwargs):
        if kwargs.get("val_fraction"):
            raise ValueError("val_fraction: a streamed training set cannot hold out part of itself; give val_data")
        self.source = source
        super().__init__(tokenizer, source, val_data, data_format=source.format, **kwargs)
        self.batches: StreamedBatches | None = None

    def _load_records(self, data, data_format: str) -> tuple[list, str]:
        if isinstance(data, StreamSource):
            return [], data.format  # nothing read now: the file is streamed by train_dataloader
        return super()._load_records(data, data_format)

    def setup(self, stage: str | None = None) -> None:
        if self.val_records is not None and self.val_samples is None:
            self.val_samples = self._tokenize(self.val_records, "validation")

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def train_dataloader(self):
        self.setup("fit")
        return StepTokenCounter(_EpochStream(self), self._accumulate(), self._step_counts())

    def stream(self, start_batch: int = 0) -> StreamedBatches:
        """This rank's micro-batches of one pass, from micro-batch ``start_batch``."""
        rank, size = self._dp_rank_and_size()
        return StreamedBatches(self.source, self.tokenizer, self.max_length, self.batch_size, self._collate(),
                               rank, size, start_batch)

    # Lightning reads one batch of a loader of unknown length while it sets up, before it restores a checkpoint;
    # the pipeline therefore gives the checkpoint's position (resume_at) before training starts.
    reads_before_restore = True

    def resume_at(self, epoch: int, batches: int) -> None:
        """Start the next pass after its first ``batches`` micro-batches (the position a checkpoint saved; its
        ``epoch`` is the pass Lightning resumes). Given again once that pass has started there (the strategy
        restoring the checkpoint), it is a no-op; a position that comes after another pass has started cannot be
        honoured and is an error rather than a silently different run."""
        position = (int(epoch), int(batches))
        started = getattr(self, "_started_at", None)
        if started is not None:
            if started == position:
                return
            raise RuntimeError(f"the training stream was already read from micro-batch {started[1]} of epoch "
                               f"{started[0]} when the checkpoint's position {position} came; give resume_at before "
                               "trainer.fit (as hfbridge's pipeline does)")
        self._resume_position = position

    def _begin_pass(self) -> int:
        """The micro-batch a new pass starts at: the resume position once, else 0."""
        position = getattr(self, "_resume_position", None)
        self._resume_position = None
        self._started_at = position if position is not None else (self._epoch(), 0)
        return position[1] if position is not None else 0


class _EpochStream:
    """The training loader: each pass over it is a pass over the file, skipping the micro-batches a checkpoint had
    already trained on when it is the resumed epoch."""

    def __init__(self, datamodule: StreamingDataModule):
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[dict]:
        # A generator: nothing runs (and the resume position is kept) until the first batch is asked for, since
        # Lightning calls ``iter`` once only to check that the loader is iterable.
        dm = self.datamodule
        dm.batches = dm.stream(dm._begin_pass())
        yield from dm.batches


def check_streaming(cfg, task_name: str, method: str, spec_list) -> None:
    """Refuse a streamed run that cannot be streamed, before any model is loaded (config checks that need no data):
    another task or method than text sft, a mixture, and a schedule that needs the run's length without
    ``train.max_steps``."""
    label = f"--task {task_name} --method {method}"
    if task_name != "text-generation" or method != "sft":
        raise ValueError(f"data.streaming: {label} reads every record before training; streaming supports "
                         "--task text-generation --method sft (drop --streaming)")
    if len(spec_list) > 1:
        raise ValueError(f"data.streaming: a mixture of {len(spec_list)} sources cannot be streamed; give one "
                         "--data file, or drop --streaming to mix them in memory")
    spec = spec_list[0]
    if isinstance(spec.path, str) and type(spec.path) is not str:  # a hub dataset (a str subclass with its split)
        raise ValueError(f"data.streaming: {spec.path} is a hub dataset, which is read from datasets' cache; stream "
                         "a local .jsonl, .csv or .parquet file, or drop --streaming")
    if spec.max_samples is not None or spec.epochs != 1:
        raise ValueError(f"{spec.where}: max_samples and epochs of a source are not supported with streaming; "
                         "give the plain path (and --max-steps / --epochs for the run's length)")
    needs = [f"the {cfg.optim.schedule} schedule"] if cfg.optim.schedule != "constant" else []
    if cfg.optim.warmup_ratio > 0:
        needs.append(f"warmup_ratio {cfg.optim.warmup_ratio:g}")
    if cfg.train.max_steps is None and needs:
        raise ValueError(f"data.streaming: a streamed data set has no known length, which {' and '.join(needs)} "
                         "need; give --max-steps N (train.max_steps), or --schedule constant --warmup-ratio 0 to "
                         "train until the data ends")


def open_training_stream(cfg, specs, task_name: str) -> StreamSource:
    """A run's training data for ``data.streaming``: the run checked (:func:`check_streaming`), its one file
    opened (:func:`open_stream`), and what is done said."""
    from hfbridge.console import say

    check_streaming(cfg, task_name, cfg.method.name, specs)
    source = open_stream(specs[0].path, cfg.data.format, task_label=f"--task {task_name} --method {cfg.method.name}")
    say(f"streaming the training data from {source.path} ({source.format}, file order): its first {PEEK} records "
        "checked now, the rest as training reads them (the tokenization cache does not apply)")
    return source

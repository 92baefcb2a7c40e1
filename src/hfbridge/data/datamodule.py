"""A Lightning ``DataModule`` for causal-LM fine-tuning from files or in-memory records."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler

from hfbridge.data.collators import PaddedCollator, StepTokenCounter
from hfbridge.data.formats import (
    FORMATS,
    DataFormatError,
    TokenizedSample,
    check_record,
    detect_format,
    pad_id,
    tokenize_record,
)
from hfbridge.data.packing import PackedCollator, packing_is_exact, uses_flash_attention
from hfbridge.data.sources import DataSourceError, read_records

log = logging.getLogger(__name__)

DataArg = str | Path | Sequence[dict] | None


def record_rows(data: str | Path | Sequence[dict], split: str | None = None) -> list[tuple[str, dict]]:
    """``(where, record)`` pairs from a data path or a list of dicts (``where`` names the file and line, or the
    index in the list). An empty data set is an error."""
    if isinstance(data, (str, Path)):
        return read_records(data, split=split)
    rows = [(f"record {i}", r) for i, r in enumerate(data)]
    if not rows:
        raise DataSourceError("the data set is empty")
    return rows


def resolve_format(rows: list[tuple[str, dict]], fmt: str, detect, formats: Sequence[str]) -> str:
    """``fmt``, or with ``auto`` the format ``detect`` reads off the first record (its errors name the record);
    a format not in ``formats`` is an error."""
    if fmt == "auto":
        where, first = rows[0]
        try:
            return detect(first)
        except DataFormatError as e:
            raise DataFormatError(f"{where}: {e}") from None
    if fmt not in formats:
        raise DataFormatError(f"unknown data format {fmt!r}; choose one of auto, {', '.join(formats)}")
    return fmt


def load_records(data: str | Path | Sequence[dict], fmt: str = "auto", split: str | None = None) -> tuple[list[dict], str]:
    """Read and check every record of ``data`` (a path or a list of dicts) for format ``fmt``.

    ``fmt="auto"`` detects the format from the first record. Every record is checked, so a bad one anywhere in
    the file is reported with its file and line before any model is loaded.
    """
    rows = record_rows(data, split)
    fmt = resolve_format(rows, fmt, detect_format, FORMATS)
    for where, record in rows:
        check_record(record, fmt, where)
    return [r for _, r in rows], fmt


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on ``(seed, epoch)``, optionally sharded over data-parallel ranks.

    Every rank sees ``ceil(n / num_replicas)`` indices (padded by wrapping, as ``DistributedSampler`` does).
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.resume: tuple[int, int] | None = None  # (epoch, indices already used): skipped once, when resuming

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = len(self) * self.num_replicas
        order = (order * math.ceil(total / max(len(order), 1)))[:total]
        mine = order[self.rank : total : self.num_replicas]
        if self.resume is not None and self.resume[0] == self.epoch:
            mine = mine[self.resume[1] :]
            self.resume = None
        return iter(mine)


class CausalLMDataModule(pl.LightningDataModule):
    """Tokenize records into next-token samples and serve packed (or padded) batches.

    Args:
        tokenizer: a Hugging Face tokenizer (its pad token is set to EOS if it has none).
        train_data: a data file/folder path, or a list of records.
        val_data: same, optional; or give ``val_fraction`` to hold out part of ``train_data``.
        data_format: ``auto``, ``text``, ``prompt_completion`` or ``messages``.
        max_length: inputs longer than this many tokens are truncated (counted and logged).
        batch_size: micro-batch size; gradient accumulation is the Trainer's ``accumulate_grad_batches``.
        seed: the shuffling (and hold-out) seed; the order depends only on the seed and the epoch.
        packing: pack each micro-batch's samples into rows, padding-free (:mod:`hfbridge.data.packing`): the same
            samples, loss and gradients as padding, less compute. ``"auto"`` (default) packs when the model being
            fitted is checked to keep packed samples apart, and pads otherwise (logged); ``True`` packs (an error
            if the model is checked and does not); ``False`` pads.
        pack_length: tokens per packed row; default ``max_length`` (or the longest sample of the micro-batch).
    """

    def __init__(
        self,
        tokenizer,
        train_data: DataArg,
        val_data: DataArg = None,
        data_format: str = "auto",
        max_length: int | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        val_fraction: float = 0.0,
        seed: int = 42,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        packing: bool | str = "auto",
        pack_length: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if packing not in (True, False, "auto"):
            raise ValueError(f"packing must be True, False or 'auto', got {packing!r}")
        if pack_length is not None and max_length is not None and pack_length < max_length:
            raise ValueError(f"pack_length ({pack_length}) must be at least max_length ({max_length})")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.tokenizer = tokenizer
        self.pad_token_id = pad_id(tokenizer)  # the caller's tokenizer is not changed
        self.train_records, self.data_format = self._load_records(train_data, data_format)
        self.val_records = None
        if val_data is not None:
            self.val_records, _ = self._load_records(val_data, self.data_format)
        elif val_fraction > 0:
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(self.train_records), generator=g).tolist()
            n_val = max(1, int(len(order) * val_fraction))
            self.val_records = [self.train_records[i] for i in order[:n_val]]
            self.train_records = [self.train_records[i] for i in sorted(order[n_val:])]
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.collator = PaddedCollator(self.pad_token_id, pad_to_multiple_of)
        self.packing = packing
        self.packed_collator = PackedCollator(
            self.pad_token_id, pack_length or max_length, pad_to_multiple_of=pad_to_multiple_of
        )
        self._packing_decision: bool | None = None
        self.train_samples: list[TokenizedSample] | None = None
        self.val_samples: list[TokenizedSample] | None = None
        if self.val_records:
            # Lightning runs validation only where a val_dataloader is defined, so define it only with data.
            self.val_dataloader = self._val_dataloader

    def _load_records(self, data: DataArg, data_format: str) -> tuple[list, str]:
        """Read and check every record (:func:`load_records`); data modules for other kinds of record override
        this and :meth:`_tokenize`."""
        return load_records(data, data_format)

    def _tokenize_records(self, records: list[dict], split: str) -> list[TokenizedSample]:
        """Every record's sample, in order (a hook: a mixture tokenizes source by source, through a cache)."""
        return [tokenize_record(self.tokenizer, r, self.data_format, self.max_length) for r in records]

    def _tokenize(self, records: list[dict], split: str) -> list[TokenizedSample]:
        samples = self._tokenize_records(records, split)
        truncated = sum(s.truncated for s in samples)
        if truncated:
            log.warning(
                "%s: %d of %d samples were longer than max_length=%s tokens and were truncated",
                split, truncated, len(samples), self.max_length,
            )
        kept = [s for s in samples if s.num_label_tokens > 0]
        if len(kept) < len(samples):
            log.warning("%s: %d samples have no trained token left and were dropped", split, len(samples) - len(kept))
        if not kept:
            raise DataSourceError(f"{split}: no sample has a token to train on")
        return kept

    def setup(self, stage: str | None = None) -> None:
        if self.train_samples is None:
            self.train_samples = self._tokenize(self.train_records, "train")
        if self.val_records is not None and self.val_samples is None:
            self.val_samples = self._tokenize(self.val_records, "validation")

    def _dp_rank_and_size(self) -> tuple[int, int]:
        """This process's data shard: its ``(dp, fsdp)`` coordinate under a model-parallel strategy (the
        tensor/sequence-parallel ranks of one group see the same batch), else its global rank."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        strategy = trainer.strategy
        rank = getattr(strategy, "data_parallel_rank", None)
        size = getattr(strategy, "data_parallel_size", None)
        if rank is None or size is None:
            try:  # Lightning's ModelParallelStrategy and DDP say it through their sampler arguments
                kwargs = strategy.distributed_sampler_kwargs or {}
            except (AttributeError, RuntimeError):
                kwargs = {}
            rank, size = kwargs.get("rank"), kwargs.get("num_replicas")
        if rank is None or size is None:
            rank, size = trainer.global_rank, trainer.world_size
        return rank, size

    def resume_at(self, epoch: int, batches: int) -> None:
        """Start the training data of ``epoch`` after its first ``batches`` micro-batches (set when resuming from a
        checkpoint, see :mod:`hfbridge.parallel.checkpoint`)."""
        self._resume_position = (int(epoch), int(batches))
        sampler = getattr(self, "_train_sampler", None)
        if sampler is not None:  # Lightning built the loader before restoring the checkpoint: tell its sampler
            sampler.resume = (int(epoch), int(batches) * self.batch_size)
            self._resume_position = None

    def _accumulate(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.accumulate_grad_batches if trainer is not None else 1

    def _model(self):
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        return getattr(module, "model", None)

    def _packing_check(self, model) -> tuple[bool, str]:
        """``(ok, reason)``: whether ``model`` keeps packed samples apart (run once, before the first batch)."""
        return packing_is_exact(model)

    def use_packing(self) -> bool:
        """Whether batches are packed: ``packing`` resolved against the model being fitted (decided once)."""
        if self._packing_decision is not None:
            return self._packing_decision
        model = self._model()
        if model is None:
            decided = self.packing is True
            if self.packing == "auto":
                log.info("packing: off (no model attached to check that packed samples stay apart); batches are padded")
        elif self.packing is False:
            decided = False
        else:
            ok, reason = self._packing_check(model)
            if not ok and self.packing is True:
                raise ValueError(f"packing=True, but this model cannot be packed exactly: {reason}")
            decided = ok
            # in the logger of the data module's own module (image-text: hfbridge.data.image_text)
            logging.getLogger(type(self).__module__).info("packing: %s (%s)", "on" if ok else "off, batches are padded",
                                                          reason)
            if ok and uses_flash_attention(model):
                self.packed_collator.one_row = True  # variable-length flash attention takes the batch as one row
        self._packing_decision = decided
        return decided

    def _collate(self):
        return self.packed_collator if self.use_packing() else self.collator

    def train_dataloader(self):
        self.setup("fit")
        rank, size = self._dp_rank_and_size()
        sampler = EpochShuffleSampler(len(self.train_samples), self.seed, True, size, rank)
        self._train_sampler = sampler
        position = getattr(self, "_resume_position", None)
        if position is not None:
            sampler.resume = (position[0], position[1] * self.batch_size)
            self._resume_position = None
        loader = DataLoader(
            self.train_samples, batch_size=self.batch_size, sampler=sampler,
            collate_fn=self._collate(), num_workers=self.num_workers,
        )
        return StepTokenCounter(loader, self._accumulate(), self._step_counts())

    def _step_counts(self):
        """What each batch is stamped with, summed over its optimizer step (``None``: its label tokens)."""
        return None

    def _val_dataloader(self):
        self.setup("validate")
        rank, size = self._dp_rank_and_size()
        sampler = EpochShuffleSampler(len(self.val_samples), self.seed, False, size, rank)
        return DataLoader(
            self.val_samples, batch_size=self.val_batch_size, sampler=sampler,
            collate_fn=self._collate(), num_workers=self.num_workers,
        )

"""Batch tokenized samples, and count the label tokens of each optimizer step.

Padding is never trained: padded label positions are ``-100``. :class:`StepTokenCounter` stamps every
micro-batch with the number of label tokens in its whole optimizer step (all micro-batches of one gradient
accumulation group), which :class:`hfbridge.HFAutoModelForCausalLM` uses to normalise the loss per token rather
than per micro-batch at once (batches without it are normalised after the step's last backward instead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from hfbridge.data.formats import TokenizedSample
from hfbridge.losses import IGNORE_INDEX, NUM_LABEL_TOKENS_KEY, count_label_tokens


@dataclass
class PaddedCollator:
    """Right-pad ``input_ids`` with ``pad_token_id`` and ``labels`` with -100; build the attention mask."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    sequence_ids: bool = False  # also return which sample each position belongs to (-1: padding)

    def __call__(self, samples: Sequence[TokenizedSample]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        length = max(len(s.input_ids) for s in samples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        ids = torch.full((len(samples), length), -1, dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample.input_ids)
            input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
            labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
            attention_mask[row, :n] = 1
            ids[row, :n] = row
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.sequence_ids:
            batch["sequence_ids"] = ids
        return batch


def label_token_count(batch: dict) -> int:
    """The batch's label tokens (label != -100 and loss_mask != 0), as the loss counts them."""
    return count_label_tokens(batch["labels"], batch.get("loss_mask"))


class StepTokenCounter:
    """Wrap a data loader so each batch carries the label-token count of its optimizer step.

    Batches are read ``accumulate_grad_batches`` at a time (the group Lightning accumulates into one optimizer
    step, aligned from the start of the epoch as Lightning aligns it; a shorter last group is counted as it
    is). Each batch of a group gets ``batch["num_label_tokens"]``, the total over the group; ``counts`` names
    other totals to stamp the same way (``{key: count(batch)}``, for example the preference pairs of a step).
    """

    def __init__(self, loader: Iterable, accumulate_grad_batches: int = 1,
                 counts: dict[str, Callable[[dict], int]] | None = None):
        if accumulate_grad_batches < 1:
            raise ValueError("accumulate_grad_batches must be at least 1")
        self.loader = loader
        self.accumulate_grad_batches = accumulate_grad_batches
        self.counts = counts if counts is not None else {NUM_LABEL_TOKENS_KEY: label_token_count}
        # Lightning sets the epoch on these for deterministic shuffling.
        self.sampler = getattr(loader, "sampler", None)
        self.batch_sampler = getattr(loader, "batch_sampler", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        group: list[dict] = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.accumulate_grad_batches:
                yield from self._stamp(group)
                group = []
        if group:
            yield from self._stamp(group)

    def _stamp(self, group: list[dict]) -> list[dict]:
        for key, count in self.counts.items():
            total = sum(count(b) for b in group)
            for batch in group:
                batch[key] = torch.tensor(total, dtype=torch.long)
        return group

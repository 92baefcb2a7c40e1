"""Padding-free packing: several samples share a row, and attention never crosses from one sample to another.

A packed micro-batch holds the same samples as the padded one would, laid out in as few rows of at most
``pack_length`` tokens as best-fit decreasing finds. ``position_ids`` restart at 0 at every sample, and there is
no ``attention_mask``: from restarting positions, Hugging Face models build a block-diagonal causal mask (sdpa and
eager, see ``transformers.masking_utils.find_packed_sequence_indices``) or call variable-length flash attention.
Labels are shifted per sample before packing (:func:`hfbridge.data.formats.shift_for_causal_lm`), so no target
crosses a boundary, and the loss and gradients of a packed batch equal those of the same samples padded.

Whether a model really masks that way is checked numerically by :func:`packing_is_exact`, since a model that
ignores ``position_ids`` would silently attend across samples.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hfbridge._shared import eager
from hfbridge.data.formats import TokenizedSample
from hfbridge.losses import IGNORE_INDEX

log = logging.getLogger(__name__)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins whose lengths sum to at most ``capacity`` (best-fit decreasing).

    Items are placed longest first (ties by index, so the result is deterministic) into the bin with the least
    room that still fits them. Bins are returned in the order they were opened, their items in placement order.
    """
    if capacity < 1:
        raise ValueError(f"pack capacity must be at least 1, got {capacity}")
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(
            f"a sample of {max(too_long)} tokens does not fit in a packed row of {capacity}: set pack_length to at "
            "least max_length (or truncate the samples with max_length)"
        )
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            left, b = room.pop(at)
        else:
            left, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(room, (left - n, b))
    return bins


@dataclass
class PackedCollator:
    """Pack a micro-batch's samples into rows of at most ``pack_length`` tokens, padding-free.

    Returns ``input_ids``, ``labels`` and ``position_ids`` (restarting at each sample) and no ``attention_mask``.
    Rows shorter than the longest are padded at the end with ``pad_token_id``, label -100, and positions that
    restart at 0 (so the padding is a segment of its own that no real token attends to).

    Args:
        pad_token_id: the padding token.
        pack_length: the row capacity; ``None`` is the longest sample of the micro-batch.
        one_row: put the whole micro-batch in a single row (variable-length flash attention takes its batch as one
            row); ``pack_length`` is then ignored.
        pad_to_multiple_of: pad the rows' length to a multiple of this (fewer shapes for compiled models).
    """

    pad_token_id: int
    pack_length: int | None = None
    one_row: bool = False
    pad_to_multiple_of: int | None = None
    sequence_ids: bool = False  # also return which sample each position belongs to (-1: padding)

    def rows(self, samples: Sequence[TokenizedSample]) -> list[list[int]]:
        """The sample indices of each row."""
        lengths = [len(s.input_ids) for s in samples]
        if self.one_row:
            return [list(range(len(samples)))]
        return best_fit_decreasing(lengths, self.pack_length or max(lengths))

    def __call__(self, samples: Sequence[TokenizedSample]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        rows = self.rows(samples)
        width = max(sum(len(samples[i].input_ids) for i in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        ids = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = len(samples[i].input_ids)
                input_ids[r, start : start + n] = torch.tensor(samples[i].input_ids, dtype=torch.long)
                labels[r, start : start + n] = torch.tensor(samples[i].labels, dtype=torch.long)
                position_ids[r, start : start + n] = torch.arange(n)
                ids[r, start : start + n] = i
                start += n
            position_ids[r, start:] = torch.arange(width - start)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.sequence_ids:
            batch["sequence_ids"] = ids
        return batch


def packing_is_exact(model: nn.Module, rtol: float | None = None) -> tuple[bool, str]:
    """Check numerically that ``model`` keeps packed samples apart: the logits of two short random samples packed
    in one row (with restarting ``position_ids``, no attention mask) must equal their logits run one at a time.

    Returns ``(ok, reason)``. Runs two tiny forwards in eval mode without gradients; the model's mode is restored.
    """
    try:
        param = next(model.parameters())
        vocab = model.get_input_embeddings().num_embeddings
    except (StopIteration, AttributeError, NotImplementedError) as e:
        return False, f"cannot probe the model ({type(e).__name__}: {e})"
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab, (n,), generator=g).to(param.device) for n in (5, 4))
    positions = torch.cat([torch.arange(5), torch.arange(4)]).to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), eager():
            alone = torch.cat([model(input_ids=x[None], use_cache=False).logits[0] for x in (a, b)]).float()
            packed = model(input_ids=torch.cat([a, b])[None], position_ids=positions[None], use_cache=False)
            packed = packed.logits[0].float()
    except Exception as e:  # any model that cannot take packed inputs is simply not packed
        return False, f"the model rejects packed inputs ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    if rtol is None:
        rtol = 1e-4 if param.dtype == torch.float32 else 3e-2
    err = float((packed - alone).abs().max())
    scale = float(alone.abs().max().clamp(min=1.0))
    if err > rtol * scale:
        return False, f"packed logits differ from per-sample logits by {err:.3g} (the attention crosses samples)"
    return True, "packed logits equal per-sample logits"


def uses_flash_attention(model: nn.Module) -> bool:
    """Whether the model runs variable-length attention (a flash-attention kernel, or hfbridge's per-sample SDPA,
    :mod:`hfbridge.models.varlen_attention`), which takes a packed micro-batch as one row with no padding."""
    from hfbridge.models.varlen_attention import NAME

    config = getattr(model, "config", None)
    impl = str(getattr(config, "_attn_implementation", None) or "")
    return "flash" in impl or impl == NAME

"""``NativeCache``: what ``generate`` carries between steps for a native model that keeps no transformers cache.

``generate`` hands the model a fresh transformers ``Cache`` (a ``DynamicCache`` in transformers 5) and then feeds it
only the newest token each step. A native model either keeps no cache at all, or keeps its own KV cache indexed by
a start position (``start_pos``). For both, the wrapper swaps the empty transformers cache for a ``NativeCache``,
which is a ``Cache`` (so ``generate`` treats it as one) holding the token ids (and positions) seen so far:

* no cache in the native model: every step recomputes the whole sequence from these tokens;
* a cache inside the native model: every step runs the new tokens at ``start_pos = get_seq_length()``. When beam
  search reorders the beams (``reorder_cache``), the tokens are reordered too and the next step recomputes the
  whole sequence from ``start_pos=0``, which rewrites the native cache in the new beam order -- unless the adapter
  reorders the native cache itself (``HFDecoder.reorder_cache`` returning ``True``).
"""

from __future__ import annotations

import itertools

import torch
from transformers.cache_utils import Cache

_serials = itertools.count(1)


class NativeCache(Cache):
    """Token history of one generation, standing in for a transformers KV cache (see the module docstring)."""

    def __init__(self, reorder_hook=None):
        super().__init__(layers=[])
        self.tokens: torch.Tensor | None = None  # (batch, seen)
        self.positions: torch.Tensor | None = None  # (batch, seen), or None when the model takes no positions
        self.needs_recompute = False  # the native cache no longer matches ``tokens`` (reordered, cropped, ...)
        self.serial = next(_serials)  # which generation last wrote the native cache
        self._reorder_hook = reorder_hook

    # ------------------------------------------------------------------ bookkeeping used by the wrappers
    def append(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens], dim=-1)
        if positions is not None:
            self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=-1)

    # ------------------------------------------------------------------ the transformers Cache interface
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.tokens is None else int(self.tokens.shape[-1])

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def _select(self, index: torch.Tensor) -> None:
        if self.tokens is not None:
            self.tokens = self.tokens.index_select(0, index.to(self.tokens.device))
        if self.positions is not None:
            self.positions = self.positions.index_select(0, index.to(self.positions.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the histories of the chosen beams; the native cache is reordered by the adapter's
        hook if it has one, else recomputed at the next step."""
        if self.tokens is None:
            return
        identity = torch.arange(self.tokens.shape[0], device=beam_idx.device)
        if beam_idx.shape == identity.shape and torch.equal(beam_idx, identity):
            return
        self._select(beam_idx)
        if not (self._reorder_hook is not None and not self.needs_recompute and self._reorder_hook(beam_idx)):
            self.needs_recompute = True

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)
        self.needs_recompute = True

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.tokens is not None:
            self.tokens = self.tokens.repeat_interleave(repeats, dim=0)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
        self.needs_recompute = True

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove <= 0 or self.tokens is None:
            return
        keep = max(self.get_seq_length() - tokens_to_remove, 0)
        self.tokens = self.tokens[:, :keep]
        if self.positions is not None:
            self.positions = self.positions[:, :keep]
        self.needs_recompute = True

    def reset(self) -> None:
        self.tokens = self.positions = None
        self.needs_recompute = False

    @property
    def is_croppable(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"NativeCache(seen={self.get_seq_length()}, needs_recompute={self.needs_recompute})"

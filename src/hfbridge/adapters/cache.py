"""Generation state of native models between forward calls, and where transformers outputs keep a cache.

A native model either keeps no cache at all, or keeps its own KV cache indexed by a start position (``start_pos``).
For both, the wrapper's forward carries a :class:`NativeCache` from call to call (``past_key_values``): the token
ids (and positions) seen so far. hfbridge's decoding loop (:mod:`hfbridge.adapters.decoding`) and users calling the
forward step by step hand it back at the next call:

* no cache in the native model: every step recomputes the whole sequence from these tokens;
* a cache inside the native model: every step runs the new tokens at ``start_pos = get_seq_length()``. When beam
  search reorders the beams (``reorder_cache``), the tokens are reordered too and the next step recomputes the
  whole sequence from ``start_pos=0``, which rewrites the native cache in the new beam order -- unless the adapter
  reorders the native cache itself (``HFDecoder.reorder_cache`` returning ``True``).

``NativeCache`` is a plain object, not a transformers ``Cache``: nothing in transformers has to understand it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import torch

_serials = itertools.count(1)


class NativeCache:
    """Token history of one generation, standing in for a KV cache (see the module docstring)."""

    def __init__(self, reorder_hook: Callable[[torch.Tensor], bool] | None = None):
        self.tokens: torch.Tensor | None = None  # (batch, seen)
        self.positions: torch.Tensor | None = None  # (batch, seen), or None when the model takes no positions
        self.needs_recompute = False  # the native cache no longer matches ``tokens`` (reordered)
        self.serial = next(_serials)  # which generation last wrote the native cache
        self._reorder_hook = reorder_hook

    def append(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Record the tokens (and positions) just run."""
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens], dim=-1)
        if positions is not None:
            self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=-1)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of tokens seen so far."""
        return 0 if self.tokens is None else int(self.tokens.shape[-1])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the histories of the chosen beams; the native cache is reordered by the adapter's
        hook if it has one, else recomputed at the next step."""
        if self.tokens is None:
            return
        identity = torch.arange(self.tokens.shape[0], device=beam_idx.device)
        if beam_idx.shape == identity.shape and torch.equal(beam_idx, identity):
            return
        self.tokens = self.tokens.index_select(0, beam_idx.to(self.tokens.device))
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
        if not (self._reorder_hook is not None and not self.needs_recompute and self._reorder_hook(beam_idx)):
            self.needs_recompute = True

    def __repr__(self) -> str:
        return f"NativeCache(seen={self.get_seq_length()}, needs_recompute={self.needs_recompute})"


# ============================================================================================ output fields
def cache_field(output_class: type) -> str | None:
    """The field of a transformers output dataclass that holds the cache: ``cache`` (transformers >= 5.24),
    ``past_key_values`` (earlier releases), or ``None`` when it has neither."""
    if not dataclasses.is_dataclass(output_class):
        return None
    names = {f.name for f in dataclasses.fields(output_class)}
    return next((name for name in ("cache", "past_key_values") if name in names), None)


def output_cache(output: Any) -> Any:
    """The cache an output dataclass carries (``None`` if it carries none)."""
    field = cache_field(type(output))
    return None if field is None else getattr(output, field, None)


def with_cache(output_class: type, cache: Any, **fields: Any) -> Any:
    """``output_class(**fields)`` with ``cache`` under the field name this transformers release uses."""
    field = cache_field(output_class)
    if field is not None:
        fields[field] = cache
    return output_class(**fields)

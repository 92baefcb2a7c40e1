"""Per-sample attention for packed rows with PyTorch's SDPA, on any device (variable-length attention without
flash-attn).

A packed row holds several samples; ``position_ids`` restart at 0 at each one. With the stock ``sdpa``
implementation, transformers turns that into a ``tokens x tokens`` block-diagonal mask for every row, and SDPA
computes attention over the whole row with it: the cross-sample blocks are computed and thrown away, the mask
blocks the kernels that take ``is_causal``, and grouped-query keys and values are copied to every query head
(``repeat_kv``), copies that backward keeps. The ``hfbridge_varlen`` implementation registered here takes the
row's samples from its ``position_ids`` and runs causal SDPA on each sample alone (transformers' own
``sdpa_attention_forward`` on a slice, no mask, keys and values shared across the head groups), which is
what variable-length flash attention does on a GPU. So a micro-batch can be one row with no padding at all (as
:class:`hfbridge.data.packing.PackedCollator` lays it out for flash attention).

Everything else is the stock ``sdpa`` path: a padding or custom 4-D mask (generation, preference rows that share a
prompt), a KV cache, one query. It is switched on only for models whose every layer is plain causal full attention
(no sliding window, no bidirectional blocks), and the data module's packing check
(:func:`hfbridge.data.packing.packing_is_exact`) runs through it before any packed batch is trained.
"""

from __future__ import annotations

import torch

NAME = "hfbridge_varlen"
_REGISTERED = False


def register() -> None:
    """Register the attention and its mask function with transformers (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_sdpa_attention)
    AttentionMaskInterface.register(NAME, _mask)
    _REGISTERED = True


def _mask(batch_size, q_length, kv_length, *args, attention_mask=None, **kwargs):
    """No mask where the rows hold no padding and no cache (the attention finds the samples from the positions);
    otherwise the stock ``sdpa`` mask."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not args and not kwargs.get("q_offset") and not kwargs.get(
            "kv_offset"):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, *args, attention_mask=attention_mask, **kwargs)


_LAST: list = [None, None]  # ((position_ids, key), segments): every layer of a forward gets the same tensor


def segments(position_ids: torch.Tensor, batch: int | None = None,
             length: int | None = None) -> list[list[tuple[int, int]]]:
    """``[(start, end), ...]`` of each of ``batch`` rows (``position_ids`` broadcast to it) over their last
    ``length`` positions: a new sample starts wherever the position does not follow the last. Found once per
    forward: the layers after the first get the same ``position_ids`` tensor, unchanged."""
    key = (position_ids._version, batch, length)
    cached = _LAST[0]
    if cached is not None and cached[0] is position_ids and cached[1] == key:
        return _LAST[1]
    if batch is not None and position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    out = _segments(position_ids if length is None else position_ids[:, -length:])
    _LAST[:] = [(position_ids, key), out]
    return out


def _segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    rows = position_ids.tolist()
    out = []
    for row in rows:
        starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1] + 1]
        out.append(list(zip(starts, starts[1:] + [len(row)])))
    return out


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """transformers' attention-function signature; ``query``: ``(batch, heads, tokens, head_dim)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    length = query.shape[2]
    if attention_mask is not None or position_ids is None or key.shape[2] != length or length < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch = query.shape[0]
    rows = segments(position_ids, batch, length)
    if all(len(row) == 1 for row in rows):  # no row is packed: one causal call
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    outputs = []
    for b, row in enumerate(rows):
        parts = [
            sdpa_attention_forward(module, query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e],
                                   None, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)[0]
            for s, e in row
        ]
        outputs.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return (torch.cat(outputs, dim=0) if batch > 1 else outputs[0]), None


def eligible(model) -> tuple[bool, str]:
    """Whether ``model`` can take ``hfbridge_varlen``: sdpa now, and every layer plain causal full attention."""
    config = getattr(model, "config", None)
    if config is None:
        return False, "the model has no config"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False, f"its attention is {getattr(config, '_attn_implementation', None)!r}, not 'sdpa'"
    if getattr(config, "is_encoder_decoder", False) or text is not config:
        return False, "not a decoder-only text model"
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False, "it has sliding-window attention layers"
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return False, f"its layers are {sorted(kinds)}, not only full attention"
    return True, "plain causal attention"


def enable(model) -> tuple[bool, str]:
    """Switch an eligible model from ``sdpa`` to ``hfbridge_varlen``; ``(switched, reason)``."""
    ok, reason = eligible(model)
    if not ok:
        return False, reason
    register()
    model.set_attn_implementation(NAME)
    return True, reason

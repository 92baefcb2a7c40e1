"""Context parallelism: the ``cp`` mesh axis splits every sequence of a micro-batch over its ranks.

Each ``cp`` rank keeps ``1/cp`` of the tokens of every row, so the activations of a long sequence (the residual
stream, MLP intermediates, attention outputs, logits) are spread over the ranks. Attention stays exact: each layer
all-gathers the keys and values of the whole sequence over the ``cp`` ranks (one collective per layer, its
backward a reduce-scatter), and the local queries attend to them:

* on the CPU, rows with no padding or padding at the end only, packed or not: block by block, with no mask at
  all (:func:`causal_blocks_attention`): each local query chunk (in packed rows, each piece of a sample in it) runs
  the CPU flash-attention kernel on the keys before it (of its sample) and, causally, on its own keys, and the two
  are merged by their log-sum-exp; memory grows as ``S/cp`` plus the gathered ``S`` keys and values, never ``S^2``;
* left-padded rows, and any device other than the CPU: under a dense mask built once per micro-batch from the
  global token positions (causal; per sample for packed rows; padded keys masked, as transformers masks them).

Load balance for causal attention: the row (padded at the end to a multiple of ``2 * cp``, with untrained tokens)
is cut into ``2 * cp`` chunks and rank ``r`` takes chunks ``r`` and ``2*cp - 1 - r`` (the "head-tail" layout of
ring attention), so every rank attends to about the same number of keys.

Why not torch's ``context_parallel`` (ring attention): on CPU it fails at the first attention call with
``NotImplementedError: Operator aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding
strategy registered.`` (torch 2.13: its ring handlers cover the CUDA flash, efficient and cuDNN kernels only), and
it takes no attention mask, so padded and packed batches could not use it either.

The loss: each rank computes the loss of its own tokens; :meth:`ContextParallel.combine` sums the token losses and
counts over the ``cp`` ranks, so every ``cp`` rank returns the loss of the whole micro-batch (like the ``tp`` ranks,
the ``cp`` ranks of a group share a batch and are not data-parallel ranks). Gradients flow only into the rank's own
part; FSDP2 shards over ``fsdp x cp`` and averages over it, and the backward of the sum multiplies by ``cp`` so the
average over ``cp`` becomes the sum of the parts.

The model layer never imports this module: :class:`hfbridge.parallel.mesh_plan.MeshPlan` hands a
:class:`ContextParallel` to the module (``context_parallel(mesh)``), whose ``_loss`` calls :meth:`~ContextParallel.shard`
and :meth:`~ContextParallel.combine`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ATTENTION = "hfbridge_cp"  # the transformers attention implementation registered here: sdpa + K/V all-gather
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # decoder layouts checked with context parallelism
SEQUENCE_KEYS = ("input_ids", "labels", "loss_mask", "position_ids")
IGNORE_INDEX = -100


class ContextParallelError(ValueError):
    """A model or batch that context parallelism cannot split; the message says why and what to use."""


# ------------------------------------------------------------------------------------------- splitting a batch
def chunk_indices(length: int, cp: int, rank: int) -> torch.Tensor:
    """The positions rank ``rank`` of ``cp`` keeps of a row of ``length`` tokens (a multiple of ``2 * cp``): chunks
    ``rank`` and ``2*cp - 1 - rank`` of ``2 * cp`` equal chunks."""
    if length % (2 * cp):
        raise ContextParallelError(f"a row of {length} tokens cannot be cut into 2*cp={2 * cp} equal chunks")
    size = length // (2 * cp)
    head, tail = rank * size, (2 * cp - 1 - rank) * size
    return torch.cat([torch.arange(head, head + size), torch.arange(tail, tail + size)])


def key_order(length: int, cp: int) -> torch.Tensor:
    """The global positions of the all-gathered keys: every rank's :func:`chunk_indices`, in rank order."""
    return torch.cat([chunk_indices(length, cp, r) for r in range(cp)])


def sample_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which packed sample each token belongs to: a new one wherever the positions do not go up by one (as
    transformers' ``find_packed_sequence_indices`` reads packed rows)."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def _pad_rows(batch: dict, length: int, pad: int) -> dict:
    """Every sequence tensor padded at the end by ``pad`` untrained tokens (masked keys; positions go on)."""
    out = dict(batch)
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[1] != length:
            continue
        if key == "position_ids":
            more = value[:, -1:] + torch.arange(1, pad + 1, device=value.device)
        else:
            fill = IGNORE_INDEX if key == "labels" else 0
            more = torch.full((value.shape[0], pad, *value.shape[2:]), fill, dtype=value.dtype, device=value.device)
        out[key] = torch.cat([value, more], dim=1)
    return out


def shard_batch(batch: Mapping[str, Any], cp: int, rank: int) -> dict:
    """Rank ``rank``'s part of every row of ``batch`` (``input_ids`` ``[B, S]``, optional ``attention_mask``,
    ``position_ids``, ``labels``, ``loss_mask``, other ``[B, S, ...]`` tensors), with a 4-D boolean
    ``attention_mask`` ``[B or 1, 1, S/cp, S]``: which of the all-gathered keys each local query attends to.

    Rows are padded at the end to a multiple of ``2 * cp`` (labels -100, keys masked), so any length works; the
    positions are the global ones (``arange`` when the batch has none, as the model would use)."""
    if "input_ids" not in batch:
        raise ContextParallelError(f"context parallelism splits input_ids; this batch has {sorted(batch)}")
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ContextParallelError(f"context parallelism needs input_ids of shape [batch, sequence], got {tuple(ids.shape)}")
    mask2d = batch.get("attention_mask")
    if mask2d is not None and mask2d.dim() != 2:
        raise ContextParallelError(
            f"context parallelism builds its own attention mask and takes a 2-D padding mask, not one of shape "
            f"{tuple(mask2d.shape)}"
        )
    rows, length = ids.shape
    out = dict(batch)
    if out.get("position_ids") is None:
        out["position_ids"] = torch.arange(length, device=ids.device).expand(rows, length)
    elif out["position_ids"].shape[0] != rows:
        out["position_ids"] = out["position_ids"].expand(rows, -1)
    pad = -length % (2 * cp)
    if pad:
        out = _pad_rows(out, length, pad)
        length += pad
    device = ids.device
    local = chunk_indices(length, cp, rank).to(device)
    packed = batch.get("position_ids") is not None and mask2d is None
    positions, padding = out["position_ids"], out.get("attention_mask") if mask2d is not None else None
    dense = (lambda: _dense_allowed(positions, padding, packed, local, length, cp))  # noqa: E731
    if device.type == "cpu" and (mask2d is None or bool((mask2d[:, 1:] <= mask2d[:, :-1]).all())):
        # no padding, or padding at the end only (a real query never reaches a later padded key): block by block
        segments = sample_segments(out["position_ids"], length, cp, rank) if packed else None
        allowed = blockwise_marker(rows, length, cp, rank, segments, dense, device)
    else:
        allowed = dense()
    for key, value in out.items():
        if key != "attention_mask" and isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == length:
            out[key] = value[:, local]
    out["attention_mask"] = allowed
    return out


Segment = tuple[int, int, int, int, int]  # local queries [q0, q1); global keys [before, start) in full, [start, end) causal


def sample_segments(positions: torch.Tensor, length: int, cp: int, rank: int) -> list[list[Segment]] | None:
    """Per row, the pieces of this rank's two chunks that lie in one packed sample each, in local order:
    ``(q0, q1, before, start, end)``: local queries ``q0:q1`` are the global tokens ``start:end`` of a sample that
    begins at ``before`` (``before < start`` when it began in an earlier chunk). ``None`` when every row holds one
    sample (the whole-row kernel applies)."""
    sample = sample_ids(positions)
    if bool((sample == 0).all()):
        return None
    size = length // (2 * cp)
    rows = []
    for ids in sample.tolist():
        first = {}  # the first global position of each sample
        for pos, s in enumerate(ids):
            first.setdefault(s, pos)
        row = []
        for part, chunk in enumerate((rank, 2 * cp - 1 - rank)):
            begin = chunk * size
            start = begin
            for pos in range(begin + 1, begin + size + 1):
                if pos == begin + size or ids[pos] != ids[start]:
                    row.append((part * size + start - begin, part * size + pos - begin, first[ids[start]], start, pos))
                    start = pos
        rows.append(row)
    return rows


def blockwise_marker(rows: int, length: int, cp: int, rank: int, segments: list | None, dense: Callable[[], torch.Tensor],
                     device=None) -> torch.Tensor:
    """The ``attention_mask`` of a split batch that :func:`causal_blocks_attention` computes block by block: a
    ``[rows, 1, S/cp, S]`` view of one element (no memory) carrying the layout (and, for packed rows, the samples'
    :func:`sample_segments`), so that no ``S/cp x S`` mask is built; ``dense()`` builds the mask it stands for,
    where the blockwise kernel cannot run (attention dropout in training)."""
    marker = torch.ones((), dtype=torch.bool, device=device).expand(rows, 1, length // cp, length)
    marker._hfbridge_cp_blocks = (length, cp, rank, segments)
    marker._hfbridge_cp_dense = dense
    return marker


def _blocks(mask: torch.Tensor | None) -> tuple | None:
    return getattr(mask, "_hfbridge_cp_blocks", None)


def _dense_allowed(positions: torch.Tensor, padding: torch.Tensor | None, packed: bool, local: torch.Tensor,
                   length: int, cp: int) -> torch.Tensor:
    """The boolean ``[B or 1, 1, S/cp, S]`` mask of which all-gathered keys each local query attends to, from the
    whole rows' ``positions`` and padding mask (``[B, S]``, padded to ``length``)."""
    keys = key_order(length, cp).to(local.device)
    allowed = keys[None, :] <= local[:, None]  # causal, in global positions: [S/cp, S]
    if padding is not None:  # a padding mask: padded keys are never attended (transformers' sdpa mask)
        allowed = allowed[None] & padding.bool()[:, keys][:, None, :]
    elif packed:  # packed rows (restarting positions): attention stays inside each sample
        sample = sample_ids(positions)
        allowed = allowed[None] & (sample[:, local][:, :, None] == sample[:, keys][:, None, :])
    else:
        allowed = allowed[None]
    return allowed[:, None]


# ------------------------------------------------------------------------------------------- collectives
class _GatherSequence(torch.autograd.Function):
    """All-gather ``[..., s, D]`` tensors along dim -2 over ``group`` (rank order); backward: the sum of every
    rank's gradient for this rank's part (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, size: int, rank: int) -> torch.Tensor:
        ctx.group, ctx.size, ctx.rank, ctx.local = group, size, rank, x.shape[-2]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        torch.distributed.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.distributed.get_backend(ctx.group) == "gloo":  # gloo has no reduce-scatter
            grad = grad.contiguous().clone()  # reduced in place: never the incoming gradient itself
            torch.distributed.all_reduce(grad, group=ctx.group)
            part = grad.narrow(-2, ctx.rank * ctx.local, ctx.local).contiguous()
        else:
            chunks = list(grad.split(ctx.local, dim=-2))
            part = torch.empty_like(chunks[ctx.rank])
            torch.distributed.reduce_scatter(part, [c.contiguous() for c in chunks], group=ctx.group)
        return part, None, None, None


class _SumOverContext(torch.autograd.Function):
    """The sum of a value over the ``cp`` ranks; backward: ``scale`` times the gradient, to this rank's part only."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, group, scale: float) -> torch.Tensor:
        ctx.scale = scale
        total = value.detach().clone()
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None, None


# ------------------------------------------------------------------------------------------- attention
_ACTIVE: dict[int, tuple[weakref.ref, ContextParallel]] = {}


def _context_of(module: nn.Module) -> ContextParallel | None:
    config = getattr(module, "config", None)
    entry = _ACTIVE.get(id(config))
    if entry is None or entry[0]() is not config:
        return None
    return entry[1]


_ADDITIVE: dict[str, tuple] = {}  # the additive form of the current micro-batch's mask, shared by every layer


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` (boolean) as sdpa's additive float mask (0 or -inf, as sdpa converts it), made once per micro-batch
    and dtype: sdpa would convert the boolean mask in every layer, and each layer's backward keeps its copy."""
    entry = _ADDITIVE.get("current")
    if entry is not None and entry[0]() is mask and entry[1] == dtype:
        return entry[2]
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    _ADDITIVE["current"] = (weakref.ref(mask), dtype, additive)
    return additive


def context_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs):
    """transformers' sdpa attention; under a split batch (a mask over ``cp`` times the local keys) the keys and
    values of all ``cp`` ranks are gathered first. Anything else (a whole sequence, generation) is plain sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    context = _context_of(module)
    if (context is not None and attention_mask is not None and attention_mask.dim() == 4
            and attention_mask.shape[-1] == key.shape[-2] * context.size != key.shape[-2]):
        if key.shape == value.shape:  # one collective for both
            both = _GatherSequence.apply(torch.stack([key, value]), context.group, context.size, context.rank)
            key, value = both[0], both[1]
        else:
            key = _GatherSequence.apply(key, context.group, context.size, context.rank)
            value = _GatherSequence.apply(value, context.group, context.size, context.rank)
        blocks = _blocks(attention_mask)
        if blocks is not None:
            dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
            if query.device.type == "cpu" and not dropout and kwargs.get("softcap") is None:
                out = causal_blocks_attention(query, key, value, *blocks[:3], kwargs.get("scaling"), blocks[3])
                return out.transpose(1, 2).contiguous(), None
            attention_mask = attention_mask._hfbridge_cp_dense()
        if attention_mask.dtype == torch.bool:
            attention_mask = _additive_mask(attention_mask, query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


class _CausalBlock(torch.autograd.Function):
    """Queries of one chunk attending to all keys before the chunk (no mask) and causally to the chunk's own keys:
    two calls of the CPU flash-attention kernel, merged by their log-sum-exp (as ring attention merges blocks).
    Backward runs the kernel's backward on each block with the merged output and log-sum-exp, which gives each
    block's exact share of the gradients."""

    @staticmethod
    def forward(ctx, query, key_before, value_before, key_own, value_own, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = flash(query, key_own, value_own, 0.0, True, scale=scale)
        if key_before.shape[-2]:
            out_before, lse_before = flash(query, key_before, value_before, 0.0, False, scale=scale)
            total = torch.logaddexp(lse, lse_before)
            out = (out * torch.exp(lse - total).unsqueeze(-1).to(out.dtype)
                   + out_before * torch.exp(lse_before - total).unsqueeze(-1).to(out.dtype))
            lse = total
        ctx.scale = scale
        ctx.save_for_backward(query, key_before, value_before, key_own, value_own, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key_before, value_before, key_own, value_own, out, lse = ctx.saved_tensors
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad = grad.contiguous()
        grad_query, grad_key, grad_value = backward(grad, query, key_own, value_own, out, lse, 0.0, True,
                                                    scale=ctx.scale)
        grad_key_before, grad_value_before = torch.zeros_like(key_before), torch.zeros_like(value_before)
        if key_before.shape[-2]:
            more, grad_key_before, grad_value_before = backward(grad, query, key_before, value_before, out, lse,
                                                                0.0, False, scale=ctx.scale)
            grad_query = grad_query + more
        return grad_query, grad_key_before, grad_value_before, grad_key, grad_value, None


@functools.lru_cache(maxsize=8)
def _global_order(length: int, cp: int) -> torch.Tensor:
    """Where each global position sits among the all-gathered keys (once per row length, not once per layer)."""
    return torch.argsort(key_order(length, cp))


def causal_blocks_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, length: int, cp: int,
                            rank: int, scaling: float | None = None,
                            segments: list[list[Segment]] | None = None) -> torch.Tensor:
    """Causal attention of this rank's queries (``[B, H, S/cp, D]``: chunks ``rank`` and ``2*cp-1-rank`` of the row,
    see :func:`chunk_indices`) over the all-gathered keys and values (``[B, H_kv, S, D]`` in :func:`key_order`),
    without an ``S/cp x S`` mask: per query chunk, the kernel runs on the keys before it and, causally, on its own.
    With packed rows (``segments``, see :func:`sample_segments`), per piece of a sample in a chunk: on the sample's
    keys before the chunk and, causally, on the piece's own, so attention stays inside each sample.
    Returns ``[B, H, S/cp, D]``."""
    size = length // (2 * cp)
    order = _global_order(length, cp).to(key.device)
    key, value = key.index_select(-2, order), value.index_select(-2, order)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if segments is None:
        segments_all = [[(part * size, (part + 1) * size, 0, chunk * size, (chunk + 1) * size)
                         for part, chunk in enumerate((rank, 2 * cp - 1 - rank))]]
        rows = [slice(None)]
    else:
        segments_all = segments
        rows = [slice(b, b + 1) for b in range(len(segments))]
    outs = []
    for row, pieces in zip(rows, segments_all):
        q, k, v = query[row], key[row], value[row]
        parts = [_CausalBlock.apply(q[:, :, q0:q1], k[:, :, before:start], v[:, :, before:start],
                                    k[:, :, start:end], v[:, :, start:end], scale)
                 for q0, q1, before, start, end in pieces]
        outs.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]


def register_attention() -> None:
    """Register :func:`context_attention` (and sdpa's mask for it) with transformers under :data:`ATTENTION`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, context_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


# ------------------------------------------------------------------------------------------- checks
def check_model(model: nn.Module, cp: int) -> None:
    """Refuse, before any weight is loaded, a model context parallelism cannot split exactly: it needs sdpa
    attention (transformers' attention interface) and the full causal attention of the Llama-family decoders."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ContextParallelError(
            f"context parallelism (cp={cp}) is implemented for the decoders of {', '.join(FAMILIES)}, not "
            f"{family!r}; use cp=1"
        )
    check_attention(getattr(config, "_attn_implementation", None), cp)
    layer_types = set(getattr(config, "layer_types", None) or ())
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if layer_types - {"full_attention"} or (sliding and not layer_types):
        raise ContextParallelError(
            f"context parallelism (cp={cp}) builds a full causal mask, but this {family} model has sliding-window "
            f"or other local attention layers ({sorted(layer_types) or 'sliding_window=' + str(config.sliding_window)})"
            "; use cp=1"
        )


def check_attention(attn_implementation: str | None, cp: int) -> None:
    """Context parallelism gathers keys and values around transformers' sdpa attention."""
    if cp > 1 and attn_implementation not in ("sdpa", ATTENTION):
        raise ContextParallelError(
            f"context parallelism (cp={cp}) needs attn_implementation='sdpa' (the attention it splits), not "
            f"{attn_implementation!r}; use --attn-implementation sdpa or cp=1"
        )


# ------------------------------------------------------------------------------------------- the axis
@dataclass(frozen=True)
class ContextParallel:
    """The ``cp`` ranks of this process: how a module splits its batches and combines its loss."""

    mesh: Any  # the 1-D cp DeviceMesh

    @property
    def size(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    @property
    def group(self):
        return self.mesh.get_group()

    def attach(self, model: nn.Module) -> None:
        """Switch ``model``'s attention to :data:`ATTENTION` for these ranks (checked first)."""
        check_model(model, self.size)
        register_attention()
        config = model.config
        config._attn_implementation = ATTENTION
        _ACTIVE[id(config)] = (weakref.ref(config), self)

    def shard(self, batch: Mapping[str, Any]) -> dict:
        """This rank's part of every row (see :func:`shard_batch`)."""
        return shard_batch(batch, self.size, self.rank)

    def combine(self, mean_loss: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
        """The mean loss and label-token count of the whole micro-batch, from this rank's part of them (every
        ``cp`` rank gets the same values; the gradient goes to this rank's tokens only, ``cp`` times, since FSDP2
        averages over the ``cp`` ranks)."""
        local_sum = mean_loss * count
        total = _SumOverContext.apply(local_sum, self.group, float(self.size))
        counts = torch.tensor([float(count)], dtype=torch.float64, device=mean_loss.device)
        torch.distributed.all_reduce(counts, group=self.group)
        n = int(counts.item())
        return total / max(n, 1), n

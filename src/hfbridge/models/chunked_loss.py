"""The loss without full logits: the model's backbone runs to its last hidden states, which are handed with the
output head's weight to :func:`hfbridge.losses.fused_linear_cross_entropy` (or Liger's fused kernel on a CUDA GPU,
:mod:`hfbridge.models.liger`), which projects only the trained positions, a chunk at a time.

:func:`split_head` finds backbone and head and checks numerically that ``head(backbone(x))`` is the model's own
logits; any model where it is not (a head that is not a plain ``Linear``, logit scaling or soft-capping,
prompt-learning adapters) keeps the full-logits loss.

On a device mesh (``split_head(model, sharded=True)``) the model is an FSDP2 root whose own parameters (embeddings,
final norm, head) are sharded outside its forward. :func:`call_in_root` runs backbone, head and loss as a forward
method of that root (FSDP2's ``register_fsdp_forward_method``): its pre-forward gathers them, its post-forward
reshards them and hooks the loss so that backward gathers them again and reduce-scatters their gradients. With
tensor parallelism the head is split over the vocabulary (``ColwiseParallel``, a ``Shard(0)`` weight): each rank
projects only its vocabulary rows and the cross entropy is taken across the shards
(:func:`vocab_parallel_cross_entropy`: one all-gather of per-row log-sum-exp and target logit per chunk, one
all-reduce of the hidden states' gradient), so no rank ever holds the whole head or all the logits. Hidden states
split over the sequence (sequence parallelism) are gathered first.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hfbridge._shared import eager
from hfbridge.losses import fused_linear_cross_entropy, valid_mask
from hfbridge.models.liger import liger_linear_loss
from hfbridge.models.peft_adapters import base_model, is_peft_model


@dataclass
class HeadSplit:
    """A causal LM seen as ``backbone`` (to hidden states) then a linear ``head``."""

    backbone: nn.Module
    head: nn.Linear
    keys: frozenset[str] | None  # the backbone's named forward arguments (None: it takes **kwargs only)
    root: nn.Module | None = None  # the whole model, whose forward (hooks) the loss runs in (see call_in_root)

    def hidden_states(self, inputs: dict) -> torch.Tensor:
        if self.keys is not None:
            inputs = {k: v for k, v in inputs.items() if k in self.keys}
            if "use_cache" in self.keys:
                inputs.setdefault("use_cache", False)
        return self.backbone(**inputs).last_hidden_state

    def loss(self, inputs: dict, labels: torch.Tensor, loss_mask: torch.Tensor | None, chunk_size: int,
             liger: bool = False) -> torch.Tensor:
        """Mean cross-entropy over the trained positions, without full logits, run inside the root's forward."""
        return call_in_root(self.root, self._loss, inputs, labels, loss_mask, chunk_size, liger)

    def _loss(self, inputs, labels, loss_mask, chunk_size, liger):
        return linear_loss(self.hidden_states(inputs), self.head, labels, loss_mask, chunk_size, liger)


_ROOT_CALL = "_hfbridge_root_call"


def _root_call(self, fn, *args):
    return fn(*args)


def call_in_root(model: nn.Module | None, fn, *args):
    """``fn(*args)`` run as a forward method of ``model``: for an FSDP2 module, between its pre-forward (gather its
    own parameters) and post-forward (reshard them, hook what ``fn`` returns for backward); else a plain call."""
    if model is None or not torch.distributed.is_available():
        return fn(*args)
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if not isinstance(model, FSDPModule):
        return fn(*args)
    if _ROOT_CALL not in vars(model):
        setattr(model, _ROOT_CALL, types.MethodType(_root_call, model))
        register_fsdp_forward_method(model, _ROOT_CALL)
    return getattr(model, _ROOT_CALL)(fn, *args)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def forward_keys(module: nn.Module) -> frozenset[str] | None:
    """The named arguments of ``module.forward`` (``None``: it takes only ``*args``/``**kwargs``)."""
    params = inspect.signature(module.forward).parameters.values()
    named = frozenset(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    return named or None


def split_head(model: nn.Module, sharded: bool = False) -> tuple[HeadSplit | None, str]:
    """``(split, reason)``: the model's backbone and linear head, or ``None`` and why the full logits are needed.

    The split is checked on a few random tokens (eval mode, no gradients): the head applied to the backbone's
    hidden states must give the model's logits. ``sharded``: the caller computes the loss with
    :meth:`HeadSplit.loss`, which runs inside the root's forward and takes the cross entropy over a head split
    by tensor parallelism; without it a model with sharded (DTensor) weights keeps its full logits.
    """
    if is_peft_model(model):
        config = model.peft_config.get(model.active_adapter)
        if getattr(config, "is_prompt_learning", False):
            return None, "prompt-learning adapters add virtual tokens in the peft forward"
    if hasattr(model, "_orig_mod"):  # compiled whole (model_accelerator=torch.compile): keep its compiled forward
        return None, "the model is compiled as a whole"
    base = base_model(model)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if type(head) is not nn.Linear:  # not a subclass either: 4/8-bit and adapter layers are not plain matmuls
        return None, f"the output head is {type(head).__name__}, not a plain Linear"
    if _is_dtensor(head.weight) and not sharded:
        return None, "the output head is sharded"
    backbone = getattr(base, "base_model", None)
    if backbone is None or backbone is base:
        return None, f"{type(base).__name__} has no separate backbone"
    split = HeadSplit(backbone, head, forward_keys(backbone), root=model)
    ok, reason = _check_split(model, split)
    return (split, reason) if ok else (None, reason)


def _check_split(model: nn.Module, split: HeadSplit) -> tuple[bool, str]:
    weight = split.head.weight
    vocab = weight.shape[0]
    ids = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(0)).to(weight.device)
    was_training = model.training
    model.eval()

    def head_logits(inputs):  # inside the root's forward: the head module gathers a vocabulary-split output
        return split.head(split.hidden_states(inputs)).float()

    try:
        with torch.no_grad(), eager():
            logits = model(input_ids=ids, use_cache=False).logits.float()
            ours = call_in_root(model, head_logits, {"input_ids": ids})
    except Exception as e:  # a model that cannot be split this way keeps its full logits
        return False, f"running the backbone alone failed ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    if logits.shape != ours.shape:
        return False, f"the model's logits have shape {tuple(logits.shape)}, the head gives {tuple(ours.shape)}"
    rtol = 1e-4 if weight.dtype == torch.float32 else 3e-2
    err = float((logits - ours).abs().max())
    if err > rtol * float(logits.abs().max().clamp(min=1.0)):
        return False, f"the logits are not the head applied to the hidden states (off by {err:.3g})"
    return True, "the head applied to the backbone's hidden states gives the model's logits"


def linear_loss(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None,
    chunk_size: int,
    liger: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy over trained positions of ``head(hidden)``, never building all the logits: Liger's
    fused kernel when asked for and the tensors are on a CUDA device, else :func:`fused_linear_cross_entropy`.

    Sharded tensors (inside a root forward on a device mesh, :meth:`HeadSplit.loss`): hidden states split over the
    sequence are gathered; a head split over the vocabulary on a 1-D mesh takes the cross entropy across its
    shards (:func:`vocab_parallel_cross_entropy`); a head sharded any other way is gathered."""
    if _is_dtensor(hidden):
        hidden = hidden.full_tensor()  # backward: each rank keeps its slice of the (whole, summed) gradient
    weight, bias = head.weight, head.bias
    if _is_dtensor(weight):
        shard = _vocab_shard(weight, bias)
        if shard is not None:
            local_weight, local_bias, start, group = shard
            return vocab_parallel_cross_entropy(hidden, local_weight, labels, start, group, loss_mask,
                                                chunk_size=chunk_size, bias=local_bias)
        weight = weight.full_tensor()
        bias = bias.full_tensor() if _is_dtensor(bias) else bias
    elif liger and hidden.is_cuda:
        return liger_linear_loss(hidden, head, labels, loss_mask)
    return fused_linear_cross_entropy(hidden, weight, labels, loss_mask, chunk_size=chunk_size, bias=bias)


def _vocab_shard(weight, bias):
    """``(local weight, local bias, first vocabulary row, process group)`` of a head weight split over the
    vocabulary (``Shard(0)`` on a 1-D mesh; the bias, if any, alike), else ``None``."""
    from torch.distributed.tensor import Shard

    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        return None
    if bias is not None and not (_is_dtensor(bias) and tuple(bias.placements) == (Shard(0),)):
        return None
    vocab, n = weight.shape[0], mesh.size()
    rows = -(-vocab // n)  # torch.chunk's split, as DTensor's Shard(0)
    start = min(mesh.get_local_rank() * rows, vocab)
    local = weight.to_local()
    if local.shape[0] != min(start + rows, vocab) - start:
        return None
    return local, None if bias is None else bias.to_local(), start, mesh.get_group()


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` where this rank holds the vocabulary rows
    ``[start, start + len(weight))`` and every rank of ``group`` has the same ``hidden`` and ``targets``. As in
    :class:`hfbridge.losses._LinearCrossEntropy` the gradients are computed in the forward pass, a chunk at a time;
    per chunk the ranks exchange each row's local log-sum-exp and target logit (one all-gather)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, start, group, chunk_size):
        import torch.distributed as dist

        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        world = dist.get_world_size(group)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        local = targets - start
        owned = (local >= 0) & (local < weight.shape[0])
        local = torch.where(owned, local, torch.zeros_like(local))
        for begin in range(0, targets.numel(), chunk_size):
            h, t, own = (x[begin : begin + chunk_size] for x in (hidden, local, owned))
            logits = F.linear(h, weight, bias).float()
            mine = torch.stack([torch.logsumexp(logits, dim=-1), logits.gather(1, t[:, None]).squeeze(1) * own])
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine.contiguous(), group=group)
            parts = torch.stack(parts)  # (ranks, 2, rows)
            lse = torch.logsumexp(parts[:, 0], dim=0)
            total += (lse - parts[:, 1].sum(0)).sum()
            if not (need_h or need_w or need_b):
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # softmax over the whole vocabulary, this rank's columns
            rows = torch.arange(t.numel(), device=t.device)[own]
            probs[rows, t[own]] -= 1.0
            if need_h:
                grad_h[begin : begin + chunk_size] = probs @ weight.float()
            if need_w:
                grad_w += probs.T @ h.float()
            if need_b:
                grad_b += probs.sum(0)
        if need_h:  # the hidden states' gradient sums over every vocabulary shard
            dist.all_reduce(grad_h, group=group)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        return (
            None if grad_h is None else (grad_h * grad_total).to(h_dtype),
            None if grad_w is None else (grad_w * grad_total).to(w_dtype),
            None if grad_b is None else (grad_b * grad_total).to(b_dtype),
            None, None, None, None,
        )


def vocab_parallel_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    start: int,
    group,
    mask: torch.Tensor | None = None,
    chunk_size: int = 512,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over the trained positions of ``hidden @ W.T + b`` when ``W`` is split over the
    vocabulary across the ranks of ``group``: this rank passes its rows (``weight``, ``bias``, the first of them
    ``start``); ``hidden``, ``targets`` and ``mask`` are the same on every rank. Every rank gets the same loss, the
    hidden states' whole gradient and the gradient of its own rows (a distributed log-sum-exp, as Megatron-LM's
    vocabulary-parallel cross entropy), without any rank holding the whole head or all the logits."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    valid = valid_mask(targets, mask).reshape(-1)
    flat_hidden = hidden.reshape(-1, hidden.size(-1))[valid]
    flat_targets = targets.reshape(-1)[valid]
    total = _VocabParallelLinearCrossEntropy.apply(flat_hidden, weight, bias, flat_targets, start, group, chunk_size)
    return total / max(int(flat_targets.numel()), 1)

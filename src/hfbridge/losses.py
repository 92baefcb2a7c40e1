"""Losses for causal language models.

Label convention (the one place it is decided): every batch hfbridge builds carries ``labels`` that are already
aligned with ``input_ids`` as next-token targets, i.e. ``labels[:, t]`` is the token the model must predict after
reading ``input_ids[:, : t + 1]``. The shift happens once, in :func:`hfbridge.data.formats.shift_for_causal_lm`,
per sample and before any padding or packing, so that a sample boundary is never trained across. The losses here
therefore never shift.

Positions that are not trained carry the label ``IGNORE_INDEX`` (-100) and/or a 0 in ``loss_mask``. A batch may also
carry ``NUM_LABEL_TOKENS_KEY``: the label tokens of its whole optimizer step (over gradient accumulation), which
the data modules stamp and the model modules normalise the loss by (without it, they count the step's tokens
themselves and normalise after its last backward). Both constants live here, the lowest layer,
because data and models share them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
NUM_LABEL_TOKENS_KEY = "num_label_tokens"


def valid_mask(targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Where the loss is taken: label != -100 and mask != 0."""
    valid = targets != IGNORE_INDEX
    if mask is not None:
        if mask.shape != targets.shape:
            raise ValueError(f"loss_mask has shape {tuple(mask.shape)} but labels have {tuple(targets.shape)}")
        valid = valid & mask.bool()
    return valid


def count_label_tokens(targets: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    """Number of positions that contribute to the loss (label != -100 and mask != 0)."""
    return int(valid_mask(targets, mask).sum())


def masked_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy over the positions that are trained.

    Args:
        logits: ``[..., vocab]`` scores, aligned with ``targets`` (no shift is applied here).
        targets: ``[...]`` token ids; ``-100`` marks positions that are never trained.
        mask: optional ``[...]`` 0/1 (or bool) loss mask; 0 excludes a position.
        reduction: ``"mean"`` (over trained positions, the seed's behaviour) or ``"sum"``.

    Returns:
        A scalar. With ``"mean"`` and no trained position it is 0 (with a graph), never NaN.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    valid = valid_mask(targets, mask)
    flat_logits = logits.reshape(-1, logits.size(-1))
    flat_targets = torch.where(valid, targets, torch.zeros_like(targets)).reshape(-1)
    per_token = F.cross_entropy(flat_logits.float(), flat_targets, reduction="none")
    per_token = per_token * valid.reshape(-1)
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``masked_cross_entropy(hidden @ weight.T, targets, mask)`` without materialising all logits at once.

    Only trained positions are projected, ``chunk_size`` of them at a time, each chunk under activation
    checkpointing so that its logits are recomputed in backward instead of being kept. Peak memory for the
    logits drops from ``tokens x vocab`` to ``chunk_size x vocab``; loss and gradients are the same.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    valid = valid_mask(targets, mask).reshape(-1)
    flat_hidden = hidden.reshape(-1, hidden.size(-1))[valid]
    flat_targets = targets.reshape(-1)[valid]
    # Starts at 0 with a graph, so that a batch with nothing to train still backpropagates (zeros).
    total = 0.0 * (hidden.sum() + weight.sum()).float()

    def _chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, weight, bias).float()
        return F.cross_entropy(logits, t, reduction="sum")

    for start in range(0, flat_targets.numel(), chunk_size):
        h = flat_hidden[start : start + chunk_size]
        t = flat_targets[start : start + chunk_size]
        total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, h, t, use_reentrant=False)
    if reduction == "sum":
        return total
    return total / max(int(flat_targets.numel()), 1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias``, one chunk of rows at a time, with the gradients computed
    in the forward pass (as Liger's fused kernel does): no chunk's logits are kept or recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = need_h or need_w or need_b
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for start in range(0, targets.numel(), chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not grads:
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # d(sum of losses)/d(logits) = softmax - one_hot
            probs[torch.arange(t.numel(), device=t.device), t] -= 1.0
            if need_h:
                grad_h[start : start + chunk_size] = probs.to(weight.dtype) @ weight
            if need_w:
                grad_w += probs.T @ h.float()
            if need_b:
                grad_b += probs.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_total
        return (
            None if grad_h is None else grad_h * scale.to(grad_h.dtype),
            None if grad_w is None else (grad_w * scale).to(w_dtype),
            None if grad_b is None else (grad_b * scale).to(b_dtype),
            None,
            None,
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = 512,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``masked_cross_entropy(hidden @ weight.T + bias, targets, mask)`` without ever holding all the logits.

    Only trained positions are projected, ``chunk_size`` rows at a time; each chunk's gradients are computed at
    once and its logits dropped, so the logits of the whole batch never exist, nor are they recomputed in backward
    (one projection fewer than :func:`chunked_linear_cross_entropy`). Loss and gradients equal the full-logits
    ones. ``mean`` is over trained positions (0 with a graph when there are none).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    valid = valid_mask(targets, mask).reshape(-1)
    flat_hidden = hidden.reshape(-1, hidden.size(-1))[valid]
    flat_targets = targets.reshape(-1)[valid]
    total = _LinearCrossEntropy.apply(flat_hidden, weight, bias, flat_targets, chunk_size)
    if reduction == "sum":
        return total
    return total / max(int(flat_targets.numel()), 1)


# ----------------------------------------------------------------------------------------------- preference
# Sequence log-probabilities and the losses of preference training (DPO and its family, ORPO, KTO, reward
# models). A "sequence" is one scored completion: its label positions carry its index in ``sequence_ids``.

PREFERENCE_LOSSES = ("dpo", "ipo", "hinge", "simpo", "orpo", "kto", "reward")


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` per row, in float32."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    return _token_logprobs(F.linear(hidden, weight, bias), targets)


def sequence_logprobs(
    targets: torch.Tensor,
    sequence_ids: torch.Tensor,
    num_sequences: int,
    logits: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each sequence's label tokens, and their number.

    Positions with ``targets == -100`` are not counted; every other position belongs to sequence
    ``sequence_ids[pos]`` (``0 <= id < num_sequences``), wherever it lies in the batch (padded rows, or several
    sequences packed into one row). Either the full ``logits`` are given, or the last ``hidden`` states and the
    output head (``weight``, ``bias``): then only label positions are projected, ``chunk_size`` at a time, and each
    chunk's logits are recomputed in backward instead of kept, so the ``tokens x vocabulary`` logits never exist.
    Returns ``(logps [num_sequences] float32, counts [num_sequences] float32)``.
    """
    valid = (targets != IGNORE_INDEX).reshape(-1)
    flat_targets = targets.reshape(-1)[valid]
    flat_ids = sequence_ids.reshape(-1)[valid]
    if flat_ids.numel() and (int(flat_ids.min()) < 0 or int(flat_ids.max()) >= num_sequences):
        raise ValueError(f"sequence_ids of label positions must lie in [0, {num_sequences}), got "
                         f"[{int(flat_ids.min())}, {int(flat_ids.max())}]")
    if logits is not None:
        flat = logits.reshape(-1, logits.size(-1))[valid]
        per_token = _token_logprobs(flat, flat_targets)
    else:
        if hidden is None or weight is None:
            raise ValueError("sequence_logprobs needs logits, or hidden states and the head's weight")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        from torch.utils.checkpoint import checkpoint

        flat_hidden = hidden.reshape(-1, hidden.size(-1))[valid]
        parts = []
        for start in range(0, flat_hidden.size(0), chunk_size):
            h, t = flat_hidden[start : start + chunk_size], flat_targets[start : start + chunk_size]
            if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
                parts.append(checkpoint(_chunk_logprobs, h, weight, bias, t, use_reentrant=False))
            else:
                parts.append(_chunk_logprobs(h, weight, bias, t))
        device = flat_hidden.device
        per_token = torch.cat(parts) if parts else torch.zeros(0, device=device)
    device = per_token.device
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=device).index_add(0, flat_ids, per_token.float())
    counts = torch.zeros(num_sequences, dtype=torch.float32, device=device).index_add(
        0, flat_ids, torch.ones_like(per_token, dtype=torch.float32))
    return sums, counts


def pair_losses(
    method: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses of a paired preference method, and the chosen and rejected rewards (detached), as TRL
    defines them (``DPOTrainer`` for dpo/ipo/hinge, ``CPOTrainer`` for simpo, ``ORPOTrainer`` for orpo).

    ``*_logps`` are summed sequence log-probabilities, ``*_counts`` their label tokens (needed by the length-
    normalised methods: ipo, simpo, orpo).

    * ``dpo``: ``-(1-ls) log σ(β·h) - ls log σ(-β·h)``, ``h = (π_c - ref_c) - (π_r - ref_r)``;
    * ``ipo``: ``(h - 1/(2β))²`` on per-token mean log-probabilities;
    * ``hinge``: ``relu(1 - β·h)``;
    * ``simpo`` (no reference): ``-(1-ls) log σ(β·(ā_c - ā_r) - γ) - ls log σ(-(β·(ā_c - ā_r) - γ))`` with
      ``ā`` the per-token mean log-probabilities;
    * ``orpo`` (no reference): ``-β·log σ(log odds(ā_c) - log odds(ā_r))``, the odds-ratio term only: the NLL of
      the chosen completion is added by the caller (normalised by its tokens over the optimizer step).

    Rewards: ``β·(π - ref)`` on summed log-probabilities (dpo, ipo, hinge); ``β·ā`` for simpo and orpo.
    """
    if method in ("ipo", "simpo", "orpo") and (chosen_counts is None or rejected_counts is None):
        raise ValueError(f"{method} needs the label-token counts of each sequence")
    if method in ("dpo", "ipo", "hinge"):
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"{method} needs the reference model's log-probabilities")
        chosen_ratio = chosen_logps - ref_chosen_logps
        rejected_ratio = rejected_logps - ref_rejected_logps
        h = chosen_ratio - rejected_ratio
        if method == "dpo":
            losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
        elif method == "ipo":  # on per-token means (TRL's normalisation); the rewards stay on sums
            h_mean = chosen_ratio / chosen_counts.clamp(min=1) - rejected_ratio / rejected_counts.clamp(min=1)
            losses = (h_mean - 1 / (2 * beta)) ** 2
        else:
            losses = torch.relu(1 - beta * h)
        return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()
    if method in ("simpo", "orpo"):
        chosen_logps = chosen_logps / chosen_counts.clamp(min=1)
        rejected_logps = rejected_logps / rejected_counts.clamp(min=1)
    if method == "simpo":
        logits = beta * (chosen_logps - rejected_logps) - gamma
        losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
        return losses, (beta * chosen_logps).detach(), (beta * rejected_logps).detach()
    if method == "orpo":
        log_odds = (chosen_logps - rejected_logps) - (
            torch.log1p(-torch.exp(chosen_logps)) - torch.log1p(-torch.exp(rejected_logps)))
        losses = -beta * F.logsigmoid(log_odds)
        return losses, (beta * chosen_logps).detach(), (beta * rejected_logps).detach()
    raise ValueError(f"unknown paired preference method {method!r}; choose one of dpo, ipo, hinge, simpo, orpo")


def kto_losses(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO's per-example losses (TRL's ``KTOTrainer``, loss type ``kto``) and rewards ``β·(π - ref)``:
    desirable ``w_d·(1 - σ(β·(π - ref - z)))``, undesirable ``w_u·(1 - σ(β·(z - (π - ref))))``, with ``z`` the
    detached, non-negative KL estimate of the policy from the reference."""
    ratio = logps - ref_logps
    kl = kl.detach().clamp(min=0)
    desirable = desirable.bool()
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, good, bad), (beta * ratio).detach()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None):
    """Per-pair reward-model loss ``-log σ(r_c - r_r - margin)`` (TRL's ``RewardTrainer``)."""
    diff = chosen_scores.float() - rejected_scores.float()
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)

"""The Lightning module that trains a declarative LLM: the core's :class:`~hfbridge.HFAutoModelForCausalLM` (loss
per label token of the optimizer step, adapters, the parallel layer) plus the trainer's regularization penalty."""

from __future__ import annotations

import torch

from hfbridge.declarative.regularization import regularization_loss, regularizes
from hfbridge.models.causal_lm import HFAutoModelForCausalLM


class DeclarativeCausalLM(HFAutoModelForCausalLM):
    """:class:`HFAutoModelForCausalLM` whose training loss adds ``trainer.regularization_type`` /
    ``regularization_lambda`` (:func:`~hfbridge.declarative.regularization.regularization_loss`, the penalty
    :meth:`hfbridge.declarative.LLM.train_loss` adds).

    The penalty is added to every micro-batch's loss; Lightning divides each by the accumulation steps, so an
    optimizer step's gradient holds it once. ``train_loss`` in ``metrics.csv`` stays the cross-entropy per target
    token (comparable with ``val_loss`` and the evaluation loss); the penalty is logged as ``train_regularization``.
    Validation loss has no penalty (as in the seed's ``eval_loss``).
    """

    def __init__(self, *, regularization_type: str | None = None, regularization_lambda: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.regularization_type = regularization_type
        self.regularization_lambda = regularization_lambda

    def training_step(self, batch: dict, batch_idx: int | None = None) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if not regularizes(self.regularization_type, self.regularization_lambda):
            return loss
        penalty = regularization_loss(self.model, self.regularization_type, self.regularization_lambda)
        if self._trainer is not None:
            self.log("train_regularization", penalty.detach(), on_step=True, on_epoch=False, prog_bar=False)
        return loss + penalty

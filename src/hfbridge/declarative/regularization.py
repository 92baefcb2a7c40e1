"""The trainer's regularization penalty (``trainer.regularization_type`` / ``regularization_lambda``), in one place:
:meth:`hfbridge.declarative.LLM.train_loss` and the module that trains (:mod:`hfbridge.declarative.module`) both
add it."""

from __future__ import annotations

import torch

REGULARIZATION_TYPES = ("l1", "l2", "l1_l2")


def regularization_loss(model: torch.nn.Module, regularization_type: str, regularization_lambda: float
                        ) -> torch.Tensor:
    """``lambda * sum |w|`` (l1), ``lambda * sum w^2`` (l2) or both (l1_l2) over the trainable parameters.

    The seed's (Ludwig's) ``reg_loss`` sums over every parameter; frozen ones (the base model under an adapter)
    only add a constant without a gradient, so they are left out here."""
    if regularization_type not in REGULARIZATION_TYPES:
        raise ValueError(f"regularization_type must be l1, l2 or l1_l2, got {regularization_type!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros((), device=params[0].device if params else None)
    if "l1" in regularization_type:
        total = total + sum(p.abs().sum() for p in params)
    if "l2" in regularization_type:
        total = total + sum(p.pow(2).sum() for p in params)
    return regularization_lambda * total


def regularizes(regularization_type: str | None, regularization_lambda: float | None) -> bool:
    """Whether these settings add a penalty at all (a type and a lambda above 0)."""
    return bool(regularization_type) and bool(regularization_lambda)

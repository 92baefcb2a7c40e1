"""Liger kernels (``liger-kernel``, CUDA GPUs with Triton): RMSNorm, SwiGLU and RoPE on the model's layers, and
the fused linear cross-entropy for the loss without full logits (:mod:`hfbridge.models.chunked_loss`). Without a
GPU, ``liger=True`` warns and the PyTorch chunked loss runs instead (same loss and gradients)."""

from __future__ import annotations

import importlib.util
import warnings

import torch
from torch import nn

from hfbridge.losses import valid_mask
from hfbridge.models.peft_adapters import base_model

LIGER_PACKAGE = "liger_kernel"


def liger_installed() -> bool:
    return importlib.util.find_spec(LIGER_PACKAGE) is not None


def require_liger() -> None:
    """A clear error when the liger-kernel package is missing."""
    if not liger_installed():
        raise ImportError(
            "liger=True needs the liger-kernel package (pip install liger-kernel) and a CUDA GPU with Triton"
        )


def liger_usable() -> bool:
    """Liger's Triton kernels run only on CUDA GPUs; elsewhere this warns and returns False."""
    if torch.cuda.is_available():
        return True
    warnings.warn(
        "liger=True: Liger's Triton kernels need a CUDA GPU; on this machine the loss is hfbridge's chunked "
        "PyTorch version (same loss and gradients) and the layers run unpatched",
        stacklevel=3,
    )
    return False


def apply_liger_kernels(model: nn.Module) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on the model's layers (the loss uses :func:`liger_linear_loss`)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=base_model(model), cross_entropy=False, fused_linear_cross_entropy=False)


def liger_linear_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                      loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over the trained positions of ``head(hidden)``, by Liger's fused kernel (CUDA tensors)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    valid = valid_mask(labels, loss_mask).reshape(-1)
    flat = hidden.reshape(-1, hidden.size(-1))[valid]
    total = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, flat, labels.reshape(-1)[valid], head.bias)
    return total / valid.sum().clamp(min=1)

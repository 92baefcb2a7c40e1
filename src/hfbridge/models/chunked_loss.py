"""The loss without full logits: the model's backbone runs to its last hidden states, which are handed with the
output head's weight to :func:`hfbridge.losses.fused_linear_cross_entropy` (or Liger's fused kernel on a CUDA GPU,
:mod:`hfbridge.models.liger`), which projects only the trained positions, a chunk at a time.

:func:`split_head` finds backbone and head and checks numerically that ``head(backbone(x))`` is the model's own
logits; any model where it is not (a head that is not a plain ``Linear``, logit scaling or soft-capping,
prompt-learning adapters) keeps the full-logits loss.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hfbridge._shared import eager
from hfbridge.losses import fused_linear_cross_entropy
from hfbridge.models.liger import liger_linear_loss
from hfbridge.models.peft_adapters import base_model, is_peft_model


@dataclass
class HeadSplit:
    """A causal LM seen as ``backbone`` (to hidden states) then a linear ``head``."""

    backbone: nn.Module
    head: nn.Linear
    keys: frozenset[str] | None  # the backbone's named forward arguments (None: it takes **kwargs only)

    def hidden_states(self, inputs: dict) -> torch.Tensor:
        if self.keys is not None:
            inputs = {k: v for k, v in inputs.items() if k in self.keys}
            if "use_cache" in self.keys:
                inputs.setdefault("use_cache", False)
        return self.backbone(**inputs).last_hidden_state


def forward_keys(module: nn.Module) -> frozenset[str] | None:
    """The named arguments of ``module.forward`` (``None``: it takes only ``*args``/``**kwargs``)."""
    params = inspect.signature(module.forward).parameters.values()
    named = frozenset(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    return named or None


def split_head(model: nn.Module) -> tuple[HeadSplit | None, str]:
    """``(split, reason)``: the model's backbone and linear head, or ``None`` and why the full logits are needed.

    The split is checked on a few random tokens (eval mode, no gradients): the head applied to the backbone's
    hidden states must give the model's logits.
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
    if type(head.weight).__name__ == "DTensor":
        return None, "the output head is sharded"
    backbone = getattr(base, "base_model", None)
    if backbone is None or backbone is base:
        return None, f"{type(base).__name__} has no separate backbone"
    split = HeadSplit(backbone, head, forward_keys(backbone))
    ok, reason = _check_split(model, split)
    return (split, reason) if ok else (None, reason)


def _check_split(model: nn.Module, split: HeadSplit) -> tuple[bool, str]:
    weight = split.head.weight
    vocab = weight.shape[0]
    ids = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(0)).to(weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), eager():
            logits = model(input_ids=ids, use_cache=False).logits.float()
            ours = F.linear(split.hidden_states({"input_ids": ids}), weight, split.head.bias).float()
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
    fused kernel when asked for and the tensors are on a CUDA device, else :func:`fused_linear_cross_entropy`."""
    if liger and hidden.is_cuda:
        return liger_linear_loss(hidden, head, labels, loss_mask)
    return fused_linear_cross_entropy(hidden, head.weight, labels, loss_mask, chunk_size=chunk_size, bias=head.bias)

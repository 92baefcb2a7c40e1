"""Speed options of :class:`hfbridge.HFAutoModelForCausalLM`: the loss without full logits, activation
checkpointing, ``torch.compile`` of the decoder layers, and Liger kernels.

The loss without full logits runs the model's backbone to its last hidden states and hands them, with the output
head's weight, to :func:`hfbridge.losses.fused_linear_cross_entropy` (or Liger's fused kernel on a CUDA GPU), which
projects only the trained positions, a chunk at a time. :func:`split_head` finds backbone and head and checks
numerically that ``head(backbone(x))`` is the model's own logits; any model where it is not (a head that is not a
plain ``Linear``, logit scaling or soft-capping, prompt-learning adapters) keeps the full-logits loss.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hfbridge.data.packing import eager
from hfbridge.losses import _valid_mask, fused_linear_cross_entropy
from hfbridge.peft import is_peft_model

log = logging.getLogger(__name__)

LIGER_PACKAGE = "liger_kernel"


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


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if is_peft_model(model) else model


def _forward_keys(module: nn.Module) -> frozenset[str] | None:
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
    base = _base(model)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if type(head) is not nn.Linear:  # not a subclass either: 4/8-bit and adapter layers are not plain matmuls
        return None, f"the output head is {type(head).__name__}, not a plain Linear"
    if type(head.weight).__name__ == "DTensor":
        return None, "the output head is sharded"
    backbone = getattr(base, "base_model", None)
    if backbone is None or backbone is base:
        return None, f"{type(base).__name__} has no separate backbone"
    split = HeadSplit(backbone, head, _forward_keys(backbone))
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
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        valid = _valid_mask(labels, loss_mask).reshape(-1)
        flat = hidden.reshape(-1, hidden.size(-1))[valid]
        total = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, flat, labels.reshape(-1)[valid], head.bias)
        return total / valid.sum().clamp(min=1)
    return fused_linear_cross_entropy(hidden, head.weight, labels, loss_mask, chunk_size=chunk_size, bias=head.bias)


def enable_activation_checkpointing(model: nn.Module, mode: bool | str | int = True) -> None:
    """Recompute decoder layers' activations in backward (transformers' non-reentrant checkpointing).

    ``mode``: ``True`` / ``"full"`` checkpoints every layer (keeps only each layer's input); ``"selective"`` every
    layer, but keeps the outputs of matrix products and attention, so only the cheap pointwise ops (norms,
    activations, rotary, residual adds) are recomputed; an int ``k`` checkpoints every k-th layer in full.
    """
    mode = check_checkpointing_mode(mode)
    if mode is False:
        return
    base = _base(model)
    if not getattr(base, "supports_gradient_checkpointing", False) or not hasattr(base, "gradient_checkpointing_enable"):
        raise ValueError(f"activation_checkpointing={mode!r}, but {type(base).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _selective_context
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not isinstance(mode, bool) and isinstance(mode, int):  # every k-th layer (k > 1 after the check)
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i % mode == 0
    if is_peft_model(model) and hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()  # frozen embeddings: the checkpointed layers still get inputs with grad
    if getattr(base, "config", None) is not None:
        base.config.use_cache = False


def check_checkpointing_mode(mode: bool | str | int | None) -> bool | str | int:
    """``mode`` normalised (``"full"`` -> True, ``1`` -> True, ``"2"`` -> 2), or a clear error."""
    if mode is None or mode is False or mode is True:
        return bool(mode)
    if isinstance(mode, str):
        text = mode.strip().lower()
        if text in ("full", "true", "on"):
            return True
        if text in ("false", "off", "none"):
            return False
        if text == "selective":
            return "selective"
        if text.isdigit():
            mode = int(text)
    if isinstance(mode, int) and mode >= 1:
        return True if mode == 1 else mode
    raise ValueError(
        f"activation_checkpointing={mode!r}: use True/'full' (every layer), 'selective' (every layer, recomputing "
        "only pointwise ops), an int k >= 1 (every k-th layer), or False"
    )


def _save_matmuls_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_matmuls_policy)


def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "linear", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


_SAVED_OPS = _saved_ops()


def compile_layers(model: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` each decoder layer in place (regional compilation: one layer's code serves them all,
    and shapes are dynamic, since packed rows vary in length); a model without recognisable layers is compiled
    whole. Returns the number of layers compiled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    compile_kwargs.setdefault("dynamic", True)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        model.compile(**compile_kwargs)
        return 0
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)


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
    """Liger's RMSNorm, SwiGLU and RoPE kernels on the model's layers (the loss uses Liger's fused linear
    cross-entropy separately, see :func:`linear_loss`)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=_base(model), cross_entropy=False, fused_linear_cross_entropy=False)

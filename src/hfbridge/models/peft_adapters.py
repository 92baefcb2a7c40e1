"""Adapters through the peft library, as ``model_transform`` callables (this module was ``hfbridge.peft``, a name
that shadowed the peft library's inside the package).

``LoRA(r=16, alpha=32)`` is a callable that turns a Hugging Face model into a peft model with LoRA adapters
on the chosen modules (all linear layers of the decoder by default). On a 4-bit model (``load_in_4bit=True``) it
prepares the model for k-bit training first, which is QLoRA. :func:`adapter_transform` builds the same for any
peft adapter type by name (lora, dora, ia3, loha, lokr, ...).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ADAPTER_TYPES = ("lora", "dora", "ia3", "loha", "lokr", "adalora", "vera", "boft", "oft")


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def is_peft_model(model) -> bool:
    if "peft" not in sys.modules:  # no peft model can exist before peft is imported (a 10 s import)
        return False
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def base_model(model):
    """The model under a peft wrapper, or ``model`` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def _prepare(model, gradient_checkpointing: bool):
    if is_quantized(model):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


def _peft_config(adapter_type: str, r: int, alpha: int, dropout: float, target_modules, extra: dict):
    import peft

    adapter_type = adapter_type.lower()
    common = {"task_type": "CAUSAL_LM", **extra}
    if target_modules is not None:
        common["target_modules"] = list(target_modules) if not isinstance(target_modules, str) else target_modules
    if adapter_type in ("lora", "dora"):
        return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=adapter_type == "dora", **common)
    if adapter_type == "ia3":
        if "target_modules" in common and "feedforward_modules" not in common:
            common["feedforward_modules"] = []
        return peft.IA3Config(**common)
    if adapter_type == "loha":
        return peft.LoHaConfig(r=r, alpha=alpha, module_dropout=dropout, **common)
    if adapter_type == "lokr":
        return peft.LoKrConfig(r=r, alpha=alpha, module_dropout=dropout, **common)
    if adapter_type == "adalora":
        return peft.AdaLoraConfig(init_r=r, lora_alpha=alpha, lora_dropout=dropout, **common)
    if adapter_type == "vera":
        return peft.VeraConfig(r=r, vera_dropout=dropout, **common)
    if adapter_type == "boft":
        return peft.BOFTConfig(boft_dropout=dropout, **common)
    if adapter_type == "oft":
        return peft.OFTConfig(r=r, module_dropout=dropout, **common)
    raise ValueError(f"unknown adapter type {adapter_type!r}; choose one of {', '.join(ADAPTER_TYPES)}")


@dataclass
class LoRA:
    """A ``model_transform`` that adds LoRA adapters (or another peft adapter type) and freezes the rest.

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapter input.
        target_modules: module names or a regex; ``"all-linear"`` (default) targets every linear layer of the
            decoder except the output head.
        adapter_type: ``lora`` (default), ``dora``, ``ia3``, ``loha``, ``lokr``, ...
        gradient_checkpointing: prepare inputs for activation checkpointing of the frozen base.
        extra: further fields for the peft config.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Sequence[str] | str | None = "all-linear"
    adapter_type: str = "lora"
    gradient_checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.adapter_type.lower() not in ADAPTER_TYPES:
            raise ValueError(f"unknown adapter type {self.adapter_type!r}; choose one of {', '.join(ADAPTER_TYPES)}")

    def peft_config(self):
        return _peft_config(self.adapter_type, self.r, self.alpha, self.dropout, self.target_modules, dict(self.extra))

    def __call__(self, model):
        from peft import get_peft_model

        if is_peft_model(model):
            return model
        model = _prepare(model, self.gradient_checkpointing)
        model = get_peft_model(model, self.peft_config())
        fuse_lora_updates(model)
        return model


def fuse_lora_updates(model) -> int:
    """Give peft's LoRA ``Linear`` layers a forward that adds the low-rank update inside one matrix multiply.

    peft computes ``base(x) + lora_B(lora_A(x)) * scaling``: a multiplication and an addition over the whole
    ``tokens x out_features`` output, and in backward one more multiplication of that size, for every adapted
    layer. ``torch.addmm(base(x), lora_A(x), lora_B.weight.T, alpha=scaling)`` computes the same sum in the
    matrix multiply's accumulation, and its backward scales only the ``tokens x r`` and ``r x out_features``
    gradients (a quarter of the pointwise time of a LoRA step on a CPU, measured in docs/benchmarks.md). Layers the
    fused form does not cover (several active adapters, DoRA and other variants, a bias on ``lora_B``, mixed
    adapter batches, merged or disabled adapters, sharded weights) keep peft's forward for that call.

    Returns the number of layers given the fused forward.
    """
    import types

    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and "forward" not in vars(module):
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count


_PEFT_FORWARD = None


def _peft_lora_forward():
    """peft's LoRA ``Linear.forward`` (the fused forward's fallback), looked up once: peft is imported lazily."""
    global _PEFT_FORWARD
    if _PEFT_FORWARD is None:
        from peft.tuners.lora import Linear as LoraLinear

        _PEFT_FORWARD = LoraLinear.forward
    return _PEFT_FORWARD


def _plain(t) -> bool:
    """A tensor that is neither a DTensor nor another tensor subclass (those keep peft's forward)."""
    import torch

    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _fused_lora_forward(self, x, *args, **kwargs):
    import torch

    peft_forward = _peft_lora_forward()
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (args or kwargs or name is None or self.disable_adapters or self.merged or name not in self.lora_A
            or name in self.lora_variant):
        return peft_forward(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if lora_b.bias is not None or not (_plain(x) and _plain(lora_a.weight) and _plain(lora_b.weight)):
        return peft_forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    down = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
    if not _plain(result) or result.dtype != down.dtype:  # e.g. a 4-bit base computing in another dtype: peft's sum
        return (result + lora_b(down) * self.scaling[name]).to(result.dtype)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]), lora_b.weight.t(),
                      alpha=self.scaling[name])
    return out.view(result.shape)


def adapter_transform(adapter_type: str = "lora", **kwargs) -> LoRA:
    """``LoRA(adapter_type=..., ...)``: a transform for any supported peft adapter type."""
    return LoRA(adapter_type=adapter_type, **kwargs)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total

"""hfbridge: train, shard, evaluate and serve Hugging Face and native PyTorch models with one library.

Heavy or optional parts (``hfbridge.jax``, the server) are imported lazily, on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "HFAutoModelForCausalLM": "hfbridge.models.causal_lm",
    "HFAutoModelForImageTextToText": "hfbridge.models.image_text",
    "masked_cross_entropy": "hfbridge.losses",
    "chunked_linear_cross_entropy": "hfbridge.losses",
    "LoRA": "hfbridge.peft",
    "adapter_transform": "hfbridge.peft",
    "OptimizerConfig": "hfbridge.optim",
    "CausalLMDataModule": "hfbridge.data.datamodule",
    "generate": "hfbridge.generation",
    "to_hf_api": "hfbridge.adapters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hfbridge' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)

"""hfbridge: train, shard, evaluate and serve Hugging Face and native PyTorch models with one library.

Heavy or optional parts (``hfbridge.jax``, the server) are imported lazily, on first use.
"""

from __future__ import annotations

from hfbridge._shared import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

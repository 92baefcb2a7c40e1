"""hfbridge: train, shard, evaluate and serve Hugging Face and native PyTorch models with one library.

Heavy or optional parts (``hfbridge.jax``, the server) are imported lazily, on first use.

This is also the one place where the layers are wired together. The model modules (``hfbridge.models``, the core)
never import the parallel layer, the adapters face or the data layer; they call them through
:mod:`hfbridge.models.hooks`, and the implementations are registered below, before any submodule runs. Each
implementation imports its layer only when first called.
"""

from __future__ import annotations

from hfbridge._shared import lazy_exports
from hfbridge.models import hooks as _hooks

__version__ = "0.1.0"

_EXPORTS = {
    "HFAutoModelForCausalLM": "hfbridge.models.causal_lm",
    "HFAutoModelForImageTextToText": "hfbridge.models.image_text",
    "masked_cross_entropy": "hfbridge.losses",
    "chunked_linear_cross_entropy": "hfbridge.losses",
    "LoRA": "hfbridge.models.peft_adapters",
    "adapter_transform": "hfbridge.models.peft_adapters",
    "OptimizerConfig": "hfbridge.optim",
    "CausalLMDataModule": "hfbridge.data.datamodule",
    "generate": "hfbridge.generation",
    "to_hf_api": "hfbridge.adapters",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


def _parallel_plan(config):
    """The parallel layer's plan for a module's ``parallel`` argument (a ParallelConfig or None)."""
    from hfbridge.parallel.mesh_plan import plan_for

    return plan_for(config)


def _hf_api(model, tokenizer):
    """A native module given the Hugging Face API by the adapters face."""
    from hfbridge.adapters import to_hf_api

    return to_hf_api(model, tokenizer)


def _skipped_token_ids(chat):
    """The token ids a vision-language data module never trains, as the data layer derives them."""
    from hfbridge.data.image_text import skipped_token_ids

    return skipped_token_ids(chat)


_hooks.register(parallel_plan=_parallel_plan, hf_api=_hf_api, skipped_token_ids=_skipped_token_ids)

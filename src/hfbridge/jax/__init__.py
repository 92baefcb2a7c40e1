"""JAX models converted from Hugging Face checkpoints, sharded over a device mesh (optional part).

Install with ``pip install "hfbridge[jax]"``. The main entry point is
:meth:`AutoJaxModelForCausalLM.from_pretrained`, which returns ``(module, params)``.
Submodules are imported on first use, so ``import hfbridge.jax`` stays cheap.
"""

from __future__ import annotations

from hfbridge._shared import lazy_exports

try:
    import jax as _jax  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without jax
    raise ImportError(
        'hfbridge.jax needs JAX, which is not installed: pip install "hfbridge[jax]" '
        '(or pip install "jax[cpu]" optax)'
    ) from e

_EXPORTS = {
    "AutoJaxModelForCausalLM": "hfbridge.jax.auto",
    "AutoEasyDeLModelForCausalLM": "hfbridge.jax.auto",
    "UnsupportedArchitectureError": "hfbridge.jax.config",
    "JaxLMConfig": "hfbridge.jax.config",
    "SUPPORTED_MODEL_TYPES": "hfbridge.jax.config",
    "PartitionAxis": "hfbridge.jax.mesh",
    "create_mesh": "hfbridge.jax.mesh",
    "match_partition_rules": "hfbridge.jax.rules",
    "make_shard_fns": "hfbridge.jax.rules",
    "shard_params": "hfbridge.jax.rules",
    "UnmatchedParameterError": "hfbridge.jax.rules",
    "QuantizedArray": "hfbridge.jax.quant",
    "quantize_params": "hfbridge.jax.quant",
    "greedy_generate": "hfbridge.jax.generate",
    "generate": "hfbridge.jax.generate",
    "filter_logits": "hfbridge.jax.generate",
    "sample_logits": "hfbridge.jax.generate",
    "masked_cross_entropy": "hfbridge.jax.train",
    "labels_from_inputs": "hfbridge.jax.train",
    "make_train_step": "hfbridge.jax.train",
    "add_lora": "hfbridge.jax.lora",
    "merge_lora": "hfbridge.jax.lora",
    "lora_optimizer": "hfbridge.jax.lora",
    "save_lora_adapter": "hfbridge.jax.lora",
    "save_hf": "hfbridge.jax.export",
    "LlamaForCausalLM": "hfbridge.jax.models.llama",
    "GPT2LMHeadModel": "hfbridge.jax.models.gpt2",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

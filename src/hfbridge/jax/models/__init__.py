"""JAX model definitions, keyed by Hugging Face ``model_type``."""

from __future__ import annotations

from hfbridge.jax.config import SUPPORTED_MODEL_TYPES, JaxLMConfig, UnsupportedArchitectureError
from hfbridge.jax.models.gpt2 import GPT2LMHeadModel
from hfbridge.jax.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {model_type: LlamaForCausalLM for model_type in SUPPORTED_MODEL_TYPES}
MODEL_CLASSES["gpt2"] = GPT2LMHeadModel


def model_class_for(config: JaxLMConfig) -> type[LlamaForCausalLM]:
    try:
        return MODEL_CLASSES[config.model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"no JAX model for model_type {config.model_type!r}; supported: {', '.join(MODEL_CLASSES)}"
        ) from None

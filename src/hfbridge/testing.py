"""Tiny models and a locally trained tokenizer, for tests, benchmarks and examples that must not touch a hub.

Production code never imports this module; the tokenizer, which the demo models use too, lives in
:mod:`hfbridge.models.tiny_tokenizer` and is re-exported here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hfbridge.models.tiny_tokenizer import BASE_CORPUS, CHATML_TEMPLATE, SPECIAL_TOKENS, build_tiny_tokenizer

__all__ = ["BASE_CORPUS", "CHATML_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_causal_lm", "build_tiny_tokenizer",
           "tiny_llama_config"]


def tiny_llama_config(vocab_size: int, family: str = "llama", **overrides):
    """A 2-layer, 64-wide config of a Llama-family architecture (llama, mistral, qwen2, qwen3)."""
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    if family == "qwen3":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def build_tiny_causal_lm(path: str | Path, family: str = "llama", seed: int = 0, tokenizer=None, **overrides) -> Path:
    """Save a tiny random causal LM and its tokenizer to ``path`` (a folder ``from_pretrained`` loads)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = tokenizer or build_tiny_tokenizer()
    config = tiny_llama_config(len(tokenizer), family, **overrides)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

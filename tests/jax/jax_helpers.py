"""Shared pieces of the JAX tests (a uniquely named module, so it cannot clash with other test folders)."""

from __future__ import annotations

import os

import numpy as np

# Each family with the features that set it apart switched on.
FAMILIES = {
    "llama": dict(family="llama"),
    "llama_bias_tied": dict(family="llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mistral": dict(family="mistral", sliding_window=5),
    "qwen2": dict(family="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": dict(family="qwen3", attention_bias=True),
}

# The other architectures, each with its particular features on (soft-capping, sliding layers, local/global RoPE,
# partial rotary, expert routing with and without renormalisation, dense layers between MoE ones).
MORE_FAMILIES = {
    "gemma": dict(family="gemma", head_dim=16, attention_bias=True),
    "gemma2": dict(family="gemma2", head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                   attn_logit_softcapping=3.0, final_logit_softcapping=2.0),
    "gemma3_text": dict(family="gemma3_text", head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "phi3": dict(family="phi3", sliding_window=5,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
    "mixtral": dict(family="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(family="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16,
                      norm_topk_prob=False, mlp_only_layers=[1]),
    "gpt2": dict(family="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=True),
}


def perturb_small_tensors(folder, seed: int = 0) -> None:
    """Give norms and biases (ones and zeros after init) random values, so the comparison exercises them."""
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    rng = np.random.default_rng(seed)
    for name, value in tensors.items():
        if value.ndim == 1:
            tensors[name] = (value + 0.1 * rng.standard_normal(value.shape)).astype(value.dtype)
    save_file(tensors, path, metadata={"format": "pt"})

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

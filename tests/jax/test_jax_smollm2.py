"""The embedded SmolLM2-135M-Instruct: JAX logits equal transformers' fp32 logits (atol 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

# XLA:CPU's YNNPACK dot kernels round differently from PyTorch's; over SmolLM2's 30 layers (residual activations
# reach 2e4) that alone moves logits by ~1.6e-4. With the fusion off, XLA's dots are as accurate as PyTorch's.
STRICT_CPU_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@pytest.mark.slow
def test_smollm2_logits_match_transformers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfbridge.jax import AutoJaxModelForCausalLM
    from hfbridge.models.loading import resolve_model_path

    folder = resolve_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="np")["input_ids"].astype(np.int32)
    module, params = AutoJaxModelForCausalLM.from_pretrained("smollm2-135m-instruct")
    assert module.config.tie_word_embeddings and module.config.num_hidden_layers == 30
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    options = STRICT_CPU_DOTS if jax.default_backend() == "cpu" else None
    strict = np.asarray(jax.jit(module.apply, compiler_options=options)(params, ids))
    np.testing.assert_allclose(strict, ref, atol=1e-4, rtol=0)
    default = np.asarray(module(params, ids))
    np.testing.assert_allclose(default, ref, atol=5e-4, rtol=0)
    assert default[0, -1].argmax() == ref[0, -1].argmax()

"""JAX Llama-family definitions against transformers' PyTorch logits (fp32, atol 1e-4)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("jax")

from jax_helpers import FAMILIES  # noqa: E402

from hfbridge.jax import AutoJaxModelForCausalLM, UnsupportedArchitectureError  # noqa: E402

ATOL = 1e-4


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_match_transformers(name, jax_model_dir, hf_logits, ids):
    folder = jax_model_dir(name)
    module, params = AutoJaxModelForCausalLM.from_pretrained(folder)
    ours = np.asarray(module(params, ids))
    ref = hf_logits(folder, ids)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_features_are_exercised(jax_model_dir):
    """The parametrised families really carry biases, q/k norms, windows and tied embeddings."""
    from hfbridge.jax import tree

    def load(name):
        return AutoJaxModelForCausalLM.from_pretrained(jax_model_dir(name))

    m, p = load("llama_bias_tied")
    flat = tree.flatten(p)
    assert m.config.tie_word_embeddings and "lm_head/kernel" not in flat
    assert "model/layers/0/self_attn/o_proj/bias" in flat and "model/layers/0/mlp/down_proj/bias" in flat
    m, p = load("qwen2")
    assert m.config.layer_windows == (None, 4)
    flat = tree.flatten(p)
    assert "model/layers/1/self_attn/q_proj/bias" in flat and "model/layers/1/self_attn/o_proj/bias" not in flat
    m, p = load("qwen3")
    assert "model/layers/0/self_attn/q_norm/scale" in tree.flatten(p)
    assert load("mistral")[0].config.layer_windows == (5, 5)


def test_sliding_window_changes_logits(jax_model_dir, hf_logits, ids):
    folder = jax_model_dir("mistral")
    module, params = AutoJaxModelForCausalLM.from_pretrained(folder, config_kwargs={"sliding_window": None})
    full = np.asarray(module(params, ids))
    np.testing.assert_allclose(full, hf_logits(folder, ids, sliding_window=None), atol=ATOL, rtol=0)
    windowed_module, _ = AutoJaxModelForCausalLM.from_pretrained(folder)
    windowed = np.asarray(windowed_module(params, ids))
    assert np.abs(full[:, 5:] - windowed[:, 5:]).max() > 1e-3  # positions past the window differ
    np.testing.assert_allclose(full[:, :5], windowed[:, :5], atol=1e-6)


def test_padding_mask_matches_transformers(jax_model_dir, hf_logits, ids):
    folder = jax_model_dir("qwen2")
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    module, params = AutoJaxModelForCausalLM.from_pretrained(folder)
    ours = np.asarray(module(params, ids, mask))
    ref = hf_logits(folder, ids, attention_mask=mask)
    np.testing.assert_allclose(ours[:, 3:], ref[:, 3:], atol=ATOL, rtol=0)


def test_llama3_rope_scaling(jax_model_dir, hf_logits, ids):
    folder = jax_model_dir("llama")
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    module, params = AutoJaxModelForCausalLM.from_pretrained(folder, config_kwargs={"rope_parameters": rope})
    assert module.config.rope_type == "llama3"
    pos = np.arange(12, dtype=np.int32)[None].repeat(2, 0) + 40
    ours = np.asarray(module(params, ids, None, pos))
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, rope_parameters=rope).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids), position_ids=torch.tensor(pos)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("opt", num_hidden_layers=1, hidden_size=32, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as err:
        AutoJaxModelForCausalLM.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "opt" in msg and all(t in msg for t in ("llama", "gemma2", "phi3", "gpt2", "mixtral"))


def test_sharded_index_checkpoint_and_bf16(tmp_path, jax_model_dir, hf_logits, ids):
    """A checkpoint split over several files with an index, stored in bf16, converts tensor by tensor."""
    import torch
    from transformers import AutoModelForCausalLM

    src = jax_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    module, params = AutoJaxModelForCausalLM.from_pretrained(tmp_path)
    ref = hf_logits(tmp_path, ids)  # transformers upcasts the same bf16 weights to fp32
    np.testing.assert_allclose(np.asarray(module(params, ids)), ref, atol=ATOL, rtol=0)

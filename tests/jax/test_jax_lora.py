"""LoRA on a mesh: only the factors train, merging keeps the function, the PEFT adapter loads onto the
transformers model with the same logits, and the merged Hugging Face export matches too."""

from __future__ import annotations

import json

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

from hfbridge.jax import AutoJaxModelForCausalLM  # noqa: E402
from hfbridge.jax import tree as tree_lib  # noqa: E402
from hfbridge.jax.lora import add_lora, lora_optimizer, merge_lora, save_lora_adapter  # noqa: E402
from hfbridge.jax.train import init_opt_state, make_train_step, shard_batch  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Monday Tuesday Wednesday Thursday Friday"]


def test_lora_trains_merges_and_saves(jax_model_dir, jax_tokenizer, hf_logits, ids, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = jax_model_dir("llama")
    module, params = AutoJaxModelForCausalLM.from_pretrained(folder, sharding_axis_dims=(2, 2, 2, 1), auto_shard_params=True)
    module, params = add_lora(module, params, r=4, alpha=8, target_modules=[r"self_attn/(q_proj|v_proj)$", r"mlp/down_proj$"])
    flat = tree_lib.flatten(params)
    assert module.lora_scaling == 2.0
    assert sum(p.endswith("lora_a") for p in flat) == 3 * module.config.num_hidden_layers
    a = flat["model/layers/0/self_attn/q_proj/lora_a"]
    assert a.shape == (64, 4) and a.sharding.spec[0] == flat["model/layers/0/self_attn/q_proj/kernel"].sharding.spec[0]
    frozen = {p: np.asarray(v) for p, v in flat.items() if "lora" not in p}

    jax_tokenizer.padding_side = "right"
    enc = jax_tokenizer(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="np")
    batch = shard_batch({k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask")}, module.mesh)
    optimizer = lora_optimizer(optax.adam(3e-2), params)
    opt_state = init_opt_state(optimizer, params)
    step = make_train_step(module, optimizer)
    losses = []
    for _ in range(8):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.3, losses  # only the factors train, so it falls slowly
    flat = tree_lib.flatten(params)
    for path, value in frozen.items():
        np.testing.assert_array_equal(np.asarray(flat[path]), value, err_msg=path)  # frozen weights did not move
    assert float(np.abs(np.asarray(flat["model/layers/1/mlp/down_proj/lora_b"])).max()) > 0

    with_lora = np.asarray(module(params, ids))
    # a PEFT adapter loaded onto the transformers model computes the same logits
    save_lora_adapter(tmp_path / "adapter", module, params, base_model_name_or_path=folder)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and "model.layers.0.self_attn.q_proj" in config["target_modules"]
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        peft_logits = peft_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(with_lora, peft_logits, atol=1e-4, rtol=0)
    # the merged Hugging Face export (factors folded in while writing) and an explicit merge agree
    module.save_pretrained(tmp_path / "merged", params, format="hf")
    np.testing.assert_allclose(hf_logits(tmp_path / "merged", ids), with_lora, atol=1e-4, rtol=0)
    merged_module, merged = merge_lora(module, params)
    assert not any("lora" in p for p in tree_lib.flatten(merged))
    np.testing.assert_allclose(np.asarray(merged_module(merged, ids)), with_lora, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="LoRA"):
        module.save_pretrained(tmp_path / "own", params)  # the own format wants merged weights


def test_lora_errors(jax_model_dir):
    module, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("qwen2"))
    with pytest.raises(ValueError, match="match no projection"):
        add_lora(module, params, target_modules=[r"nothing_here"])
    with pytest.raises(ValueError, match="rank"):
        add_lora(module, params, r=0)
    with pytest.raises(ValueError, match="no LoRA factors"):
        lora_optimizer(optax.adam(1e-3), params)

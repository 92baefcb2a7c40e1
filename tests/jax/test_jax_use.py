"""Jitted greedy generation against transformers, and a sharded AdamW training step whose loss falls."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

from hfbridge.jax import AutoJaxModelForCausalLM, make_train_step  # noqa: E402
from hfbridge.jax.rules import param_specs  # noqa: E402
from hfbridge.jax.train import init_opt_state, masked_cross_entropy, shard_batch  # noqa: E402

PROMPTS = ["The quick brown", "What is the capital of France? The"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "January February March April May June July",
]


def test_greedy_generate_matches_transformers(jax_model_dir, jax_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    folder = jax_model_dir("mistral")  # sliding window 5: the cache path honours it
    jax_tokenizer.padding_side = "left"
    enc = jax_tokenizer(PROMPTS, padding=True, return_tensors="np")
    module, params = AutoJaxModelForCausalLM.from_pretrained(folder)
    ours = np.asarray(module.generate(params, enc["input_ids"], enc["attention_mask"], max_new_tokens=10))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = hf.generate(
        torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"]),
        max_new_tokens=10, do_sample=False,
    ).numpy()
    np.testing.assert_array_equal(ours, ref)
    sharded, sharded_params = AutoJaxModelForCausalLM.from_pretrained(
        folder, sharding_axis_dims=(2, 1, 4, 1), auto_shard_params=True
    )
    tokens = sharded.generate(sharded_params, enc["input_ids"], enc["attention_mask"], max_new_tokens=10)
    np.testing.assert_array_equal(np.asarray(tokens), ref)
    # an end token stops a row: later positions hold the pad token
    eos = int(ours[0, enc["input_ids"].shape[1] + 2])
    stopped = np.asarray(module.generate(params, enc["input_ids"], enc["attention_mask"], max_new_tokens=10,
                                         eos_token_id=eos, pad_token_id=0))
    first = enc["input_ids"].shape[1] + list(ours[0, enc["input_ids"].shape[1]:]).index(eos)
    np.testing.assert_array_equal(stopped[0, : first + 1], ours[0, : first + 1])
    assert (stopped[0, first + 1:] == 0).all()


def test_masked_cross_entropy():
    logits = jax.numpy.log(jax.numpy.array([[[0.5, 0.5], [0.9, 0.1]]]))
    loss = masked_cross_entropy(logits, jax.numpy.array([[0, 1]]), jax.numpy.array([[1, 0]]))
    np.testing.assert_allclose(float(loss), -np.log(0.5), rtol=1e-6)


def test_sharded_training_step_loss_falls(jax_model_dir, jax_tokenizer):
    module, params = AutoJaxModelForCausalLM.from_pretrained(
        jax_model_dir("qwen2"), sharding_axis_dims=(2, 2, 2, 1), auto_shard_params=True
    )
    jax_tokenizer.padding_side = "right"
    enc = jax_tokenizer(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="np")
    batch = shard_batch({k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask")}, module.mesh)
    assert batch["input_ids"].sharding.spec == jax.sharding.PartitionSpec(("dp", "fsdp"), "sp")
    optimizer = optax.adamw(3e-3, weight_decay=0.01)
    opt_state = init_opt_state(optimizer, params)
    specs = param_specs(params)
    step = make_train_step(module, optimizer)
    losses = []
    for _ in range(12):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0], losses
    assert param_specs(params) == specs  # parameters stay sharded by the rules


def test_training_refuses_8bit(jax_model_dir):
    module, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("llama"), load_in_8bit=True)
    with pytest.raises(ValueError, match="8-bit"):
        init_opt_state(optax.adamw(1e-3), params)

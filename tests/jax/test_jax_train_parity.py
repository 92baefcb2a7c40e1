"""The JAX training step equals PyTorch's: same tiny Llama, same batch from hfbridge's data path (labels already
shifted), fp32; loss and every gradient at 1e-5, on a mesh of 8 CPU devices with sp > 1."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

from hfbridge.jax import AutoJaxModelForCausalLM  # noqa: E402
from hfbridge.jax import tree as tree_lib  # noqa: E402
from hfbridge.jax.train import (  # noqa: E402
    causal_lm_loss,
    init_opt_state,
    labels_from_inputs,
    make_train_step,
    shard_batch,
)

RECORDS = [
    {"prompt": "What is the capital of France?", "completion": " Paris."},
    {"prompt": "Name a day of the week:", "completion": " Monday, then Tuesday."},
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "January February March"},
]


def _torch_batch(tokenizer, records, multiple=8):
    from hfbridge.data.collators import PaddedCollator
    from hfbridge.data.formats import detect_format, pad_id, tokenize_record

    samples = [tokenize_record(tokenizer, r, detect_format(r)) for r in records]
    return PaddedCollator(pad_id(tokenizer), pad_to_multiple_of=multiple)(samples)


def _torch_loss_and_grads(folder, batch):
    import torch
    from transformers import AutoModelForCausalLM

    from hfbridge.losses import masked_cross_entropy

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()  # no dropout in these configs; train() as the torch trainer runs it
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = masked_cross_entropy(logits, batch["labels"])
    loss.backward()
    return float(loss.detach()), {name: p.grad.numpy() for name, p in model.named_parameters()}


def _as_torch_name(path):
    *module, leaf = path.split("/")
    return ".".join(module) + ".weight", leaf == "kernel"


def test_loss_and_gradients_equal_pytorch_on_a_mesh_with_sp(jax_model_dir, jax_tokenizer):
    folder = jax_model_dir("llama")
    batch = _torch_batch(jax_tokenizer, RECORDS)
    assert batch["input_ids"].shape[1] % 8 == 0 and (batch["labels"] == -100).any()
    torch_loss, torch_grads = _torch_loss_and_grads(folder, batch)

    module, params = AutoJaxModelForCausalLM.from_pretrained(folder, sharding_axis_dims=(1, 2, 2, 2), auto_shard_params=True)
    jbatch = shard_batch({k: v.numpy() for k, v in batch.items()}, module.mesh)
    assert jbatch["labels"].sharding.spec == jax.sharding.PartitionSpec(("dp", "fsdp"), "sp")  # sequence over sp=2
    # the jitted, sharded train step with SGD at lr 1 applies exactly the gradients: new = old - grad
    old = {p: np.asarray(v) for p, v in tree_lib.flatten(params).items()}
    shardings = {p: v.sharding for p, v in tree_lib.flatten(params).items()}
    assert len(old) == len(torch_grads)
    optimizer = optax.sgd(1.0)
    step = make_train_step(module, optimizer)
    new_params, _, loss = step(params, init_opt_state(optimizer, params), jbatch)
    np.testing.assert_allclose(float(loss), torch_loss, atol=1e-5, rtol=0)
    for path, value in tree_lib.flatten(new_params).items():
        name, transpose = _as_torch_name(path)
        ref = torch_grads[name].T if transpose else torch_grads[name]
        np.testing.assert_allclose(old[path] - np.asarray(value), ref, atol=1e-5, rtol=0, err_msg=path)
        assert value.sharding == shardings[path]


def test_the_two_data_paths_train_the_same_targets(jax_model_dir, jax_tokenizer):
    """Text records through hfbridge's collator (input_ids = ids[:-1], labels shifted once) and the same token ids
    as a plain JAX batch without labels (labels_from_inputs) give the same targets and the same loss."""
    texts = [r for r in RECORDS if "text" in r]
    batch = _torch_batch(jax_tokenizer, texts, multiple=None)
    from hfbridge.data.formats import detect_format, tokenize_record

    full = [tokenize_record(jax_tokenizer, r, detect_format(r)) for r in texts]
    ids = [s.input_ids + [s.labels[-1]] for s in full]  # the full token sequence before the shift
    width = max(map(len, ids))
    raw_ids = np.array([i + [0] * (width - len(i)) for i in ids], np.int32)
    raw_mask = np.array([[1] * len(i) + [0] * (width - len(i)) for i in ids], np.int32)
    derived = np.asarray(labels_from_inputs(raw_ids, raw_mask))[:, :-1]
    np.testing.assert_array_equal(derived, batch["labels"].numpy())
    module, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("llama"))
    loss = jax.jit(lambda p, b: causal_lm_loss(module, p, b))
    n = int((batch["labels"] != -100).sum())
    collated = {**{k: v.numpy() for k, v in batch.items()}, "num_label_tokens": np.int32(n)}
    plain = {"input_ids": raw_ids, "attention_mask": raw_mask}
    np.testing.assert_allclose(float(loss(params, plain)), float(loss(params, collated)), atol=1e-6, rtol=0)
    # num_label_tokens (the label count over a whole optimizer step) is the normaliser when given
    halved = float(loss(params, {**collated, "num_label_tokens": np.int32(2 * n)}))
    np.testing.assert_allclose(halved, float(loss(params, collated)) / 2, rtol=1e-6)

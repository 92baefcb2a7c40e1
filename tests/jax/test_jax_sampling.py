"""Sampling: the logits filters equal transformers' warpers, draws follow the filtered distribution, seeds
reproduce, top-k 1 is greedy; greedy generation of left-padded batches equals transformers' token for token."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from hfbridge.jax import AutoJaxModelForCausalLM  # noqa: E402
from hfbridge.jax.generate import filter_logits, sample_logits  # noqa: E402

PROMPTS = ["The quick brown", "What is the capital of France? The"]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, None, None), (1.0, 5, None), (1.3, None, 0.8),
                                                             (0.5, 7, 0.6), (1.0, None, 0.01)])
def test_filters_equal_transformers_warpers(temperature, top_k, top_p):
    import torch
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32) * 3
    ref = torch.tensor(logits)
    ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p:
        ref = TopPLogitsWarper(top_p)(None, ref)
    for k in (top_k, jax.numpy.int32(top_k or 0)):  # a Python int (lax.top_k) or a traced value (sort), 0 = off
        ours = np.asarray(filter_logits(logits, temperature, k, top_p))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref.numpy()))
        kept = ~np.isinf(ours)
        np.testing.assert_allclose(ours[kept], ref.numpy()[kept], rtol=1e-6)


def test_draws_follow_the_filtered_distribution():
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], np.float32))[None]
    keys = jax.random.split(jax.random.PRNGKey(0), 8000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(logits, k, 0.8, 4, 0.9)))(keys))[:, 0]
    want = np.asarray(jax.nn.softmax(filter_logits(logits, 0.8, 4, 0.9)))[0]
    assert want[4] == want[5] == 0 and (want[:3] > 0).all()
    freq = np.bincount(draws, minlength=6) / len(draws)
    np.testing.assert_allclose(freq, want, atol=0.025)  # 8000 draws: 3 sigma of the largest is 0.016


@pytest.fixture(scope="module")
def left_padded(jax_tokenizer):
    jax_tokenizer.padding_side = "left"
    return jax_tokenizer(PROMPTS, padding=True, return_tensors="np")


@pytest.mark.parametrize("name", ["gemma2", "gpt2"])
def test_greedy_generation_matches_transformers(name, jax_model_dir, left_padded):
    import torch
    from transformers import AutoModelForCausalLM

    folder = jax_model_dir(name)
    module, params = AutoJaxModelForCausalLM.from_pretrained(folder)
    ids, mask = left_padded["input_ids"], left_padded["attention_mask"]
    ours = np.asarray(module.generate(params, ids, mask, max_new_tokens=8))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8, do_sample=False).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_seeded_sampling(jax_model_dir, left_padded):
    module, params = AutoJaxModelForCausalLM.from_pretrained(jax_model_dir("gemma3_text"))
    ids, mask = left_padded["input_ids"], left_padded["attention_mask"]
    greedy = np.asarray(module.generate(params, ids, mask, max_new_tokens=8))
    top1 = np.asarray(module.generate(params, ids, mask, max_new_tokens=8, do_sample=True, top_k=1, seed=3))
    np.testing.assert_array_equal(top1, greedy)  # top-k 1 leaves only the argmax
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95)
    a = np.asarray(module.generate(params, ids, mask, seed=1, **kwargs))
    b = np.asarray(module.generate(params, ids, mask, seed=1, **kwargs))
    c = np.asarray(module.generate(params, ids, mask, seed=2, **kwargs))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    np.testing.assert_array_equal(a[:, : ids.shape[1]], ids)  # the prompt is kept as given
    for bad, word in [(dict(temperature=0.0), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k")]:
        with pytest.raises(ValueError, match=word):
            module.generate(params, ids, mask, do_sample=True, **bad)

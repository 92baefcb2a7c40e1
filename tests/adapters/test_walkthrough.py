"""Items 1-2: the seed's Llama walk-through, against transformers' LlamaForCausalLM with the same weights."""

import pytest
import torch
from native_llama import (
    Llama,
    LlamaForCausalLM,
    LlamaWithHFCacheForCausalLM,
    ReorderingLlamaDecoder,
    Transformer,
    model_args_from_config,
)
from transformers import DynamicCache, pipeline

from hfbridge.adapters import HFModelArchitecture, NativeCache

GEN = dict(max_new_tokens=10, min_new_tokens=10)


@pytest.fixture
def wrapped(native_transformer, llama_config):
    return LlamaForCausalLM(model=native_transformer, config=llama_config).eval()


def test_walkthrough_classes_are_transformers_models(wrapped, native_transformer):
    assert isinstance(wrapped, HFModelArchitecture) and isinstance(wrapped, Llama)
    assert wrapped.lm_head is native_transformer.output
    assert wrapped.get_input_embeddings() is native_transformer.tok_embeddings
    assert wrapped.can_generate() and not Llama.can_generate()  # a base model (no head) cannot generate
    # every weight once, under the native model's own names
    assert set(wrapped.state_dict()) == {f"decoder.model.{k}" for k in native_transformer.state_dict()}


def test_same_logits_and_loss_as_hf_llama(wrapped, hf_llama, tiny_tokenizer):
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    with torch.no_grad():
        ref, out = hf_llama(ids, labels=ids), wrapped(ids, labels=ids)
    diff = (ref.logits - out.logits).abs().max().item()
    print(f"max |logit diff| vs HF LlamaForCausalLM: {diff:.3e}")
    assert diff < 1e-5
    assert torch.allclose(ref.loss, out.loss, atol=1e-5)


def test_base_model_returns_hidden_states(native_transformer, llama_config, hf_llama, tiny_tokenizer):
    base = Llama(llama_config, native_transformer).eval()
    ids = torch.randint(0, len(tiny_tokenizer), (1, 7))
    with torch.no_grad():
        out = base(ids)
        ref = hf_llama.model(ids).last_hidden_state
    assert base.lm_head is None
    assert (out.last_hidden_state - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("mode", ["greedy", "beam", "sample", "no-cache"])
def test_generate_matches_hf_llama(wrapped, hf_llama, prompt_ids, mode):
    kwargs = {"greedy": dict(do_sample=False), "beam": dict(num_beams=3, do_sample=False),
              "sample": dict(do_sample=True, top_k=20), "no-cache": dict(do_sample=False, use_cache=False)}[mode]
    torch.manual_seed(1)
    ref = hf_llama.generate(prompt_ids, **GEN, **kwargs)
    torch.manual_seed(1)
    out = wrapped.generate(prompt_ids, **GEN, **kwargs)
    assert torch.equal(ref, out)


class _Spy:
    """Records (number of tokens, start_pos) of each native call."""

    def __init__(self, decoder):
        self.calls, self._adapt = [], decoder._adapt
        decoder._adapt = self

    def __call__(self, input_ids=None, start_pos=0, *args, **kwargs):
        self.calls.append((input_ids.shape[1], start_pos))
        return self._adapt(input_ids, start_pos, *args, **kwargs)


def test_greedy_uses_the_native_cache_incrementally(wrapped, prompt_ids):
    spy = _Spy(wrapped.decoder)
    wrapped.generate(prompt_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    # the prompt once, then one new token per step at start_pos = tokens seen
    assert spy.calls == [(4, 0), (1, 4), (1, 5), (1, 6)]


def test_beam_search_native_cache_recompute_or_reorder(wrapped, native_transformer, llama_config, hf_llama, prompt_ids):
    ref = hf_llama.generate(prompt_ids, num_beams=3, do_sample=False, **GEN)
    spy = _Spy(wrapped.decoder)
    assert torch.equal(wrapped.generate(prompt_ids, num_beams=3, do_sample=False, **GEN), ref)
    assert any(start == 0 and n > 4 for n, start in spy.calls)  # without a hook: recomputed after reordering

    class Reordering(LlamaForCausalLM):
        def __init__(self, model, config):
            super().__init__(model=model, config=config)
            self.decoder = ReorderingLlamaDecoder(model, config)

    hooked = Reordering(native_transformer, llama_config).eval()
    spy = _Spy(hooked.decoder)
    assert torch.equal(hooked.generate(prompt_ids, num_beams=3, do_sample=False, **GEN), ref)
    assert all(n == 1 for n, _ in spy.calls[1:])  # with it: one token per beam per step


def test_interleaved_generations_do_not_share_the_native_cache(wrapped, hf_llama, prompt_ids):
    a, b = prompt_ids[:1], prompt_ids[1:]
    cache_a = NativeCache()
    with torch.no_grad():
        first_a = wrapped(a, past_key_values=cache_a, use_cache=True).logits
        wrapped(b, use_cache=True)  # another sequence overwrites the native cache
        nxt = first_a[:, -1].argmax(-1, keepdim=True)
        step = wrapped(nxt, past_key_values=cache_a, use_cache=True).logits[:, -1]
        ref = hf_llama(torch.cat([a, nxt], -1)).logits[:, -1]
    assert (step - ref).abs().max().item() < 1e-5


def test_transformers_cache_objects(native_transformer, llama_config, hf_llama, prompt_ids):
    """The same native model handed transformers' DynamicCache (what broke the system this comes from)."""
    model = LlamaWithHFCacheForCausalLM(native_transformer, llama_config).eval()
    for kwargs in (dict(do_sample=False), dict(num_beams=3, do_sample=False)):
        assert torch.equal(model.generate(prompt_ids, **GEN, **kwargs), hf_llama.generate(prompt_ids, **GEN, **kwargs))
    cache = DynamicCache()
    with torch.no_grad():
        first = model(prompt_ids, past_key_values=cache, use_cache=True)
        assert first.past_key_values is cache and cache.get_seq_length() == prompt_ids.shape[1]
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        step = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
        ref = hf_llama(torch.cat([prompt_ids, nxt], -1)).logits[:, -1]
    assert (step - ref).abs().max().item() < 1e-5


def test_a_native_cache_cannot_continue_a_filled_transformers_cache(wrapped, prompt_ids):
    cache = DynamicCache()
    cache.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
    with pytest.raises(ValueError, match="cannot continue from a filled DynamicCache"):
        wrapped(prompt_ids, past_key_values=cache)


def test_text_generation_pipeline_as_in_the_seed(llama_config, hf_llama, tiny_tokenizer):
    torch.manual_seed(0)
    transformer = Transformer(model_args_from_config(llama_config))
    from native_llama import load_hf_llama_weights

    load_hf_llama_weights(transformer, hf_llama)
    hf_model = LlamaForCausalLM(model=transformer, config=llama_config)
    generator_hf = pipeline(task="text-generation", model=hf_model, tokenizer=tiny_tokenizer, max_new_tokens=50,
                            device="cpu")
    reference = pipeline(task="text-generation", model=hf_llama, tokenizer=tiny_tokenizer, max_new_tokens=50,
                         device="cpu")
    prompt = "The quick brown fox"
    out = generator_hf(prompt, do_sample=False)[0]["generated_text"]
    assert out.startswith(prompt) and len(out) > len(prompt)
    assert out == reference(prompt, do_sample=False)[0]["generated_text"]

"""hfbridge's own decoding loop (``hfbridge.adapters.decoding``) against transformers' ``generate``.

The reference is transformers' ``LlamaForCausalLM.generate``; the wrapped native Llama has the same weights
(``conftest.py``). Equal tokens are asserted on every transformers release the project runs (5.23 and 5.24).
"""

import itertools

import pytest
import torch
import transformers
from native_llama import (
    LlamaDecoder,
    LlamaDecoderWithHFCache,
    ReorderingLlamaDecoder,
    decoder_forward,
)
from packaging.version import Version
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from transformers.modeling_outputs import BaseModelOutputWithPast

from hfbridge.adapters import HFDecoder, HFDecoderModelArchitecture, LMHeadModelLMHeadMixin
from hfbridge.adapters.cache import output_cache

NEW = dict(max_new_tokens=10)
EOS_HIT = [451, 362]  # ids the tiny model emits in some beams (so some beams end early)


# ------------------------------------------------------------------------------------------------ adapters
class NoCacheLlamaDecoder(LlamaDecoder):
    """The walk-through's decoder with its cache ignored: every step recomputes the sequence."""

    cache_mode = "none"


class CacheNamedLlamaDecoder(HFDecoder):
    """A transformers cache under transformers 5.24's name, ``cache``."""

    def _adapt(self, input_ids=None, cache=None, **kwargs):
        start = cache.get_seq_length() if cache is not None else 0
        return BaseModelOutputWithPast(last_hidden_state=decoder_forward(self.model, input_ids, start, cache))


class PaddedLlamaDecoder(HFDecoder):
    """Padding mask and positions reach the native model: left-padded batches as transformers' Llama."""

    def _adapt(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        hidden = decoder_forward(self.model, input_ids, start, past_key_values, attention_mask, position_ids)
        return BaseModelOutputWithPast(last_hidden_state=hidden)


DECODERS = {"none": NoCacheLlamaDecoder, "internal": LlamaDecoder, "internal+reorder-hook": ReorderingLlamaDecoder,
            "hf": LlamaDecoderWithHFCache, "hf-named-cache": CacheNamedLlamaDecoder, "padded": PaddedLlamaDecoder}


def causal_lm(decoder_cls, native, config):
    """The native Llama as a transformers causal LM, through ``decoder_cls``."""

    class NativeLlama(LMHeadModelLMHeadMixin, HFDecoderModelArchitecture):
        config_class = type(config)

        def __init__(self, config, model):
            super().__init__(decoder_cls(model, config), model.tok_embeddings, config, lm_head=model.output)

    return NativeLlama(config, native).eval()


@pytest.fixture
def wrapped(native_transformer, llama_config):
    return causal_lm(LlamaDecoder, native_transformer, llama_config)


def both(reference, model, seed=0, **kwargs):
    """``generate`` of the reference and of the model, each from the same RNG state."""
    torch.manual_seed(seed)
    expected = reference.generate(**kwargs)
    torch.manual_seed(seed)
    return expected, model.generate(**kwargs)


def assert_same_sequences(expected, got):
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, got), f"\n{expected}\n{got}"
    else:
        assert type(expected) is type(got)
        assert torch.equal(expected.sequences, got.sequences), f"\n{expected.sequences}\n{got.sequences}"


# ------------------------------------------------------------------------------------------------ equal tokens
@pytest.mark.parametrize("kwargs", [
    dict(**NEW),
    dict(max_length=12),
    dict(max_new_tokens=10, min_new_tokens=10, eos_token_id=EOS_HIT),
    dict(max_new_tokens=10, repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(max_new_tokens=10, bad_words_ids=[[302], [226]], suppress_tokens=[107]),
    dict(max_new_tokens=10, eos_token_id=[302], pad_token_id=0),
    dict(max_new_tokens=10, use_cache=False),
], ids=["plain", "max_length", "min_new_tokens", "penalties", "bad-words", "eos-hit", "no-cache"])
def test_greedy_matches_hf_llama(wrapped, hf_llama, prompt_ids, kwargs):
    assert_same_sequences(*both(hf_llama, wrapped, input_ids=prompt_ids, **kwargs))


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.7, top_k=20, top_p=0.9),
    dict(temperature=1.3, top_k=0, top_p=0.8, num_return_sequences=3),
    dict(min_p=0.05, typical_p=0.9, repetition_penalty=1.2),
    dict(top_k=30, eos_token_id=EOS_HIT),
], ids=["temperature-top-k-top-p", "num-return-sequences", "min-p-typical", "eos"])
@pytest.mark.parametrize("seed", [0, 1])
def test_seeded_sampling_matches_hf_llama(wrapped, hf_llama, prompt_ids, kwargs, seed):
    expected, got = both(hf_llama, wrapped, seed=seed, input_ids=prompt_ids, do_sample=True, **NEW, **kwargs)
    assert_same_sequences(expected, got)


BEAM_CASES = list(itertools.product((2, 3, 4), (0.5, 2.0), (True, False, "never")))


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", BEAM_CASES)
def test_beam_search_matches_hf_llama(wrapped, hf_llama, prompt_ids, num_beams, length_penalty, early_stopping):
    settings = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, **NEW)
    for extra in (dict(), dict(eos_token_id=EOS_HIT, num_return_sequences=num_beams)):
        assert_same_sequences(*both(hf_llama, wrapped, input_ids=prompt_ids, **settings, **extra))


def test_beams_that_hit_eos_are_padded_as_in_transformers(wrapped, hf_llama, prompt_ids, llama_config):
    expected, got = both(hf_llama, wrapped, input_ids=prompt_ids, num_beams=4, num_return_sequences=4,
                         eos_token_id=EOS_HIT, **NEW)
    assert torch.equal(expected, got)
    new = got[:, prompt_ids.shape[1]:]
    ended = torch.isin(new, torch.tensor(EOS_HIT))
    assert ended.any(), "no beam hit the end-of-sequence ids: pick others"
    row, col = ended.nonzero()[0].tolist()
    assert (new[row, col + 1:] == llama_config.pad_token_id).all()


@pytest.mark.skipif(Version(transformers.__version__) < Version("5.24"),
                    reason="transformers < 5.24 keeps sampled beam candidates unsorted; hfbridge follows 5.24")
def test_beam_sampling_matches_hf_llama(wrapped, hf_llama, prompt_ids):
    for seed in (0, 1, 2):
        assert_same_sequences(*both(hf_llama, wrapped, seed=seed, input_ids=prompt_ids, do_sample=True, num_beams=3,
                                    **NEW))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_return_dict_in_generate_matches_hf_llama(wrapped, hf_llama, prompt_ids, num_beams):
    kwargs = dict(input_ids=prompt_ids, num_beams=num_beams, return_dict_in_generate=True, output_scores=True,
                  output_logits=True, **NEW)
    expected, got = both(hf_llama, wrapped, **kwargs)
    assert_same_sequences(expected, got)
    assert isinstance(got, GenerateBeamDecoderOnlyOutput if num_beams > 1 else GenerateDecoderOnlyOutput)
    for ours, theirs in ((got.scores, expected.scores), (got.logits, expected.logits)):
        assert len(ours) == len(theirs)
        finite = [(a.isfinite() == b.isfinite()).all() and (a - b)[a.isfinite()].abs().max() < 1e-4
                  for a, b in zip(ours, theirs)]
        assert all(finite)
    if num_beams > 1:
        assert torch.equal(got.beam_indices, expected.beam_indices)
        assert torch.allclose(got.sequences_scores, expected.sequences_scores, atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3), dict(do_sample=True, top_k=10)],
                         ids=["greedy", "beams", "sampling"])
def test_left_padded_batch_matches_hf_llama(native_transformer, llama_config, hf_llama, tiny_tokenizer, kwargs):
    model = causal_lm(PaddedLlamaDecoder, native_transformer, llama_config)
    pad = tiny_tokenizer.pad_token_id
    batch = torch.tensor([[pad, pad, 344, 493, 483], [474, 314, 272, 328, 320]])
    mask = (batch != pad).long()
    assert_same_sequences(*both(hf_llama, model, input_ids=batch, attention_mask=mask, **NEW, **kwargs))


def test_user_logits_processor_and_stopping_criteria(wrapped, hf_llama, prompt_ids):
    class BanToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, 302] = -float("inf")
            return scores

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 9, dtype=torch.bool)

    for extra in (dict(), dict(num_beams=2)):
        expected, got = both(hf_llama, wrapped, input_ids=prompt_ids, logits_processor=LogitsProcessorList([BanToken()]),
                             stopping_criteria=StoppingCriteriaList([StopAfter()]), **NEW, **extra)
        assert torch.equal(expected, got) and got.shape[1] == 9 and not (got[:, 4:] == 302).any()


def test_streamer_receives_what_transformers_streams(wrapped, hf_llama, prompt_ids):
    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.tolist())

        def end(self):
            self.calls.append("end")

    theirs, ours = Recorder(), Recorder()
    hf_llama.generate(prompt_ids[:1], streamer=theirs, max_new_tokens=4)
    wrapped.generate(prompt_ids[:1], streamer=ours, max_new_tokens=4)
    assert ours.calls == theirs.calls and ours.calls[-1] == "end" and len(ours.calls) == 6


def test_text_generation_pipeline_samples_as_transformers(wrapped, hf_llama, tiny_tokenizer):
    """The pipeline's defaults sample (temperature 0.7): the same text from the same seed."""
    texts = []
    for model in (hf_llama, wrapped):
        generator = transformers.pipeline("text-generation", model=model, tokenizer=tiny_tokenizer, device="cpu")
        torch.manual_seed(5)
        texts.append(generator(["The quick brown fox", "What is"], max_new_tokens=12, num_return_sequences=2))
    assert texts[0] == texts[1]


# ------------------------------------------------------------------------------------------------ cache modes
def _token_counts(model, native, **kwargs):
    """How many tokens each forward of the native model ran."""
    counts = []
    handle = native.tok_embeddings.register_forward_pre_hook(lambda module, args: counts.append(args[0].shape[1]))
    try:
        out = model.generate(**kwargs)
    finally:
        handle.remove()
    return out, counts


@pytest.mark.parametrize("mode", list(DECODERS))
def test_every_cache_mode_gives_the_same_tokens(mode, native_transformer, llama_config, hf_llama, prompt_ids):
    model = causal_lm(DECODERS[mode], native_transformer, llama_config)
    expected_mode = {"none": "none", "internal": "internal", "internal+reorder-hook": "internal"}.get(mode, "hf")
    assert model.decoder.resolved_cache_mode == expected_mode
    n = prompt_ids.shape[1]
    for kwargs in (dict(), dict(num_beams=3, eos_token_id=EOS_HIT, num_return_sequences=3)):
        expected = hf_llama.generate(prompt_ids, max_new_tokens=6, **kwargs)
        got, counts = _token_counts(model, native_transformer, input_ids=prompt_ids, max_new_tokens=6, **kwargs)
        assert torch.equal(expected, got)
        assert counts[0] == n
        if mode == "none":
            assert counts == list(range(n, n + len(counts)))  # the whole sequence, every step
        elif mode == "internal" and kwargs:
            assert any(c > 1 for c in counts[1:])  # beams reordered: recomputed from start_pos=0
        else:
            assert all(c == 1 for c in counts[1:])  # one new token per sequence per step


def test_hf_cache_mode_hands_over_a_dynamic_cache_under_the_declared_name(native_transformer, llama_config,
                                                                           prompt_ids):
    model = causal_lm(CacheNamedLlamaDecoder, native_transformer, llama_config)
    assert model.decoder.cache_argument == "cache"
    with torch.no_grad():
        first = model(prompt_ids, use_cache=True)
        cache = output_cache(first)
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == prompt_ids.shape[1]
        full = model(torch.cat([prompt_ids, prompt_ids[:, :1]], -1), use_cache=False).logits[:, -1]
        step = model(prompt_ids[:, :1], cache=cache, use_cache=True).logits[:, -1]  # transformers 5.24's keyword
    assert (step - full).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, option", [
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5), "num_beam_groups"),
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
    (dict(force_words_ids=[[5]], num_beams=2), "force_words_ids"),
    (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens"),
    (dict(cache_implementation="static"), "cache_implementation"),
    (dict(guidance_scale=1.5), "guidance_scale"),
    (dict(return_dict_in_generate=True, output_attentions=True), "output_attentions"),
    (dict(synced_gpus=True), "synced_gpus"),
    (dict(position_ids=torch.arange(4)[None]), "position_ids"),
])
def test_unsupported_options_are_refused_by_name(wrapped, prompt_ids, kwargs, option):
    with pytest.raises(ValueError, match=rf"does not support {option}="):
        wrapped.generate(prompt_ids, max_new_tokens=3, **kwargs)


def test_other_generate_errors(wrapped, hf_llama, prompt_ids, native_transformer, llama_config):
    with pytest.raises(ValueError, match=r"does not support assistant_model= \(assisted generation\)"):
        wrapped.generate(prompt_ids, max_new_tokens=3, assistant_model=hf_llama)
    with pytest.raises(ValueError, match="streamer` cannot be used with beam search"):
        wrapped.generate(prompt_ids, max_new_tokens=3, num_beams=2, streamer=object())
    with pytest.raises(ValueError, match=r"generate got \['max_new_token'\]"):
        wrapped.generate(prompt_ids, max_new_token=3)
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        wrapped.generate(prompt_ids, max_new_tokens=3, stop_strings=["fox"])
    from native_llama import Llama

    with pytest.raises(ValueError, match="no generation head"):
        Llama(llama_config, native_transformer).generate(prompt_ids, max_new_tokens=3)

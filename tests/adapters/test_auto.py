"""Item 5: ``to_hf_api`` wraps native decoders with no adapter code; item 7: modules it cannot map."""

import pytest
import torch
from native_gpt import GPT, GPTConfig
from native_gru import GRULanguageModel
from native_llama import Transformer, model_args_from_config
from torch import nn

from hfbridge.adapters import NativeMappingError, NativeModelForCausalLM, to_hf_api

GEN = dict(max_new_tokens=8, min_new_tokens=8)


def _greedy_by_recompute(model, ids, steps=8):
    """Reference greedy decoding: the whole sequence through the wrapped forward at every step, no cache."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
    return ids


@pytest.fixture
def gpt(tiny_tokenizer):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=len(tiny_tokenizer)))


@pytest.fixture
def gru(tiny_tokenizer):
    torch.manual_seed(0)
    return GRULanguageModel(len(tiny_tokenizer))


def test_reads_signature_and_infers_config_of_three_native_shapes(gpt, gru, native_transformer, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    m = to_hf_api(gpt, tiny_tokenizer)
    spec = m.config.native_forward
    assert (spec["tokens"], spec["positions"], spec["mask"], spec["cache"]) == ("input_ids", "positions", "mask", "cache")
    assert (spec["cache_mode"], spec["output"]) == ("hf", "hidden")
    assert (m.config.vocab_size, m.config.hidden_size, m.config.num_hidden_layers) == (vocab, 64, 2)
    assert m.config.max_position_embeddings == 128
    assert m.config.tie_word_embeddings and m.lm_head.weight is gpt.wte.weight  # a new head, tied to wte
    assert m.config.pad_token_id == tiny_tokenizer.pad_token_id

    m = to_hf_api(gru)
    spec = m.config.native_forward
    assert (spec["tokens"], spec["cache_mode"], spec["output"]) == ("x", "none", "logits")
    assert (m.config.vocab_size, m.config.hidden_size, m.config.num_hidden_layers) == (vocab, 64, 2)
    assert m.lm_head is gru.head

    m = to_hf_api(native_transformer)
    spec = m.config.native_forward
    assert (spec["tokens"], spec["start_pos"], spec["cache"], spec["cache_mode"], spec["output"]) == (
        "tokens", "start_pos", "past_key_values", "hf", "logits")
    assert (m.config.vocab_size, m.config.hidden_size, m.config.num_hidden_layers) == (vocab, 64, 2)
    assert to_hf_api(native_transformer, cache="internal").config.native_forward["cache_mode"] == "internal"


@pytest.mark.parametrize("which", ["gpt", "gru", "llama-hf-cache", "llama-internal-cache"])
def test_generate_equals_recomputed_greedy_and_beams_run(which, gpt, gru, native_transformer, prompt_ids):
    native, cache = {"gpt": (gpt, "auto"), "gru": (gru, "auto"), "llama-hf-cache": (native_transformer, "hf"),
                     "llama-internal-cache": (native_transformer, "internal")}[which]
    model = to_hf_api(native, cache=cache).eval()
    out = model.generate(prompt_ids, do_sample=False, **GEN)
    assert torch.equal(out, _greedy_by_recompute(model, prompt_ids))
    beams = model.generate(prompt_ids, num_beams=3, num_return_sequences=3, do_sample=False, **GEN)
    assert beams.shape == (6, prompt_ids.shape[1] + 8)


def test_wrapped_llama_matches_hf(native_transformer, hf_llama, prompt_ids):
    model = to_hf_api(native_transformer).eval()
    with torch.no_grad():
        assert (model(prompt_ids).logits - hf_llama(prompt_ids).logits).abs().max().item() < 1e-5
    assert torch.equal(model.generate(prompt_ids, do_sample=False, **GEN), hf_llama.generate(prompt_ids, do_sample=False, **GEN))


def test_left_padded_batch_generates_as_each_prompt_alone(gpt, tiny_tokenizer):
    """Mask and positions reach the native model: padding changes nothing."""
    model = to_hf_api(gpt, tiny_tokenizer).eval()
    short = torch.tensor([[344, 493, 483]])
    long = torch.tensor([[474, 314, 272, 328, 320]])
    pad = tiny_tokenizer.pad_token_id
    batch = torch.tensor([[pad, pad, 344, 493, 483], [474, 314, 272, 328, 320]])
    mask = (batch != pad).long()
    out = model.generate(batch, attention_mask=mask, do_sample=False, **GEN)
    assert torch.equal(out[0, 2:], model.generate(short, do_sample=False, **GEN)[0])
    assert torch.equal(out[1], model.generate(long, do_sample=False, **GEN)[0])


def test_logits_of_the_native_model_are_kept(gru, tiny_tokenizer):
    model = to_hf_api(gru).eval()
    ids = torch.randint(0, len(tiny_tokenizer), (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gru(ids))


def test_reload_needs_and_takes_the_native_module(gpt, tiny_tokenizer, tmp_path):
    model = to_hf_api(gpt, tiny_tokenizer).eval()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="native_model=MyModel"):
        NativeModelForCausalLM.from_pretrained(tmp_path)
    torch.manual_seed(123)
    fresh = GPT(GPTConfig(vocab_size=len(tiny_tokenizer)))
    reloaded = NativeModelForCausalLM.from_pretrained(tmp_path, native_model=fresh).eval()
    ids = torch.randint(0, len(tiny_tokenizer), (2, 6))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert reloaded.lm_head.weight is fresh.wte.weight  # still tied after loading


# ------------------------------------------------------------------------------------------------ errors
class NoEmbedding(nn.Module):
    """Hidden states out, but no embedding and no size attributes."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(1, 16)

    def forward(self, tokens):
        return self.proj(tokens.float().unsqueeze(-1))


class NeedsImages(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)

    def forward(self, tokens, images):
        return self.embed(tokens)


class ReturnsAString(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)

    def forward(self, tokens):
        return "logits"


def test_names_what_it_could_not_infer():
    with pytest.raises(NativeMappingError) as err:
        to_hf_api(NoEmbedding())
    message = str(err.value)
    assert "NoEmbedding" in message and "vocab_size" in message and "num_hidden_layers" in message
    assert "to_hf_api(module, vocab_size=..." in message


def test_sizes_given_as_keywords_complete_the_config():
    model = to_hf_api(NoEmbedding(), vocab_size=10, num_hidden_layers=1)
    assert (model.config.vocab_size, model.config.hidden_size) == (10, 16)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 10)


def test_unmappable_forward_is_named():
    with pytest.raises(NativeMappingError, match=r"required parameter\(s\) 'images'"):
        to_hf_api(NeedsImages())
    with pytest.raises(NativeMappingError, match="returned str"):
        to_hf_api(ReturnsAString())

    class NoInputs(nn.Module):
        def forward(self):
            return torch.zeros(1)

    with pytest.raises(NativeMappingError, match="no parameter takes the token ids"):
        to_hf_api(NoInputs())
    with pytest.raises(NativeMappingError, match="cache='internal'"):
        to_hf_api(GRULanguageModel(10), cache="internal")


def test_head_asked_without_an_embedding_to_tie_to():
    with pytest.raises(ValueError, match="no embedding to tie to"):
        to_hf_api(NoEmbedding(), vocab_size=10, num_hidden_layers=1, tie_word_embeddings=True)


def test_llama_args_from_config_round_trip(llama_config):
    args = model_args_from_config(llama_config)
    assert (args.dim, args.n_layers, args.vocab_size) == (64, 2, llama_config.vocab_size)
    assert to_hf_api(Transformer(args)).config.hidden_size == 64


def test_text_generation_pipeline_on_a_wrapped_module(gpt, tiny_tokenizer):
    from transformers import pipeline

    model = to_hf_api(gpt, tiny_tokenizer)
    generator = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer, max_new_tokens=12, device="cpu")
    text = generator("The quick brown fox", do_sample=False)[0]["generated_text"]
    ids = tiny_tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    expected = tiny_tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0], skip_special_tokens=True)
    assert text == expected

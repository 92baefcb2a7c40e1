"""Item 3: a native encoder-decoder with the conditional-generation head."""

import pytest
import torch
import torch.nn.functional as F
from native_seq2seq import (
    NativeSeq2SeqConfig,
    NativeSeq2SeqForConditionalGeneration,
    NativeSeq2SeqModel,
    Seq2SeqDecoder,
    Seq2SeqTransformer,
    _pad_mask,
)
from transformers import EncoderDecoderCache
from transformers.generation import GenerateEncoderDecoderOutput
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from hfbridge.adapters import shift_tokens_right

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture
def config():
    return NativeSeq2SeqConfig(vocab_size=40, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                               decoder_start_token_id=BOS)


@pytest.fixture
def native(config):
    torch.manual_seed(0)
    return Seq2SeqTransformer(config.vocab_size).eval()


@pytest.fixture
def model(config, native):
    return NativeSeq2SeqForConditionalGeneration(config, model=native).eval()


def test_loss_equals_reference_computation(model, native):
    src = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, PAD, PAD]])
    mask = (src != PAD).long()
    labels = torch.tensor([[9, 8, 7, EOS], [12, 11, EOS, -100]])
    out = model(input_ids=src, attention_mask=mask, labels=labels)
    # reference: the native model on the labels shifted right behind BOS, cross-entropy over non-ignored labels
    tgt = torch.tensor([[BOS, 9, 8, 7], [BOS, 12, 11, EOS]])
    logits = native(src, tgt, src_pad=mask == 0)
    ref = F.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, ref, atol=1e-6)
    assert torch.equal(shift_tokens_right(labels, PAD, BOS), tgt)
    assert (out.logits - logits).abs().max().item() < 1e-5


def test_generate_answers_as_a_manual_greedy_loop(model, native):
    src = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = model.generate(src, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    ids = torch.full((2, 1), BOS)
    with torch.no_grad():
        memory = native.encode(src)
        for _ in range(6):
            ids = torch.cat([ids, native.out(native.decode(ids, memory))[:, -1].argmax(-1, keepdim=True)], dim=-1)
    assert torch.equal(out, ids)
    beams = model.generate(src, max_new_tokens=6, num_beams=3, do_sample=False)
    assert beams.shape[0] == 2 and beams[0, 0] == BOS


def test_learns_to_copy_in_a_few_steps(config):
    torch.manual_seed(0)
    model = NativeSeq2SeqForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        src = torch.randint(3, 8, (16, 3), generator=g)
        loss = model(input_ids=src, labels=torch.cat([src, torch.full((16, 1), EOS)], 1)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    src = torch.tensor([[5, 3, 7]])
    assert model.generate(src, max_new_tokens=5).tolist() == [[BOS, 5, 3, 7, EOS]]


def test_save_and_reload(model, config, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = NativeSeq2SeqForConditionalGeneration.from_pretrained(tmp_path).eval()
    src = torch.tensor([[5, 6, 7]])
    dec = torch.tensor([[BOS, 4, 4]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=src, decoder_input_ids=dec).logits, model(input_ids=src, decoder_input_ids=dec).logits)
    base = NativeSeq2SeqModel(config, model=model.encoder.model)
    assert base(input_ids=src, decoder_input_ids=dec).last_hidden_state.shape == (1, 3, 64)


class Seq2SeqDecoderWithHFCache(Seq2SeqDecoder):
    """Cache mode ``hf`` in an encoder-decoder: the adapter keeps the decoder's token ids in the self-attention
    part of the ``EncoderDecoderCache`` it is handed (as one-feature "keys") and recomputes from them."""

    def _adapt(self, input_ids=None, encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None,
               **kwargs):
        assert isinstance(past_key_values, EncoderDecoderCache)
        new = input_ids[:, None, :, None].float()  # (batch, heads=1, new tokens, features=1)
        seen, _ = past_key_values.self_attention_cache.update(new, new, 0)
        ids = seen[:, 0, :, 0].long()
        hidden = self.model.decode(ids, encoder_hidden_states, _pad_mask(encoder_attention_mask))
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden[:, -input_ids.shape[1]:])


def test_hf_cache_mode_gets_an_encoder_decoder_cache_and_generates_the_same(model, config, native):
    cached = NativeSeq2SeqForConditionalGeneration(config, model=native).eval()
    cached.decoder = Seq2SeqDecoderWithHFCache(native, config)
    assert cached.decoder.resolved_cache_mode == "hf"
    src = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    for kwargs in (dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, top_k=5)):
        torch.manual_seed(0)
        expected = model.generate(src, attention_mask=mask, max_new_tokens=6, **kwargs)
        torch.manual_seed(0)
        assert torch.equal(cached.generate(src, attention_mask=mask, max_new_tokens=6, **kwargs), expected)
    out = cached.generate(src, max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    assert isinstance(out, GenerateEncoderDecoderOutput) and len(out.scores) == out.sequences.shape[1] - 1

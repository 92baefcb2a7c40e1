"""A small PyTorch-native encoder-decoder, wrapped with the conditional-generation head.

The native ``Seq2SeqTransformer`` (``torch.nn.Transformer`` layers, learned positions) has ``encode(src, pad)``,
``decode(tgt, memory, ...)`` and ``forward(src, tgt) -> logits``; it keeps no KV cache, so ``generate`` recomputes
the decoder sequence at each step. ``Seq2SeqEncoder``/``Seq2SeqDecoder`` adapt it, ``NativeSeq2SeqModel`` is the
base model and ``NativeSeq2SeqForConditionalGeneration`` adds the LM head (the native ``out`` layer) and loss.

Run ``python examples/native_seq2seq.py`` to train it for a few steps to copy its input, then generate.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions

from hfbridge.adapters import (
    ConditionalGenerationLMHeadMixin,
    HFDecoder,
    HFEncoder,
    HFEncoderDecoderModelArchitecture,
)


class Seq2SeqTransformer(nn.Module):
    def __init__(self, vocab_size: int, d_model: int = 64, nhead: int = 4, num_encoder_layers: int = 2,
                 num_decoder_layers: int = 2, dim_feedforward: int = 128, max_len: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        enc = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True)
        dec = nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(enc, num_encoder_layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, num_decoder_layers)
        self.out = nn.Linear(d_model, vocab_size)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))

    def encode(self, src: torch.Tensor, src_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states; ``src_pad`` is True at padding."""
        return self.encoder(self._embed(src), src_key_padding_mask=src_pad)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, memory_pad: torch.Tensor | None = None,
               tgt_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder states (causal over ``tgt``, attending to ``memory``)."""
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
        return self.decoder(self._embed(tgt), memory, tgt_mask=causal, tgt_is_causal=True,
                            tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=memory_pad)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_pad: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.decode(tgt, self.encode(src, src_pad), src_pad))


def _pad_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if attention_mask is None else attention_mask == 0


class Seq2SeqEncoder(HFEncoder):
    def _adapt(self, input_ids=None, attention_mask=None, *args, **kwargs) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.model.encode(input_ids, _pad_mask(attention_mask)))


class Seq2SeqDecoder(HFDecoder):
    def _adapt(self, input_ids=None, encoder_hidden_states=None, encoder_attention_mask=None, attention_mask=None,
               *args, **kwargs) -> BaseModelOutputWithPastAndCrossAttentions:
        hidden = self.model.decode(input_ids, encoder_hidden_states, _pad_mask(encoder_attention_mask),
                                   _pad_mask(attention_mask))
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden)


class NativeSeq2SeqConfig(PretrainedConfig):
    model_type = "native_seq2seq"

    vocab_size: int = 512
    d_model: int = 64
    nhead: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    dim_feedforward: int = 128
    max_len: int = 128
    tie_word_embeddings: bool = False
    is_encoder_decoder: bool = True


def build_native(config: NativeSeq2SeqConfig) -> Seq2SeqTransformer:
    return Seq2SeqTransformer(config.vocab_size, config.d_model, config.nhead, config.num_encoder_layers,
                              config.num_decoder_layers, config.dim_feedforward, config.max_len)


class NativeSeq2SeqModel(HFEncoderDecoderModelArchitecture):
    config_class = NativeSeq2SeqConfig
    base_model_prefix = "seq2seq"

    def __init__(self, config: NativeSeq2SeqConfig, model: Seq2SeqTransformer | None = None, **kwargs):
        model = model if model is not None else build_native(config)
        super().__init__(Seq2SeqEncoder(model, config), Seq2SeqDecoder(model, config), model.embed, config, **kwargs)


class NativeSeq2SeqForConditionalGeneration(ConditionalGenerationLMHeadMixin, NativeSeq2SeqModel):
    def __init__(self, config: NativeSeq2SeqConfig, model: Seq2SeqTransformer | None = None, **kwargs):
        model = model if model is not None else build_native(config)
        super().__init__(config, model=model, lm_head=model.out, **kwargs)


if __name__ == "__main__":
    torch.manual_seed(0)
    config = NativeSeq2SeqConfig(vocab_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 decoder_start_token_id=1)
    model = NativeSeq2SeqForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):  # learn to copy 4 random tokens
        src = torch.randint(3, 32, (16, 4))
        labels = torch.cat([src, torch.full((16, 1), 2)], dim=1)
        loss = model(input_ids=src, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    src = torch.tensor([[5, 9, 17, 4]])
    print("loss", loss.item(), "copy of", src.tolist(), "->", model.generate(src, max_new_tokens=6).tolist())

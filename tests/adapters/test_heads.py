"""Item 1 (heads and losses) and item 7 (bad adapters, heads without an embedding to tie to)."""

import pytest
import torch
import torch.nn.functional as F
from native_llama import Llama, LlamaDecoder, decoder_forward
from native_seq2seq import Seq2SeqEncoder, Seq2SeqTransformer
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from hfbridge.adapters import (
    AdapterError,
    HFDecoder,
    HFDecoderModelArchitecture,
    HFEncoderModelArchitecture,
    LMHeadModelLMHeadMixin,
    SequenceClassificationLMHeadMixin,
)


class LlamaForSequenceClassification(SequenceClassificationLMHeadMixin, Llama):
    pass


class EncoderForSequenceClassification(SequenceClassificationLMHeadMixin, HFEncoderModelArchitecture):
    def __init__(self, config, model):
        super().__init__(Seq2SeqEncoder(model, config), model.embed, config)


def _classifier(native_transformer, llama_config, num_labels, problem_type=None):
    config = llama_config.__class__(**{**llama_config.to_dict(), "num_labels": num_labels, "problem_type": problem_type})
    return LlamaForSequenceClassification(config, native_transformer).eval()


@pytest.mark.parametrize("problem", ["regression", "single_label_classification", "multi_label_classification"])
def test_sequence_classification_losses(problem, native_transformer, llama_config, tiny_tokenizer):
    num_labels = 1 if problem == "regression" else 3
    model = _classifier(native_transformer, llama_config, num_labels)  # problem_type inferred from labels
    pad = tiny_tokenizer.pad_token_id
    ids = torch.tensor([[11, 12, 13, 14], [21, 22, pad, pad]])
    mask = (ids != pad).long()
    labels = {"regression": torch.tensor([0.5, -1.0]), "single_label_classification": torch.tensor([2, 0]),
              "multi_label_classification": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])}[problem]
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert model.problem_type_for(labels) == problem
    # reference: the head on the hidden state of each sequence's last real token
    with torch.no_grad():
        hidden = decoder_forward(native_transformer, ids)
    pooled = torch.stack([hidden[0, 3], hidden[1, 1]])
    logits = model.lm_head(pooled)
    ref = {"regression": lambda: F.mse_loss(logits.squeeze(-1), labels),
           "single_label_classification": lambda: F.cross_entropy(logits, labels),
           "multi_label_classification": lambda: F.binary_cross_entropy_with_logits(logits, labels)}[problem]()
    assert torch.allclose(out.logits, logits, atol=1e-6)
    assert torch.allclose(out.loss, ref, atol=1e-6)


def test_problem_type_from_the_config(native_transformer, llama_config):
    model = _classifier(native_transformer, llama_config, 2, problem_type="multi_label_classification")
    labels = torch.tensor([[1, 0], [0, 1]])  # integer labels, but the config says multi-label
    out = model(input_ids=torch.tensor([[5, 6], [7, 8]]), labels=labels)
    assert torch.allclose(out.loss, F.binary_cross_entropy_with_logits(out.logits, labels.float()), atol=1e-6)


def test_encoder_classification_pools_the_first_token():
    torch.manual_seed(0)
    native = Seq2SeqTransformer(20).eval()
    config = PretrainedConfig(num_labels=2, hidden_size=64)
    model = EncoderForSequenceClassification(config, native).eval()
    src = torch.tensor([[3, 4, 5]])
    out = model(input_ids=src, labels=torch.tensor([1]))
    ref = model.lm_head(native.encode(src)[:, 0])
    assert torch.allclose(out.logits, ref, atol=1e-6)
    assert torch.allclose(out.loss, F.cross_entropy(ref, torch.tensor([1])), atol=1e-6)


def test_new_lm_head_ties_to_the_embedding(native_transformer, llama_config):
    config = llama_config.__class__(**{**llama_config.to_dict(), "tie_word_embeddings": True})

    class TiedLlama(LMHeadModelLMHeadMixin, Llama):
        pass

    model = TiedLlama(config, native_transformer)
    assert model.lm_head is not native_transformer.output
    assert model.lm_head.weight is native_transformer.tok_embeddings.weight


# ------------------------------------------------------------------------------------------------ errors
class NoEmbeddingLlama(LMHeadModelLMHeadMixin, HFDecoderModelArchitecture):
    def __init__(self, config, model):
        super().__init__(LlamaDecoder(model, config), None, config)


def test_head_asked_of_a_model_without_embeddings(native_transformer, llama_config):
    config = llama_config.__class__(**{**llama_config.to_dict(), "tie_word_embeddings": True})
    with pytest.raises(ValueError, match=r"no embedding to tie to \(embedding=None\)"):
        NoEmbeddingLlama(config, native_transformer)


class TensorDecoder(HFDecoder):
    def _adapt(self, input_ids=None, start_pos: int = 0, *args, **kwargs):
        return decoder_forward(self.model, input_ids, start_pos)  # a bare tensor, not an HF output


class EmptyOutputDecoder(HFDecoder):
    def _adapt(self, input_ids=None, *args, **kwargs):
        return BaseModelOutputWithPastAndCrossAttentions()


@pytest.mark.parametrize("decoder_cls, message", [
    (TensorDecoder, r"TensorDecoder._adapt returned Tensor, not a transformers output dataclass"),
    (EmptyOutputDecoder, r"neither last_hidden_state nor logits"),
])
def test_adapt_returning_the_wrong_type(decoder_cls, message, native_transformer, llama_config):
    class Bad(LMHeadModelLMHeadMixin, HFDecoderModelArchitecture):
        def __init__(self, config, model):
            super().__init__(decoder_cls(model, config), model.tok_embeddings, config, lm_head=model.output)

    model = Bad(llama_config, native_transformer)
    with pytest.raises(AdapterError, match=message):
        model(torch.tensor([[1, 2, 3]]))


def test_architecture_argument_errors(native_transformer, llama_config):
    with pytest.raises(TypeError, match="decoder must be an HFDecoder"):
        HFDecoderModelArchitecture(nn.Linear(2, 2), None, llama_config)
    with pytest.raises(TypeError, match="unexpected arguments surprise"):
        Llama(llama_config, native_transformer, surprise=1)

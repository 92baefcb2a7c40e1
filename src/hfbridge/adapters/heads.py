"""Heads and losses for :class:`~hfbridge.adapters.HFModelArchitecture` models (the seed's ``LMHeadMixin``).

A head mixin comes first in the bases: ``class LlamaForCausalLM(LMHeadModelLMHeadMixin, Llama)``. It takes
``lm_head=`` (a module to use, e.g. the native model's output layer) or builds one with ``_lm_head``, tied to the
input embedding when ``config.tie_word_embeddings`` is true.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    CausalLMOutputWithPast,
    ModelOutput,
    Seq2SeqLMOutput,
    SequenceClassifierOutput,
    SequenceClassifierOutputWithPast,
)

from hfbridge.adapters.base import (
    HFDecoderModelArchitecture,
    HFEncoderDecoderModelArchitecture,
    HFEncoderModelArchitecture,
)
from hfbridge.adapters.cache import with_cache

IGNORE_INDEX = -100


class LMHeadMixin:
    """Adds a head (``self.lm_head``) and a loss to an ``HFModelArchitecture``.

    Subclasses implement ``_lm_head(**params)`` (build a head when none is given) and
    ``_compute_loss(prediction, labels)``.
    """

    def __init__(self, *args, lm_head: nn.Module | None = None, _lm_head_params: dict | None = None, **kwargs):
        super().__init__(*args, lm_head=lm_head, _lm_head_params=dict(_lm_head_params or {}), **kwargs)

    def _lm_head(self, **params) -> nn.Module:
        raise NotImplementedError

    def _compute_loss(self, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- helpers
    def _hidden_size(self) -> int:
        for key in ("hidden_size", "d_model", "n_embd", "dim"):
            value = getattr(self.config, key, None)
            if isinstance(value, int):
                return value
        weight = getattr(self.embedding, "weight", None)
        if weight is not None and weight.dim() == 2:
            return int(weight.shape[1])
        raise ValueError(f"{type(self).__name__}: no hidden size in the config (hidden_size) to build a head with")

    def _linear_head(self, out_features: int, bias: bool, tie: bool) -> nn.Linear:
        """A new ``Linear(hidden, out_features)``; with ``tie``, its weight is the input embedding's."""
        hidden = self._hidden_size()
        head = nn.Linear(hidden, out_features, bias=bias)
        if not tie:
            return head
        embedding = self.embedding
        weight = getattr(embedding, "weight", None)
        if not isinstance(weight, nn.Parameter):
            what = "embedding=None" if embedding is None else f"its embedding ({type(embedding).__name__}) has no weight"
            raise ValueError(
                f"{type(self).__name__}: config.tie_word_embeddings=True asks the new lm_head to share the input "
                f"embedding's weight, but the model has no embedding to tie to ({what}). Pass an embedding, pass "
                "lm_head=<module>, or set config.tie_word_embeddings=False"
            )
        if tuple(weight.shape) != (out_features, hidden):
            raise ValueError(
                f"{type(self).__name__}: cannot tie the lm_head ({out_features} x {hidden}) to the embedding "
                f"weight of shape {tuple(weight.shape)}"
            )
        head.weight = weight
        return head


def _keep(logits_to_keep: int | torch.Tensor) -> slice | torch.Tensor:
    return slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep


def _logits(model, output: ModelOutput, logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
    """The adapter's own logits if it produced them, else ``lm_head(last_hidden_state)``."""
    keep = _keep(logits_to_keep)
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits[:, keep]
    if model.lm_head is None:
        raise ValueError(f"{type(model).__name__} has no lm_head")
    return model.lm_head(output.last_hidden_state[:, keep])


# ============================================================================================ decoder LM
class LMHeadModelLMHeadMixin(LMHeadMixin):
    """A causal-LM head for an :class:`HFDecoderModelArchitecture`: logits over the vocabulary and the next-token
    loss (``labels`` are the input ids; the logits at position ``t`` are scored against ``labels[t + 1]``)."""

    _generative_head = True

    def __init__(self, *args, bias: bool = False, **kwargs):
        super().__init__(*args, _lm_head_params={"bias": bias}, **kwargs)

    def _lm_head(self, bias: bool = False) -> nn.Module:
        tie = bool(getattr(self.config, "tie_word_embeddings", False))
        return self._linear_head(self.config.vocab_size, bias, tie)

    def _compute_loss(self, prediction: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = prediction[:, :-1].float()
        targets = labels[:, 1:].to(logits.device)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction=reduction)
        return loss if num_items_in_batch is None else loss / num_items_in_batch

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        output, cache = self._run(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                                  **kwargs)
        logits = _logits(self, output, logits_to_keep)
        loss = None if labels is None else self._compute_loss(logits, labels, num_items_in_batch)
        result = with_cache(
            CausalLMOutputWithPast, cache, loss=loss, logits=logits,
            hidden_states=getattr(output, "hidden_states", None), attentions=getattr(output, "attentions", None),
        )
        return result if return_dict is not False else result.to_tuple()


# ============================================================================================ encoder-decoder LM
def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: ``[start] + labels[:-1]``, with ignored (-100) labels as padding."""
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


class ConditionalGenerationLMHeadMixin(LMHeadMixin):
    """A sequence-to-sequence LM head for an :class:`HFEncoderDecoderModelArchitecture`: logits over the vocabulary
    for each decoder position and the token loss against ``labels`` (decoder inputs default to the labels shifted
    right behind ``config.decoder_start_token_id``)."""

    _generative_head = True

    def __init__(self, *args, bias: bool = False, **kwargs):
        super().__init__(*args, _lm_head_params={"bias": bias}, **kwargs)

    def _lm_head(self, bias: bool = False) -> nn.Module:
        tie = bool(getattr(self.config, "tie_word_embeddings", False))
        return self._linear_head(self.config.vocab_size, bias, tie)

    def _compute_loss(self, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = prediction.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.to(logits.device).reshape(-1),
                               ignore_index=IGNORE_INDEX)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        start = getattr(self.config, "decoder_start_token_id", None)
        if start is None:
            start = self.config.bos_token_id if self.config.bos_token_id is not None else self.config.pad_token_id
        if start is None or self.config.pad_token_id is None:
            raise ValueError("set config.decoder_start_token_id (or bos_token_id) and pad_token_id to train from labels")
        return shift_tokens_right(labels, self.config.pad_token_id, start)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        encoder_outputs: ModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        if not isinstance(self, HFEncoderDecoderModelArchitecture):
            raise TypeError(f"{type(self).__name__}: ConditionalGenerationLMHeadMixin needs an encoder-decoder model")
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        encoded, decoded, cache = self._run(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, decoder_position_ids,
            encoder_outputs, past_key_values, use_cache, **kwargs,
        )
        logits = _logits(self, decoded, logits_to_keep)
        loss = None if labels is None else self._compute_loss(logits, labels)
        result = with_cache(
            Seq2SeqLMOutput, cache, loss=loss, logits=logits, encoder_last_hidden_state=encoded.last_hidden_state,
            decoder_hidden_states=getattr(decoded, "hidden_states", None),
            decoder_attentions=getattr(decoded, "attentions", None),
        )
        return result if return_dict is not False else result.to_tuple()


# ============================================================================================ classification
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


class SequenceClassificationLMHeadMixin(LMHeadMixin):
    """A sequence classification (or regression) head: ``Dropout`` then ``Linear(hidden, config.num_labels)``
    on one position per sequence: the first for an encoder, the last non-padding one for a decoder.

    The loss follows ``config.problem_type`` as transformers does: ``"regression"`` (MSE),
    ``"single_label_classification"`` (cross-entropy over integer labels) or ``"multi_label_classification"``
    (binary cross-entropy with logits over 0/1 label vectors). Unset, it is inferred: regression when
    ``num_labels == 1``, single-label for integer labels, multi-label otherwise.
    """

    def __init__(self, *args, classifier_dropout: float = 0.0, bias: bool = True, **kwargs):
        super().__init__(*args, _lm_head_params={"dropout": classifier_dropout, "bias": bias}, **kwargs)

    def _lm_head(self, dropout: float = 0.0, bias: bool = True) -> nn.Module:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(self._hidden_size(), self.config.num_labels, bias=bias))

    def problem_type_for(self, labels: torch.Tensor) -> str:
        problem = getattr(self.config, "problem_type", None)
        if problem is not None:
            if problem not in PROBLEM_TYPES:
                raise ValueError(f"config.problem_type={problem!r}; choose one of {PROBLEM_TYPES}")
            return problem
        if self.config.num_labels == 1:
            return "regression"
        if labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
            return "single_label_classification"
        return "multi_label_classification"

    def _compute_loss(self, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem = self.problem_type_for(labels)
        logits = prediction.float()
        labels = labels.to(logits.device)
        if problem == "regression":
            if self.config.num_labels == 1:
                return F.mse_loss(logits.squeeze(-1), labels.float().view(-1))
            return F.mse_loss(logits, labels.float())
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.config.num_labels), labels.long().view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.float())

    def _pool(self, hidden: torch.Tensor, input_ids, attention_mask) -> torch.Tensor:
        if isinstance(self, HFEncoderModelArchitecture):
            return hidden[:, 0]
        if attention_mask is not None:
            keep = attention_mask.to(hidden.device).long()
        elif input_ids is not None and self.config.pad_token_id is not None:
            keep = (input_ids != self.config.pad_token_id).long().to(hidden.device)
        else:
            return hidden[:, -1]
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (positions * keep).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        if isinstance(self, HFDecoderModelArchitecture):
            kwargs["use_cache"] = False
            output, _ = self._run(input_ids, attention_mask, **kwargs)
        elif isinstance(self, HFEncoderModelArchitecture):
            output = self._run(input_ids, attention_mask, **kwargs)
        else:
            raise TypeError(f"{type(self).__name__}: sequence classification needs an encoder or a decoder model")
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            raise ValueError(f"{type(self).__name__}: the adapter returned no last_hidden_state to classify")
        logits = self.lm_head(self._pool(hidden, input_ids, attention_mask))
        loss = None if labels is None else self._compute_loss(logits, labels)
        cls = SequenceClassifierOutputWithPast if isinstance(self, HFDecoderModelArchitecture) else SequenceClassifierOutput
        result = cls(loss=loss, logits=logits, hidden_states=getattr(output, "hidden_states", None),
                     attentions=getattr(output, "attentions", None))
        return result if return_dict is not False else result.to_tuple()

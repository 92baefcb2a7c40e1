"""hfbridge's own decoding loop: ``generate`` for native models wrapped by the generative adapter architectures.

transformers' ``GenerationMixin.generate`` drives a model through a private protocol (which keyword carries the
cache, which output field returns it, which ``Cache`` properties decide how inputs are sliced). transformers 5.24
renamed that protocol (``cache=`` instead of ``past_key_values=``, and a cache with no layers counts as a linear-
attention cache), which broke generation of native models. So hfbridge owns the loop for them. It uses only public,
long-stable transformers API: ``GenerationConfig``, the logits processors and stopping criteria exported by
``transformers``, the ``Generate*Output`` classes, and the model's own forward (``past_key_values`` is the
wrapper's argument, not transformers').

Supported: greedy search, multinomial sampling and beam search (also beam sampling), with transformers 5.x
semantics (same processors in the same order, same RNG use, its vectorized beam search); the length, penalty,
n-gram, bad-words, forced-token, suppression and sampling options of ``GenerationConfig``; ``logits_processor``,
``stopping_criteria``, ``prefix_allowed_tokens_fn``, ``stop_strings`` (with ``tokenizer=``), ``streamer``;
``return_dict_in_generate`` with ``output_scores``/``output_logits``. Anything else raises a ``ValueError`` that
names it (see ``UNSUPPORTED_ARGUMENTS`` and ``UNSUPPORTED_OPTIONS``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from typing import Any

import torch
from torch import nn
from transformers import (
    EncoderNoRepeatNGramLogitsProcessor,
    EncoderRepetitionPenaltyLogitsProcessor,
    EosTokenCriteria,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    GenerationConfig,
    GenerationMixin,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessorList,
    MaxLengthCriteria,
    MaxTimeCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    StoppingCriteriaList,
    StopStringCriteria,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation import (
    GenerateBeamDecoderOnlyOutput,
    GenerateBeamEncoderDecoderOutput,
    GenerateDecoderOnlyOutput,
    GenerateEncoderDecoderOutput,
)
from transformers.modeling_outputs import BaseModelOutput, ModelOutput

from hfbridge.adapters.cache import output_cache

# Arguments of transformers' ``generate`` that this loop does not implement, and why (refused when given).
UNSUPPORTED_ARGUMENTS = {
    "assistant_model": "assisted generation",
    "assistant_tokenizer": "assisted generation",
    "synced_gpus": "multi-GPU synchronised generation",
    "negative_prompt_ids": "classifier-free guidance",
    "negative_prompt_attention_mask": "classifier-free guidance",
    "custom_generate": "custom generation functions",
    "inputs_embeds": "generation from embeddings; pass token ids",
    "position_ids": "given positions; they come from attention_mask",
    "past_key_values": "continuing from a given cache; each generation starts from an empty one",
    "cache": "continuing from a given cache; each generation starts from an empty one",
    "start_pos": "a start position; the loop sets it",
}

# GenerationConfig options this loop does not implement: (values that leave them off, what they ask for).
UNSUPPORTED_OPTIONS = {
    "num_beam_groups": ((None, 1), "diverse (group) beam search"),
    "diversity_penalty": ((None, 0.0), "diverse (group) beam search"),
    "constraints": ((None,), "constrained beam search"),
    "force_words_ids": ((None,), "constrained beam search"),
    "penalty_alpha": ((None, 0.0), "contrastive search"),
    "dola_layers": ((None,), "DoLa decoding"),
    "prompt_lookup_num_tokens": ((None,), "prompt lookup (assisted) decoding"),
    "assistant_early_exit": ((None,), "self-speculative (assisted) decoding"),
    "use_mtp": ((None, False), "multi-token-prediction (assisted) decoding"),
    "is_assistant": ((None, False), "use as an assistant model"),
    "guidance_scale": ((None, 1.0), "classifier-free guidance"),
    "watermarking_config": ((None,), "watermarking"),
    "token_healing": ((None, False), "token healing"),
    "low_memory": ((None, False), "sequential (low-memory) beam search"),
    "cache_implementation": ((None,), "a transformers cache implementation; the adapter's cache mode decides"),
    "cache_config": ((None,), "a transformers cache configuration"),
    "prefill_chunk_size": ((None,), "chunked prefill"),
    "compile_config": ((None,), "compiled decoding"),
    "output_attentions": ((None, False), "attentions in the generate output"),
    "output_hidden_states": ((None, False), "hidden states in the generate output"),
}

# transformers' global defaults of the options this loop reads (applied when neither the call nor the model sets one)
DEFAULTS = dict(
    max_length=20, min_length=0, do_sample=False, use_cache=True, early_stopping=False, num_beams=1,
    temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, length_penalty=1.0,
    no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, num_return_sequences=1, output_scores=False,
    return_dict_in_generate=False, remove_invalid_values=False, epsilon_cutoff=0.0, eta_cutoff=0.0,
    encoder_repetition_penalty=1.0,
)


class NativeGenerationMixin(GenerationMixin):
    """Gives an adapter architecture ``generate`` run by :func:`generate` (hfbridge's loop, not transformers')."""

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        prefix_allowed_tokens_fn=None,
        streamer=None,
        **kwargs,
    ) -> torch.LongTensor | ModelOutput:
        """Generate token ids as transformers' ``generate`` does (see :mod:`hfbridge.adapters.decoding`)."""
        return generate(self, inputs, generation_config, logits_processor, stopping_criteria,
                        prefix_allowed_tokens_fn, streamer, **kwargs)


# ============================================================================================ configuration
def generation_config_for(
    model, generation_config: GenerationConfig | None, kwargs: dict
) -> tuple[GenerationConfig, dict, bool]:
    """Merge as transformers does: kwargs over ``generation_config`` (else an empty one) over the model's
    ``generation_config`` over :data:`DEFAULTS`. Returns the config, the kwargs that are no generation option (model
    arguments), and whether ``max_length`` was left to its default."""
    model_config = model.generation_config or GenerationConfig()
    default_max_length = all(value is None for value in (
        kwargs.get("max_length"), getattr(generation_config, "max_length", None), model_config.max_length))
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    for source in (model_config.to_dict(), DEFAULTS):
        for key, value in source.items():
            if getattr(config, key, None) is None:
                setattr(config, key, value)
    model_kwargs = config.update(**kwargs)
    return config, model_kwargs, default_max_length


def refuse_unsupported(model_kwargs: dict, config: GenerationConfig) -> None:
    """A clear ``ValueError`` for a generate argument or option this loop does not implement (the arguments left
    unset are dropped from ``model_kwargs``)."""
    for name, what in UNSUPPORTED_ARGUMENTS.items():
        value = model_kwargs.pop(name, None)
        if value is not None and value is not False:
            raise ValueError(f"hfbridge's generate for native models does not support {name}= ({what})")
    for name, (off, what) in UNSUPPORTED_OPTIONS.items():
        value = getattr(config, name, None)
        if not any(value is o or value == o for o in off):
            raise ValueError(f"hfbridge's generate for native models does not support {name}={value!r} ({what})")


def check_model_kwargs(model, model_kwargs: dict) -> None:
    """Model arguments must be named by the model's forward or an adapter's ``_adapt`` (typos show up here)."""
    params = inspect.signature(model.forward).parameters.values()
    known = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for part in ("encoder", "decoder"):
        adapter = model._modules.get(part)
        if adapter is not None:
            known |= adapter._adapt_parameters()[0]
    unused = [key for key, value in model_kwargs.items() if value is not None and key not in known]
    if unused:
        raise ValueError(
            f"generate got {unused}: neither generation options nor arguments of {type(model).__name__}.forward "
            "or its adapters' _adapt (typos in generate arguments show up here)"
        )


@dataclasses.dataclass
class SpecialTokens:
    """The special token ids of one generation, as tensors."""

    eos: torch.Tensor | None  # 1-D: one or more end-of-sequence ids
    pad: torch.Tensor | None  # 0-D; the first eos id when unset
    bos: torch.Tensor | None
    start: torch.Tensor | None  # the decoder start of an encoder-decoder (its bos id when unset)


def special_tokens(config: GenerationConfig, is_encoder_decoder: bool, device: torch.device) -> SpecialTokens:
    """The ids of ``config`` as transformers prepares them (eos always 1-D, pad falling back to the first eos)."""

    def tensor(value):
        return None if value is None else torch.as_tensor(value, dtype=torch.long, device=device)

    eos, pad, bos, start = (tensor(config.eos_token_id), tensor(config.pad_token_id), tensor(config.bos_token_id),
                            tensor(config.decoder_start_token_id))
    if eos is not None and eos.ndim == 0:
        eos = eos.unsqueeze(0)
    if pad is None and eos is not None:
        pad = eos[0]
    if is_encoder_decoder:
        start = start if start is not None else bos
        if start is None:
            raise ValueError("`decoder_start_token_id` or `bos_token_id` has to be defined for encoder-decoder generation.")
    return SpecialTokens(eos=eos, pad=pad, bos=bos, start=start)


def set_lengths(config: GenerationConfig, input_length: int, default_max_length: bool, max_positions) -> None:
    """Resolve ``max_new_tokens``/``min_new_tokens`` into total lengths (``max_length``, ``min_length``)."""
    if config.max_new_tokens is not None:
        config.max_length = config.max_new_tokens + input_length
    elif default_max_length:
        warnings.warn(f"Using the model-agnostic default `max_length` (={config.max_length}) to control the "
                      "generation length; set `max_new_tokens` instead.", UserWarning, stacklevel=4)
        config.max_length += input_length
        if max_positions is not None:
            config.max_length = min(config.max_length, max_positions)
    if config.min_new_tokens is not None:
        config.min_length = config.min_new_tokens + input_length
    if input_length >= config.max_length:
        raise ValueError(f"Input length is {input_length}, but `max_length` is set to {config.max_length}; "
                         "increase `max_length` or, better, set `max_new_tokens`.")


# ============================================================================================ inputs
@dataclasses.dataclass
class Prompt:
    """What the loop starts from."""

    input_ids: torch.Tensor  # the decoder's tokens: the prompt (decoder-only) or the decoder start
    mask: torch.Tensor | None  # their attention mask; None: all attended
    forward_kwargs: dict  # arguments passed unchanged to every forward (encoder outputs and mask, model arguments)
    encoder_input_ids: torch.Tensor | None  # the input ids as given (the encoder's), for encoder-side processors

    def expanded(self, n: int) -> Prompt:
        """Each row repeated ``n`` times (beams, returned sequences)."""
        if n == 1:
            return self

        def rows(value):
            return value.repeat_interleave(n, dim=0) if isinstance(value, torch.Tensor) else value

        kwargs = {key: rows(value) for key, value in self.forward_kwargs.items()}
        if isinstance(kwargs.get("encoder_outputs"), ModelOutput):
            encoded = kwargs["encoder_outputs"]
            kwargs["encoder_outputs"] = type(encoded)(**{key: rows(value) for key, value in encoded.items()})
        return dataclasses.replace(self, input_ids=rows(self.input_ids), mask=rows(self.mask), forward_kwargs=kwargs)


def decoder_only_prompt(model, input_ids: torch.Tensor | None, kwargs: dict, tokens: SpecialTokens) -> Prompt:
    """The prompt (``bos`` when none), and its attention mask: given, else from padding; dropped when all ones."""
    if input_ids is None:
        if tokens.bos is None:
            raise ValueError("`bos_token_id` has to be defined when no `input_ids` are provided.")
        batch = next((v.shape[0] for v in kwargs.values() if isinstance(v, torch.Tensor)), 1)
        input_ids = torch.ones((batch, 1), dtype=torch.long, device=model.device) * tokens.bos
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        mask = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
        pad_in_prompt = tokens.pad is not None and bool(torch.isin(input_ids, tokens.pad).any())
        pad_is_eos = tokens.eos is not None and tokens.pad is not None and bool(torch.isin(tokens.eos, tokens.pad).any())
        if pad_in_prompt and not pad_is_eos:
            mask = input_ids.ne(tokens.pad).long()
    elif mask.dim() != 2:
        raise ValueError("`attention_mask` passed to `generate` must be 2D.")
    if bool((mask == 1).all()):
        mask = None
    return Prompt(input_ids, mask, kwargs, encoder_input_ids=input_ids)


def encoder_decoder_prompt(model, input_ids: torch.Tensor | None, kwargs: dict, tokens: SpecialTokens) -> Prompt:
    """Encode the inputs once; the decoder starts from ``decoder_input_ids`` (behind the start token) or the start."""
    encoded = kwargs.get("encoder_outputs")
    if encoded is None:
        if input_ids is None:
            raise ValueError("pass input_ids (or encoder_outputs) to generate")
        encoder_kwargs = {key: value for key, value in kwargs.items() if not key.startswith("decoder_")}
        encoded = model.get_encoder()(input_ids, **encoder_kwargs)
    elif not isinstance(encoded, ModelOutput):
        encoded = BaseModelOutput(last_hidden_state=encoded[0])
    kwargs["encoder_outputs"] = encoded
    batch = encoded.last_hidden_state.shape[0]
    device = encoded.last_hidden_state.device
    start = tokens.start.view(-1, 1) if tokens.start.ndim == 1 else torch.full((batch, 1), int(tokens.start))
    start = start.to(device)
    decoder_ids = kwargs.pop("decoder_input_ids", None)
    mask = kwargs.pop("decoder_attention_mask", None)
    if decoder_ids is None:
        decoder_ids = start
    elif bool((decoder_ids[:, 0] != start[:, 0]).all()):
        decoder_ids = torch.cat([start, decoder_ids], dim=-1)
        if mask is not None:
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=-1)
    return Prompt(decoder_ids, mask, kwargs, encoder_input_ids=input_ids)


# ============================================================================================ processors
def merge(defaults: list, custom: list | None) -> list:
    """transformers' merge: a custom processor (criterion) replaces the default of its type; others go last."""
    if not custom:
        return defaults
    merged = type(defaults)(next((c for c in custom if type(c) is type(d)), d) for d in defaults)
    merged.extend(c for c in custom if c not in merged)
    return merged


def logits_processors(
    config: GenerationConfig, tokens: SpecialTokens, prompt: Prompt, custom: LogitsProcessorList | None,
    prefix_allowed_tokens_fn, device: torch.device,
) -> LogitsProcessorList:
    """The processors transformers' ``generate`` builds from ``config``, in its order; then the warpers."""
    eos, input_length, encoder_ids = tokens.eos, prompt.input_ids.shape[1], prompt.encoder_input_ids
    p = LogitsProcessorList()
    if config.sequence_bias is not None:
        p.append(SequenceBiasLogitsProcessor(sequence_bias=config.sequence_bias))
    if config.encoder_repetition_penalty != 1.0 and _has(encoder_ids, "encoder_repetition_penalty"):
        p.append(EncoderRepetitionPenaltyLogitsProcessor(config.encoder_repetition_penalty, encoder_ids))
    if config.repetition_penalty != 1.0:
        padding = None if prompt.mask is None else (prompt.mask != 0).int().argmax(dim=1)
        p.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty, prompt_ignore_length=padding))
    if config.no_repeat_ngram_size > 0:
        p.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.encoder_no_repeat_ngram_size > 0 and _has(encoder_ids, "encoder_no_repeat_ngram_size"):
        p.append(EncoderNoRepeatNGramLogitsProcessor(config.encoder_no_repeat_ngram_size, encoder_ids))
    if config.bad_words_ids is not None:
        p.append(NoBadWordsLogitsProcessor(config.bad_words_ids, eos))
    if eos is not None and config.min_length > 0:
        p.append(MinLengthLogitsProcessor(config.min_length, eos, device=device))
    if eos is not None and config.min_new_tokens is not None and config.min_new_tokens > 0:
        p.append(MinNewTokensLengthLogitsProcessor(input_length, config.min_new_tokens, eos, device=device))
    if prefix_allowed_tokens_fn is not None:
        rows = max(config.num_beams, config.num_return_sequences)
        p.append(PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn, rows))
    if config.forced_bos_token_id is not None:
        p.append(ForcedBOSTokenLogitsProcessor(config.forced_bos_token_id))
    if config.forced_eos_token_id is not None:
        p.append(ForcedEOSTokenLogitsProcessor(config.max_length, config.forced_eos_token_id, device=device))
    if config.remove_invalid_values is True:
        p.append(InfNanRemoveLogitsProcessor())
    if config.exponential_decay_length_penalty is not None:
        p.append(ExponentialDecayLengthPenalty(config.exponential_decay_length_penalty, eos, input_length))
    if config.suppress_tokens is not None:
        p.append(SuppressTokensLogitsProcessor(config.suppress_tokens, device=device))
    if config.begin_suppress_tokens is not None:
        begin = input_length + (1 if input_length == 1 and config.forced_bos_token_id is not None else 0)
        p.append(SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, begin, device=device))
    p = merge(p, custom)
    if config.do_sample:
        p.extend(sampling_warpers(config, tokens, device))
    if config.renormalize_logits is True:
        p.append(LogitNormalization())
    return p


def _has(encoder_ids: torch.Tensor | None, option: str) -> bool:
    """Whether there are input ids for an encoder-side processor; without them it is skipped with a warning (as in
    transformers: generating from ``encoder_outputs`` alone)."""
    if encoder_ids is not None and encoder_ids.dim() == 2 and not bool((encoder_ids < 0).any()):
        return True
    warnings.warn(f"{option} needs the input_ids given to generate; ignoring it", UserWarning, stacklevel=5)
    return False


def sampling_warpers(config: GenerationConfig, tokens: SpecialTokens, device: torch.device) -> list:
    """Temperature, top-h/k/p, min-p, typical, epsilon and eta sampling, in transformers' order."""
    keep = 1 if config.num_beams == 1 else (2 if tokens.eos is None else tokens.eos.shape[0] + 1)
    warpers = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_h is not None:
        warpers.append(TopHLogitsWarper(top_h=config.top_h))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=keep))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=keep))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=keep))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=keep))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        warpers.append(EpsilonLogitsWarper(epsilon=config.epsilon_cutoff, min_tokens_to_keep=keep))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        warpers.append(EtaLogitsWarper(epsilon=config.eta_cutoff, min_tokens_to_keep=keep, device=device))
    return warpers


def stopping_criteria_for(
    config: GenerationConfig, tokens: SpecialTokens, custom: StoppingCriteriaList | None, tokenizer, max_positions,
) -> StoppingCriteriaList:
    """Maximum length, maximum time, stop strings and end-of-sequence, then the user's criteria."""
    criteria = StoppingCriteriaList([MaxLengthCriteria(config.max_length, max_position_embeddings=max_positions)])
    if config.max_time is not None:
        criteria.append(MaxTimeCriteria(max_time=config.max_time))
    if config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer: pass tokenizer=... to generate")
        criteria.append(StopStringCriteria(stop_strings=config.stop_strings, tokenizer=tokenizer))
    if tokens.eos is not None:
        criteria.append(EosTokenCriteria(eos_token_id=tokens.eos))
    return merge(criteria, custom)


# ============================================================================================ the model, step by step
class Stepper:
    """Runs the model's forward on the sequences so far and returns the next-token logits. With ``use_cache``, only
    the tokens not yet seen are run, and the state the forward returns (a transformers cache or a
    :class:`~hfbridge.adapters.cache.NativeCache`) is handed back at the next step."""

    def __init__(self, model, prompt: Prompt, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        encoder_decoder = bool(model.config.is_encoder_decoder)
        self.ids_key = "decoder_input_ids" if encoder_decoder else "input_ids"
        self.mask_key = "decoder_attention_mask" if encoder_decoder else "attention_mask"
        self.kwargs = {"logits_to_keep": 1, **prompt.forward_kwargs}
        self.state: Any = None
        self.seen = 0

    def logits(self, sequences: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        device = self.model.device
        call = dict(self.kwargs, use_cache=self.use_cache, return_dict=True, past_key_values=self.state)
        call[self.ids_key] = sequences[:, self.seen:].to(device)
        call[self.mask_key] = None if mask is None else mask.to(device)
        output = self.model(**call)
        if self.use_cache:
            self.state = output_cache(output)
            self.seen = sequences.shape[1] if self.state is not None else 0
        return output.logits[:, -1].to(copy=True, dtype=torch.float32, device=sequences.device)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search chose new beams: reorder the state (or drop it, to recompute the next step)."""
        if hasattr(self.state, "reorder_cache"):
            self.state.reorder_cache(beam_idx)
        else:
            self.state, self.seen = None, 0


def extended(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The attention mask with one more (attended) position."""
    return None if mask is None else torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)


@dataclasses.dataclass
class Result:
    sequences: torch.Tensor
    scores: tuple | None = None  # processed scores, one tensor per step
    logits: tuple | None = None  # raw logits, one tensor per step
    sequences_scores: torch.Tensor | None = None  # beam search
    beam_indices: torch.Tensor | None = None  # beam search


def pad_for_finished(criteria: StoppingCriteriaList, tokens: SpecialTokens) -> torch.Tensor | None:
    """The id finished sequences are padded with, when a criterion stops sequences one by one (end-of-sequence)."""
    if not any(hasattr(c, "eos_token_id") for c in criteria):
        return None
    if tokens.pad is None:
        raise ValueError("an end-of-sequence criterion needs pad_token_id (or eos_token_id) to pad finished sequences")
    return tokens.pad


def greedy_or_sample(stepper: Stepper, prompt: Prompt, processors, criteria, config: GenerationConfig,
                     tokens: SpecialTokens, streamer) -> Result:
    """Greedy search, or multinomial sampling (``do_sample``), one token per sequence per step."""
    input_ids, mask = prompt.input_ids, prompt.mask
    scores = () if config.return_dict_in_generate and config.output_scores else None
    raw = () if config.return_dict_in_generate and config.output_logits else None
    pad = pad_for_finished(criteria, tokens)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    while True:
        logits = stepper.logits(input_ids, mask)
        next_scores = processors(input_ids, logits)
        scores = scores + (next_scores,) if scores is not None else None
        raw = raw + (logits,) if raw is not None else None
        if config.do_sample:
            next_tokens = torch.multinomial(nn.functional.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_scores, dim=-1)
        if pad is not None:
            next_tokens = next_tokens * unfinished + pad.to(next_tokens.device) * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        mask = extended(mask)
        unfinished = unfinished & ~criteria(input_ids, scores)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if unfinished.max() == 0:
            return Result(input_ids, scores, raw)


# ============================================================================================ beam search
def _flatten(t: torch.Tensor) -> torch.Tensor:
    """(batch, beams, ...) -> (batch * beams, ...)"""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _unflatten(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch * beams, ...) -> (batch, beams, ...)"""
    return t.reshape(batch, -1, *t.shape[1:])


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The beams ``index`` (batch, k) of ``t`` (batch, beams, ...)."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


@dataclasses.dataclass
class Beams:
    """The state of a vectorized beam search (transformers 5.x): running beams and the best finished ones."""

    running: torch.Tensor  # (batch, beams, max_length) token ids
    running_scores: torch.Tensor  # (batch, beams) summed log-probabilities
    running_indices: torch.Tensor  # (batch, beams, max_new) the beam each token came from
    sequences: torch.Tensor  # finished beams, as above
    scores: torch.Tensor  # their length-penalised scores
    indices: torch.Tensor
    finished: torch.Tensor  # (batch, beams) whether a finished slot is filled
    improvable: torch.Tensor  # (batch, 1) whether a running beam may still beat the finished ones

    @classmethod
    def start(cls, input_ids: torch.Tensor, num_beams: int, max_length: int, fill: int) -> Beams:
        batch, length = input_ids.shape[0] // num_beams, input_ids.shape[1]
        device = input_ids.device
        running = torch.full((batch, num_beams, max_length), fill, dtype=torch.int64, device=device)
        running[:, :, :length] = _unflatten(input_ids, batch)
        running_scores = torch.zeros((batch, num_beams), dtype=torch.float, device=device)
        running_scores[:, 1:] = -1e9  # only the first beam's continuations at the first step
        indices = torch.full((batch, num_beams, max_length - length), -1, dtype=torch.int32, device=device)
        return cls(running=running, running_scores=running_scores, running_indices=indices,
                   sequences=running.clone(), scores=torch.full_like(running_scores, -1e9), indices=indices.clone(),
                   finished=torch.zeros_like(running_scores, dtype=torch.bool),
                   improvable=torch.ones((batch, 1), dtype=torch.bool, device=device))


def beam_fill_value(tokens: SpecialTokens) -> int:
    """What beam search pads sequences with: transformers' ``pad_token_id or eos_token_id[0] if eos_token_id is not
    None else -1`` (so a pad id of 0 yields the first eos id, and without eos the padding is -1)."""
    if tokens.eos is None:
        return -1
    return int(tokens.pad) if tokens.pad is not None and int(tokens.pad) != 0 else int(tokens.eos[0])


def top_k_continuations(b: Beams, log_probs: torch.Tensor, cur_len: int, prompt_len: int, do_sample: bool,
                        k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` best (or sampled, best first) continuations over all beams: scores, sequences, beam indices."""
    if do_sample:
        top_indices = torch.multinomial(nn.functional.softmax(log_probs, dim=-1), num_samples=k)
        top_scores, order = torch.gather(log_probs, 1, top_indices).sort(dim=-1, descending=True)
        top_indices = top_indices.gather(-1, order)
    else:
        top_scores, top_indices = torch.topk(log_probs, k=k)
    batch, num_beams = b.running.shape[:2]
    vocab = log_probs.shape[-1] // num_beams
    beam = top_indices // vocab
    sequences, indices = _gather(b.running, beam), _gather(b.running_indices, beam)
    sequences[:, :, cur_len] = top_indices % vocab
    offset = torch.arange(batch, device=beam.device).view(-1, 1) * num_beams
    indices[:, :, cur_len - prompt_len] = beam + offset
    return top_scores, sequences, indices


def keep_running(b: Beams, top_scores, top_sequences, top_indices, hits: torch.Tensor) -> None:
    """The best ``num_beams`` continuations that did not stop run on."""
    alive = top_scores + hits.to(torch.float32) * -1.0e9
    best = torch.topk(alive, k=b.running.shape[1])[1]
    b.running, b.running_scores, b.running_indices = _gather(top_sequences, best), _gather(alive, best), _gather(
        top_indices, best)


def update_finished(b: Beams, top_scores, top_sequences, top_indices, hits, cur_len: int, prompt_len: int,
                    config: GenerationConfig) -> None:
    """Continuations that stopped now (among the top ``num_beams``) join the finished beams if they score better."""
    num_beams = b.running.shape[1]
    top_num_beams = torch.arange(hits.shape[1], device=hits.device) < num_beams
    just_finished = hits & top_num_beams[None, :]
    scores = top_scores / ((cur_len + 1 - prompt_len) ** config.length_penalty)
    full = torch.all(b.finished, dim=-1, keepdim=True) & (config.early_stopping is True)
    scores = scores + full.to(torch.float32) * -1.0e9
    scores = scores + (~b.improvable).to(torch.float32) * -1.0e9
    scores = scores + (~just_finished) * -1.0e9
    merged_scores = torch.cat((b.scores, scores), dim=1)
    best = torch.topk(merged_scores, k=num_beams)[1]
    b.sequences = _gather(torch.cat((b.sequences, top_sequences), dim=1), best)
    b.scores = _gather(merged_scores, best)
    b.indices = _gather(torch.cat((b.indices, top_indices), dim=1), best)
    b.finished = _gather(torch.cat((b.finished, just_finished), dim=1), best)


def still_improvable(b: Beams, cur_len: int, prompt_len: int, config: GenerationConfig) -> torch.Tensor:
    """transformers' early-stopping heuristic: can the best running beam still beat the worst finished one?"""
    if config.early_stopping == "never" and config.length_penalty > 0.0:
        best_length = config.max_length - prompt_len
    else:
        best_length = cur_len - prompt_len
    best_running = b.running_scores[:, :1] / (best_length**config.length_penalty)
    worst_finished = torch.where(b.finished, torch.min(b.scores, dim=1, keepdim=True)[0], -1.0e9)
    return b.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)


def beam_search(stepper: Stepper, prompt: Prompt, processors, criteria, config: GenerationConfig,
                tokens: SpecialTokens) -> Result:
    """transformers 5.x's vectorized beam search (``num_beams`` > 1; with ``do_sample``, beam sampling)."""
    num_beams, mask = config.num_beams, prompt.mask
    cur_len = prompt_len = prompt.input_ids.shape[1]
    batch = prompt.input_ids.shape[0] // num_beams
    k = max(2, 1 + (0 if tokens.eos is None else tokens.eos.shape[0])) * num_beams
    b = Beams.start(prompt.input_ids, num_beams, config.max_length, beam_fill_value(tokens))
    scores = () if config.return_dict_in_generate and config.output_scores else None
    raw = () if config.return_dict_in_generate and config.output_logits else None
    while True:
        flat = _flatten(b.running[:, :, :cur_len])
        logits = stepper.logits(flat, mask)
        log_probs = processors(flat, nn.functional.log_softmax(logits, dim=-1))
        scores = scores + (log_probs.clone(),) if scores is not None else None
        raw = raw + (logits.clone(),) if raw is not None else None
        log_probs = (_unflatten(log_probs, batch) + b.running_scores[:, :, None]).reshape(batch, -1)
        top = top_k_continuations(b, log_probs, cur_len, prompt_len, bool(config.do_sample), k)
        hits = _unflatten(criteria(_flatten(top[1][:, :, : cur_len + 1]), scores), batch)
        keep_running(b, *top, hits)
        update_finished(b, *top, hits, cur_len, prompt_len, config)
        stepper.reorder(_flatten(b.running_indices[..., cur_len - prompt_len]))
        mask = extended(mask)
        cur_len += 1
        b.improvable = still_improvable(b, cur_len, prompt_len, config)
        open_beams = ~(torch.all(b.finished) & (config.early_stopping is True))
        if not bool(torch.any(b.improvable) & open_beams & ~torch.all(hits)):
            break
    n = config.num_return_sequences
    sequences, indices = _flatten(b.sequences[:, :n]), _flatten(b.indices[:, :n])
    generated = int((indices + 1).bool().sum(dim=1).max())
    return Result(sequences[:, : prompt_len + generated], scores, raw, sequences_scores=_flatten(b.scores[:, :n]),
                  beam_indices=indices[:, :generated])


# ============================================================================================ generate
def generate(model, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
             logits_processor: LogitsProcessorList | None = None,
             stopping_criteria: StoppingCriteriaList | None = None, prefix_allowed_tokens_fn=None, streamer=None,
             **kwargs) -> torch.LongTensor | ModelOutput:
    """Generate with ``model`` (an adapter architecture with a generation head) as transformers' ``generate``."""
    if not model.can_generate():
        raise ValueError(f"{type(model).__name__} has no generation head (it is a base model): it cannot generate")
    config, model_kwargs, default_max_length = generation_config_for(model, generation_config, kwargs)
    refuse_unsupported(model_kwargs, config)
    tokenizer = model_kwargs.pop("tokenizer", None)
    check_model_kwargs(model, model_kwargs)
    beams = config.num_beams > 1
    if streamer is not None and beams:
        raise ValueError("`streamer` cannot be used with beam search; set num_beams=1")

    encoder_decoder = bool(model.config.is_encoder_decoder)
    if inputs is not None and model_kwargs.get("input_ids") is not None:
        raise ValueError("pass either inputs or input_ids to generate, not both")
    input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
    tokens = special_tokens(config, encoder_decoder, input_ids.device if input_ids is not None else model.device)
    make_prompt = encoder_decoder_prompt if encoder_decoder else decoder_only_prompt
    prompt = make_prompt(model, input_ids, model_kwargs, tokens)
    prompt = prompt.expanded(max(config.num_beams, config.num_return_sequences))
    if streamer is not None:
        streamer.put(prompt.input_ids.cpu())

    max_positions = getattr(model.config, "max_position_embeddings", None)
    set_lengths(config, prompt.input_ids.shape[1], default_max_length, max_positions)
    device = prompt.input_ids.device
    processors = logits_processors(config, tokens, prompt, logits_processor, prefix_allowed_tokens_fn, device)
    criteria = stopping_criteria_for(config, tokens, stopping_criteria, tokenizer, max_positions)
    stepper = Stepper(model, prompt, bool(config.use_cache))
    if beams:
        result = beam_search(stepper, prompt, processors, criteria, config, tokens)
    else:
        result = greedy_or_sample(stepper, prompt, processors, criteria, config, tokens, streamer)
    if streamer is not None:
        streamer.end()
    return generate_output(result, config, encoder_decoder, beams)


def generate_output(result: Result, config: GenerationConfig, encoder_decoder: bool, beams: bool):
    """The sequences, or with ``return_dict_in_generate`` transformers' ``Generate*Output`` (no cache in it)."""
    if not config.return_dict_in_generate:
        return result.sequences
    fields = dict(sequences=result.sequences, scores=result.scores, logits=result.logits)
    if beams:
        output_class = GenerateBeamEncoderDecoderOutput if encoder_decoder else GenerateBeamDecoderOnlyOutput
        fields.update(beam_indices=result.beam_indices,
                      sequences_scores=result.sequences_scores if config.output_scores else None)
    else:
        output_class = GenerateEncoderDecoderOutput if encoder_decoder else GenerateDecoderOnlyOutput
    return output_class(**fields)

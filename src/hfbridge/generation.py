"""Batched, left-padded generation with input-length budgeting.

Prompts are tokenized exactly as training renders them (:mod:`hfbridge.data.formats`), sorted by length so
batches carry little padding, left-padded, generated in batches, and returned in the original order. A prompt
longer than ``context - max_new_tokens`` keeps its last tokens (with a warning), so generation never runs past
the model's context.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from hfbridge.data.formats import render_chat, render_prompt
from hfbridge.models.loading import context_length

log = logging.getLogger(__name__)

Prompt = str | Sequence[dict] | Sequence[int]


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: a string (rendered as the ``prompt_completion`` format does), chat messages
    (rendered with the chat template and the assistant generation prompt), or token ids (taken as they are)."""
    if isinstance(prompt, str):
        return render_prompt(tokenizer, prompt)
    if len(prompt) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    text = render_chat(tokenizer, list(prompt), add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def input_budget(model, max_new_tokens: int, max_input_length: int | None = None) -> int | None:
    """How many prompt tokens fit: ``context - max_new_tokens`` (and at most ``max_input_length``)."""
    context = context_length(model.config) if hasattr(model, "config") else None
    budget = None if context is None else context - max_new_tokens
    if budget is not None and budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {context}")
    if max_input_length is not None:
        budget = max_input_length if budget is None else min(budget, max_input_length)
    return budget


CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24 names it ``cache``; before, ``past_key_values``


def cache_argument(forward_parameters) -> str | None:
    """The name under which a model's ``forward`` takes a KV cache (given its parameter names), or ``None``."""
    return next((name for name in CACHE_ARGUMENTS if name in forward_parameters), None)


def returned_cache(output):
    """The KV cache a model's forward returned, under either name."""
    return next((output.get(name) for name in CACHE_ARGUMENTS if output.get(name) is not None), None)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, length - len(seq) :] = 1
    return ids, mask


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_input_length: int | None = None,
    **generate_kwargs,
) -> list[list[int]]:
    """Generated token ids (without the prompt) for each prompt, in order."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    budget = input_budget(model, max_new_tokens, max_input_length)
    if budget is not None:
        cut = sum(len(e) > budget for e in encoded)
        if cut:
            log.warning("%d of %d prompts were longer than %d tokens and keep only their last tokens",
                        cut, len(encoded), budget)
        encoded = [e[-budget:] for e in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", pad_id)
    if generate_kwargs["do_sample"] is False:
        # Greedy decoding: do not inherit sampling settings from the model's generation config.
        generate_kwargs.setdefault("temperature", None)
        generate_kwargs.setdefault("top_p", None)
        generate_kwargs.setdefault("top_k", None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[list[int] | None] = [None] * len(encoded)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = left_pad([encoded[i] for i in idx], pad_id)
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                **generate_kwargs,
            )
            new = out[:, ids.shape[1] :].tolist()
            for i, tokens in zip(idx, new):
                results[i] = _strip_after_eos(tokens, tokenizer, pad_id)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _strip_after_eos(tokens: list[int], tokenizer, pad_id: int) -> list[int]:
    stops = {tokenizer.eos_token_id, pad_id}
    gen_eos = getattr(getattr(tokenizer, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        stops.add(gen_eos)
    for n, tok in enumerate(tokens):
        if tok in stops:
            return tokens[:n]
    return tokens


def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_input_length: int | None = None,
    **generate_kwargs,
) -> list[str]:
    """Generate a completion for each prompt (strings or chat message lists), batched and left-padded."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, max_input_length, **generate_kwargs)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in ids]

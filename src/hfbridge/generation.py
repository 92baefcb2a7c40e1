"""Batched, left-padded generation with input-length budgeting.

Prompts are tokenized exactly as training renders them (:mod:`hfbridge.data.formats`), sorted by length so
batches carry little padding, left-padded, generated in batches, and returned in the original order. A prompt
longer than ``context - max_new_tokens`` keeps its last tokens (with a warning), so generation never runs past
the model's context.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from hfbridge.data.formats import pad_id, render_chat, render_prompt
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


def stop_ids(tokenizer, model=None) -> set[int]:
    """Token ids that end an answer: the tokenizer's EOS and pad, and the EOS ids of the model's (or tokenizer's)
    generation config."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    stops = {pad_id(tokenizer)}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    for owner in (model, tokenizer):
        eos = getattr(getattr(owner, "generation_config", None), "eos_token_id", None)
        stops.update([eos] if isinstance(eos, int) else list(eos or []))
    return stops


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for n, tok in enumerate(tokens):
        if tok in stops:
            return tokens[:n]
    return tokens


@torch.no_grad()
def generate_batched(
    model,
    items: Sequence,
    lengths: Sequence[int],
    make_inputs: Callable[[list], dict],
    *,
    max_new_tokens: int,
    batch_size: int,
    pad_token_id: int,
    stops: set[int],
    **generate_kwargs,
) -> list[list[int]]:
    """The one decoding loop of hfbridge: ``items`` sorted by ``lengths`` (batches carry little padding), in
    batches of ``batch_size``, ``make_inputs(batch)`` gives the left-padded model inputs, greedy unless told
    otherwise; returns each item's new tokens up to the first of ``stops``, in the original order."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", pad_token_id)
    if generate_kwargs["do_sample"] is False:
        # Greedy decoding: do not inherit sampling settings from the model's generation config.
        for key in ("temperature", "top_p", "top_k"):
            generate_kwargs.setdefault(key, None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    results: list[list[int] | None] = [None] * len(items)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in make_inputs([items[i] for i in idx]).items()}
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
            new = out[:, inputs["input_ids"].shape[1] :].tolist()
            for i, tokens in zip(idx, new):
                results[i] = _until_stop(tokens, stops)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


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
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    budget = input_budget(model, max_new_tokens, max_input_length)
    if budget is not None:
        cut = sum(len(e) > budget for e in encoded)
        if cut:
            log.warning("%d of %d prompts were longer than %d tokens and keep only their last tokens",
                        cut, len(encoded), budget)
        encoded = [e[-budget:] for e in encoded]
    pad = pad_id(tokenizer)

    def make_inputs(batch: list[list[int]]) -> dict:
        ids, mask = left_pad(batch, pad)
        return {"input_ids": ids, "attention_mask": mask}

    return generate_batched(model, encoded, [len(e) for e in encoded], make_inputs, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, pad_token_id=pad, stops=stop_ids(tokenizer, model), **generate_kwargs)


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


def generate_image_text(
    model, processor, records: Sequence, max_new_tokens: int = 32, batch_size: int = 8, **generate_kwargs
) -> list[str]:
    """Answer each image-text prompt (a :class:`~hfbridge.data.image_text.ImageTextRecord` whose messages end before the
    answer) through the one loop above: rendered with the chat template and its generation prompt as training
    renders it, with its images, sorted by length, left-padded in batches. A prompt whose tokens leave no room for
    ``max_new_tokens`` in the model's context is an error (its image tokens cannot be cut)."""
    from hfbridge.data.image_text import image_text_inputs, prompt_length

    context = context_length(model.config) if hasattr(model, "config") else None

    def make_inputs(batch: list) -> dict:
        inputs = image_text_inputs(processor, batch)
        if context is not None and inputs["input_ids"].shape[1] + max_new_tokens > context:
            where = ", ".join(r.where for r in batch)
            raise ValueError(f"{where}: a prompt of {inputs['input_ids'].shape[1]} tokens leaves no room for "
                             f"max_new_tokens={max_new_tokens} in the model's context of {context}")
        return dict(inputs)

    ids = generate_batched(
        model, list(records), [prompt_length(processor, r) for r in records], make_inputs,
        max_new_tokens=max_new_tokens, batch_size=batch_size, pad_token_id=pad_id(processor),
        stops=stop_ids(processor, model), **generate_kwargs,
    )
    return [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]

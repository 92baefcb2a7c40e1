"""Turn records into token ids and next-token labels.

Three formats:

* ``text``: ``{"text": ...}``, every token trained (pretraining / continued pretraining);
* ``prompt_completion``: ``{"prompt": ..., "completion": ...}``, only the completion (and EOS) trained;
* ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with the tokenizer's chat
  template; only assistant turns are trained, their end-of-turn token included.

Each record becomes a :class:`TokenizedSample` whose ``labels`` are already shifted (see
:func:`shift_for_causal_lm`): this module is the one place where the causal shift happens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hfbridge.losses import IGNORE_INDEX

FORMATS = ("text", "prompt_completion", "messages")
FORMAT_FIELDS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",)}


class DataFormatError(ValueError):
    """A record that does not fit its format; the message names the record."""


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]  # next-token targets aligned with input_ids; IGNORE_INDEX where not trained
    truncated: bool = False

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def shift_for_causal_lm(token_ids: Sequence[int], trained: Sequence[bool]) -> tuple[list[int], list[int]]:
    """The causal shift: ``input_ids = ids[:-1]`` and ``labels[t] = ids[t + 1]`` where ``trained[t + 1]``.

    ``trained[i]`` says whether token ``i`` is a target. The first target token (for example the first
    completion token) is therefore predicted from the last prompt token, and is trained.
    """
    if len(token_ids) != len(trained):
        raise ValueError("token_ids and trained must have the same length")
    input_ids = list(token_ids[:-1])
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(token_ids[1:], trained[1:])]
    return input_ids, labels


def detect_format(record: dict) -> str:
    """The format a record is in, from its fields."""
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise DataFormatError(
        f"cannot tell the format of a record with fields {sorted(record)}: expected 'text', "
        "'prompt' and 'completion', or 'messages'"
    )


ROLES = ("system", "developer", "user", "assistant", "tool")


def _check_content(content, parts_allowed: bool, where: str) -> None:
    """A message's content: a string, or (for image-text records, whose parser checks each part) a list of parts."""
    if isinstance(content, str) or (parts_allowed and isinstance(content, list)):
        return
    wanted = "a string or a list of parts" if parts_allowed else "a string"
    raise DataFormatError(f"{where}: must be {wanted}, got {type(content).__name__}")


def check_record(record: dict, fmt: str, where: str, content_parts: bool = False) -> None:
    """Raise a :class:`DataFormatError` naming ``where`` if ``record`` does not fit ``fmt``. Chat contents are
    strings, or with ``content_parts`` (image-text records) lists of typed parts."""
    if fmt not in FORMATS:
        raise DataFormatError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected an object with fields, got {type(record).__name__}")
    for field in FORMAT_FIELDS[fmt]:
        if field not in record or record[field] is None:
            raise DataFormatError(
                f"{where}: missing field {field!r} for format {fmt!r} (fields present: {sorted(record)})"
            )
    if fmt == "messages":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataFormatError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataFormatError(f"{where}: messages[{i}] must have 'role' and 'content'")
            if message["role"] not in ROLES:
                raise DataFormatError(f"{where}: messages[{i}].role is {message['role']!r}; allowed: "
                                      f"{', '.join(ROLES)}")
            _check_content(message["content"], content_parts, f"{where}: messages[{i}].content")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataFormatError(f"{where}: no assistant turn in 'messages', so nothing would be trained")
    else:
        for field in FORMAT_FIELDS[fmt]:
            if not isinstance(record[field], str):
                raise DataFormatError(
                    f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}"
                )


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS. The tokenizer is never changed."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an EOS token to pad batches with")
    return int(pad)


def _eos_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _bos_ids(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    add_bos = getattr(tokenizer, "add_bos_token", False)
    return [bos] if (bos is not None and add_bos) else []


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt as the model sees it at generation time (prompt_completion format)."""
    return _bos_ids(tokenizer) + _encode(tokenizer, prompt)


def _tokens_text(tokenizer, record: dict) -> tuple[list[int], list[bool]]:
    ids = _bos_ids(tokenizer) + _encode(tokenizer, record["text"]) + _eos_ids(tokenizer)
    return ids, [True] * len(ids)


def _tokens_prompt_completion(tokenizer, record: dict) -> tuple[list[int], list[bool]]:
    prompt = render_prompt(tokenizer, record["prompt"])
    completion = _encode(tokenizer, record["completion"]) + _eos_ids(tokenizer)
    return prompt + completion, [False] * len(prompt) + [True] * len(completion)


def chat_template_or_error(tokenizer, where: str = "tokenizer"):
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataFormatError(
            f"{where} has no chat template, so 'messages' records cannot be rendered; use the 'text' or "
            "'prompt_completion' format, or set tokenizer.chat_template"
        )
    return template


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    chat_template_or_error(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(chat, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    ``chat`` is anything with a chat template and ``apply_chat_template`` (a tokenizer, or a multimodal
    processor). An assistant turn ``i`` spans from the end of ``render(messages[:i], add_generation_prompt=True)``
    to the end of ``render(messages[: i + 1])``: its content and the template's end-of-turn token(s). This holds
    for any template whose renderings are prefixes of each other (checked; a template that is not gets a clear
    error).
    """
    full = render_chat(chat, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(chat, messages[:i], add_generation_prompt=True) if i else ""
        through = render_chat(chat, messages[: i + 1])
        if not full.startswith(through) or not through.startswith(before):
            raise DataFormatError(
                "the chat template does not render conversations incrementally (a prefix of the conversation "
                "is not a prefix of its rendering), so assistant turns cannot be located"
            )
        spans.append((len(before), len(through)))
    return full, spans


def tokens_in_spans(offsets: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token's ``(start, end)`` character offsets: does it end inside one of ``spans``? (Tokens may
    carry a leading space, so the end decides; zero-width tokens such as padding never do.)"""
    return [any(s < end <= e for s, e in spans) for _start, end in offsets]


def _tokens_messages(tokenizer, record: dict) -> tuple[list[int], list[bool]]:
    """Render the conversation, locate its assistant turns (:func:`assistant_spans`) and mark their tokens
    from their character offsets."""
    full, spans = assistant_spans(tokenizer, record["messages"])
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return encoding["input_ids"], tokens_in_spans(encoding["offset_mapping"], spans)


_TOKENIZERS = {"text": _tokens_text, "prompt_completion": _tokens_prompt_completion, "messages": _tokens_messages}


def tokenize_record(tokenizer, record: dict, fmt: str, max_length: int | None = None) -> TokenizedSample:
    """Tokenize one record into shifted ``input_ids``/``labels``, truncated to ``max_length`` input tokens."""
    ids, trained = _TOKENIZERS[fmt](tokenizer, record)
    input_ids, labels = shift_for_causal_lm(ids, trained)
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedSample(input_ids=input_ids, labels=labels, truncated=truncated)


def tokenize_records(
    tokenizer, records: Iterable[dict], fmt: str, max_length: int | None = None
) -> list[TokenizedSample]:
    return [tokenize_record(tokenizer, r, fmt, max_length) for r in records]


def last_assistant_turn(messages: Sequence[dict]) -> int:
    """The index of the last assistant turn: what a chat record's prompt ends before, and its reference."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataFormatError("a chat record without an assistant turn has no reference answer to evaluate")
    return turns[-1]


def prompt_and_reference(record: dict, fmt: str):
    """Split a record into what the model is asked (a prompt string or the messages before the last assistant
    turn) and the reference answer (the completion, or the last assistant turn's content)."""
    if fmt == "prompt_completion":
        return record["prompt"], record["completion"]
    if fmt == "messages":
        messages = record["messages"]
        last = last_assistant_turn(messages)
        return messages[:last], messages[last]["content"]
    raise DataFormatError("'text' records have no prompt and reference to evaluate generation on")

"""The request bodies the server takes, checked strictly: a wrong type, a value out of range, text that is not
valid Unicode (a lone surrogate), an unknown role, or a feature this server does not have is a 400 with a message
that names the field, never a 500.

Fields OpenAI defines that change nothing here (``user``, ``metadata``, ``store``, ...) are accepted and ignored;
fields whose meaning this server cannot honour (``tools``, ``response_format`` JSON, ``suffix``, ...) are refused.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hfbridge.serving.errors import bad_request

MAX_DEPTH = 32  # JSON nesting: the deepest valid request is about 5 levels
MAX_STOPS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API (its legacy completions API stops at 5)
MAX_LOGIT_BIAS = 300  # tokens one request may bias, as OpenAI
MAX_MESSAGES = 1024
INT64 = 2**63


def _is_unicode(text: str) -> bool:
    """False for a string JSON can carry but UTF-8 cannot (a lone surrogate, ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _valid_unicode(text: str) -> str:
    if not _is_unicode(text):
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)")
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_tree(value, limit: int) -> None:
    """No nesting deeper than ``limit`` and no string that is not valid Unicode, anywhere in ``value`` (an
    iterative walk: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not _is_unicode(item):
                raise bad_request("the body holds text that is not valid Unicode (a lone surrogate)")
        elif isinstance(item, (dict, list)):
            if depth > limit:
                raise bad_request(f"the JSON body nests deeper than {limit} levels")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def parse_json(body: bytes, lists: bool = False):
    """The request body as a JSON object (or a list, with ``lists``); anything else (not JSON, NaN, nested past
    :data:`MAX_DEPTH`, a lone surrogate) is a 400."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise bad_request(f"the JSON body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer too long to convert
        raise bad_request(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, (dict, list) if lists else dict):
        raise bad_request(f"the body must be a JSON object, not {type(data).__name__}")
    _check_tree(data, MAX_DEPTH)
    return data


def validate(model: type[BaseModel], data: dict):
    """``model`` built from ``data``, or a 400 naming the first field that is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("function-", "list[")))
        message = first["msg"].removeprefix("Value error, ")
        raise bad_request(f"{where}: {message}" if where else message, param=where or None) from None


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text
    name: Text | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value):
        """OpenAI's content parts: only text parts, joined; anything else is refused, not dropped."""
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts")
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(f"content part {i}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                 "supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i}: 'text' must be a string")
            texts.append(part["text"])
        return "".join(texts)

    def as_dict(self) -> dict:
        """The turn as the chat template takes it (``developer`` is the newer name of ``system``)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class _Sampling(_Strict):
    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values lie in [-100, 100], got {bias} for token {key}")
        return value

    @property
    def biases(self) -> dict[int, float]:
        """``logit_bias`` by token id."""
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        refused = self._refused()
        for name, bad in refused.items():
            if bad:
                raise ValueError(f"{name} is not supported by this server; leave it out")
        return self

    @property
    def top_k_logprobs(self) -> int | None:
        """How many most likely tokens to report beside each chosen token's log-probability (``None``: no
        log-probabilities asked)."""
        return None

    def _refused(self) -> dict[str, bool]:
        return {}

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None

    def _refused(self) -> dict[str, bool]:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return {"tools": bool(self.tools), "functions": bool(self.functions),
                "response_format": (self.response_format or {"type": "text"}).get("type") != "text"}

    @property
    def top_k_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value):
        shapes = (str, int, list)
        if isinstance(value, str):
            return value
        if (not isinstance(value, list) or not value or any(isinstance(v, bool) for v in value)
                or not any(all(type(v) is shape for v in value) for shape in shapes)):
            raise ValueError("prompt must be a string, a non-empty list of strings, a list of token ids, or a list "
                             "of token-id lists")
        return value

    def _refused(self) -> dict[str, bool]:
        return {"suffix": bool(self.suffix), "best_of": self.best_of not in (None, 1, self.n)}

    @property
    def top_k_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    @property
    def requested_tokens(self) -> int | None:
        return self.max_tokens


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (as vLLM's, which lm-eval's remote tokenizer speaks): a text's token ids, or a chat's
    as ``/v1/chat/completions`` renders it."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt (a text) or messages (a chat)")
        return self


class DetokenizeRequest(_Strict):
    """``POST /detokenize``: the text of token ids."""

    model: Text | None = None
    tokens: list[int] = Field(max_length=1 << 20)

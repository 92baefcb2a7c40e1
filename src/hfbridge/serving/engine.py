"""Rows (one choice of one request) decoded together through hfbridge's one decoding loop.

A batch of rows is one call of :func:`hfbridge.generation.generate_batched`, steered row by row
(:class:`hfbridge.generation.Steering`): greedy models run hfbridge's fast greedy loop, others ``model.generate``,
and the steering does the same on both, so the rows are independent of each other:

* it samples each sampled row with its own temperature, ``top_p`` and random generator (seeded by the request's
  ``seed``: the same request gives the same text whatever else shares its batch); greedy rows take the argmax;
* it sees every new token: it ends a row at an end-of-sequence token, at its own ``max_tokens``, at a ``stop``
  string (found in the decoded text, so across token boundaries), when its request was cancelled (the client
  went away) or when its deadline passed; it streams the text that can no longer change.
  A finished row takes no more tokens (on the fast path it leaves the batch); when every row is finished the
  batch returns.

The tokenizer is used only under :attr:`Engine.lock` (a fast tokenizer shared by threads raises "Already
borrowed").
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hfbridge.data.formats import pad_id
from hfbridge.generation import (
    PrefixStore,
    Prompt,
    Steering,
    generate_batched,
    left_pad,
    prompt_ids,
    stop_ids,
)
from hfbridge.models.loading import context_length

log = logging.getLogger(__name__)

PREFIXES = 8  # shared prompt prefixes the engine keeps (a few system prompts of a few hundred tokens: tens of MB)


@dataclass
class Event:
    """What a row reports to its request: ``delta`` (streamed text), ``end`` (the final text and why it ended),
    or ``error``."""

    kind: str
    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    logprobs: list | None = None  # streamed with ``logprobs``: the tokens' TokenLogprob not streamed before


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (the raw distribution: before temperature or ``top_p``), and
    the most likely tokens at its position with theirs, most likely first."""

    token: int
    logprob: float | None  # None: a prompt's first token (nothing precedes it)
    top: list[tuple[int, float]]


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """``TokenLogprob`` of each of ``tokens`` from the log-probabilities ``[len(tokens), vocab]`` (float32)."""
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
    if k:
        values, ids = logprobs.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens.tolist(), chosen, tops)]


class Row:
    """One choice being generated: its prompt ids, limits and sampling settings, and what came of it so far."""

    def __init__(self, prompt: list[int], max_tokens: int, *, index: int = 0, stops: Sequence[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stream: bool = False,
                 deadline: float = math.inf, sink: Callable[[Event], None] | None = None,
                 logprobs: int | None = None, echo: bool = False, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None):
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.index = index
        self.stops = list(stops)
        self.temperature = temperature
        self.top_p = top_p
        self.seed = secrets.randbits(63) if seed is None else (seed * 1_000_003 + index) % 2**63
        self.stream = stream
        self.deadline = deadline
        self.sink = sink
        self.tokens: list[int] = []
        self.sent = ""  # text already streamed
        self.text: str | None = None
        self.finish_reason: str | None = None
        self.cancelled = False
        self._generator: torch.Generator | None = None
        # log-probabilities: of each new token, and of the ``logprobs`` most likely tokens at its step (``None``:
        # not asked); with ``echo``, the same for each prompt token after the first (the first has none)
        self.logprobs = logprobs
        self.echo = echo
        # OpenAI's adjustments of the logits before choosing: minus presence_penalty for every token the answer
        # holds, minus frequency_penalty times how often, plus each token's logit_bias
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.logit_bias = dict(logit_bias or {})
        self.token_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] = []
        self.logprobs_sent = 0  # how many of token_logprobs were streamed
        self._picked: TokenLogprob | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    def cancel(self) -> None:
        """Drop this row from decoding at the next step (or before it starts)."""
        self.cancelled = True

    def emit(self, event: Event) -> None:
        if self.sink is not None:
            self.sink(event)

    def fail(self, message: str) -> None:
        if not self.finished:
            self.finish_reason = "error"
            self.emit(Event("error", self.index, text=message))

    def unsent_logprobs(self) -> list[TokenLogprob] | None:
        """The log-probabilities not streamed yet, now counted as streamed (``None`` when none were asked)."""
        if self.logprobs is None:
            return None
        new, self.logprobs_sent = self.token_logprobs[self.logprobs_sent:], len(self.token_logprobs)
        return new

    def echoed_logprobs(self) -> list[TokenLogprob]:
        """The prompt's tokens as ``echo`` reports them: the first with no log-probability, then the rest."""
        return [TokenLogprob(self.prompt[0], None, [])] + self.prompt_logprobs

    @property
    def adjusted(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """This row's logits (one row's, float32) with its penalties and biases applied (a new tensor)."""
        logits = logits.clone()
        if self.logit_bias:
            ids = torch.tensor(list(self.logit_bias), device=logits.device)
            logits[ids] += torch.tensor(list(self.logit_bias.values()), device=logits.device)
        if self.tokens and (self.presence_penalty or self.frequency_penalty):
            counts = torch.bincount(torch.tensor(self.tokens, device=logits.device), minlength=logits.shape[0])
            counts = counts[: logits.shape[0]].to(logits.dtype)
            logits -= counts * self.frequency_penalty + (counts > 0).to(logits.dtype) * self.presence_penalty
        return logits

    def sample(self, scores: torch.Tensor) -> int:
        """A token drawn from ``scores`` (one row's logits) with this row's temperature, top_p and generator."""
        if self._generator is None:
            self._generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        probs = torch.softmax(scores / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < self.top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self._generator))


def stable_prefix(text: str, stops: Sequence[str]) -> str:
    """The part of ``text`` that more tokens cannot change: without a trailing incomplete character (decoded as
    U+FFFD) and without a tail that could be the start of a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return text[: len(text) - hold]


class Engine:
    """The model and its tokenizer, shared by every request: encodes prompts and decodes batches of rows."""

    def __init__(self, model, tokenizer, *, generate_kwargs: dict | None = None, fast_greedy: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.lock = threading.RLock()
        self.pad = pad_id(tokenizer)
        self.stops = stop_ids(tokenizer, model)
        self.context = context_length(model.config) if hasattr(model, "config") else None
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size = int(embeddings.weight.shape[0]) if embeddings is not None else len(tokenizer)
        self.generate_kwargs = dict(generate_kwargs or {})
        self.fast_greedy = fast_greedy  # False: every batch through model.generate (the reference the tests use)
        self.generate_calls = 0
        self.prefixes = PrefixStore(PREFIXES)  # shared prompt prefixes (system prompts), kept across batches

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: Prompt) -> list[int]:
        """Prompt ids exactly as training renders them (:func:`hfbridge.generation.prompt_ids`)."""
        with self.lock:
            return prompt_ids(self.tokenizer, prompt)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        with self.lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's ids of ``text`` as they are (no template), with or without its special tokens."""
        with self.lock:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def tokenizer_info(self) -> dict:
        """The special tokens and chat template (what lm-eval's remote tokenizer reads)."""
        t = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        return {"eos_token": t.eos_token, "bos_token": t.bos_token, "pad_token": t.pad_token,
                "chat_template": getattr(t, "chat_template", None), "model_max_length": self.context,
                "vocab_size": self.vocab_size}

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text (special tokens included), as log-probabilities name them."""
        with self.lock:
            return [self.tokenizer.decode([t]) for t in ids]

    def run(self, rows: list[Row], joining: Callable[[int], list[Row]] | None = None) -> None:
        """Decode ``rows`` as one batch (one call of the decoding loop); every row ends with an ``end`` event.

        ``joining(rows decoding now)``, asked between steps on the fast path, gives rows that join the batch
        (continuous batching); through ``model.generate`` it is never asked."""
        batches: list[_Batch] = []

        def more(decoding: int) -> list[tuple[list[int], int]]:
            new = joining(decoding) if joining is not None else []
            self.score_prompts(new)
            batches[-1].order.extend(new)
            return [(r.prompt, r.max_tokens) for r in new]

        self.score_prompts(rows)

        def steer(part: list[Row]) -> _Batch:
            batches.append(_Batch(self, part))
            return batches[-1]

        def make_inputs(part: list[Row]) -> dict:
            ids, mask = left_pad([r.prompt for r in part], self.pad)
            return {"input_ids": ids, "attention_mask": mask}

        self.generate_calls += 1
        generate_batched(
            self.model, rows, [len(r.prompt) for r in rows], make_inputs,
            max_new_tokens=max(r.max_tokens for r in rows), batch_size=len(rows), pad_token_id=self.pad,
            stops=self.stops, fast_greedy=self.fast_greedy, steer=steer, more=more if joining is not None else None,
            prefix_store=self.prefixes,
            do_sample=False, **self.generate_kwargs,
        )
        for batch in batches:  # decoding stopped at its own limits first (the model's max_length, say)
            for row in batch.order:
                if not row.finished:
                    batch.finish(row, "length")


    @torch.no_grad()
    def score_prompts(self, rows: list[Row]) -> None:
        """The log-probabilities of the prompt tokens of ``rows`` that echo them with ``logprobs``: one forward
        per prompt (the ``[prompt, vocabulary]`` logits of a whole batch would not fit), in eval mode."""
        device = next(self.model.parameters()).device
        for row in rows:
            if not (row.echo and row.logprobs is not None) or row.prompt_logprobs or len(row.prompt) < 2:
                continue
            ids = torch.tensor([row.prompt], device=device)
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, :-1]
            targets = ids[0, 1:]
            for start in range(0, len(targets), 512):  # float32 log-probabilities a chunk of positions at a time
                chunk = torch.log_softmax(logits[start : start + 512].float(), -1)
                row.prompt_logprobs += token_logprobs(chunk, targets[start : start + 512], row.logprobs)


class _Batch(Steering):
    """The rows of one batch of the decoding loop, in the order of its batch rows: picks their tokens and says
    what each new token does to them."""

    def __init__(self, engine: Engine, rows: list[Row]):
        self.engine = engine
        self.order = rows

    def pick(self, rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        tokens = logits.argmax(-1)
        for k, i in enumerate(rows):
            row = self.order[i]
            if row.finished:
                continue
            scores = row.adjust(logits[k]) if row.adjusted else logits[k]
            if row.sampled:
                tokens[k] = row.sample(scores)
            elif row.adjusted:
                tokens[k] = scores.argmax()
            if row.logprobs is not None:
                row._picked = token_logprobs(torch.log_softmax(logits[k : k + 1], -1), tokens[k : k + 1],
                                             row.logprobs)[0]
        return tokens

    def advance(self, rows: list[int], tokens: list[int]) -> list[bool]:
        now = time.monotonic()
        for i, token in zip(rows, tokens):
            row = self.order[i]
            if row.finished:
                continue
            if row.cancelled:
                self.finish(row, "cancelled")
            elif token in self.engine.stops:
                self.finish(row, "stop")
            else:
                row.tokens.append(token)
                if row._picked is not None:
                    row.token_logprobs.append(row._picked)
                self.scan(row)
                if not row.finished and len(row.tokens) >= row.max_tokens:
                    self.finish(row, "length")
                elif not row.finished and now > row.deadline:
                    self.finish(row, "timeout")
        return [self.order[i].finished for i in rows]

    def scan(self, row: Row) -> None:
        """Look for a stop string in the row's text, and stream what can no longer change."""
        if not (row.stops or row.stream):
            return
        text = self.engine.decode(row.tokens)
        cuts = [i for i in (text.find(s) for s in row.stops) if i >= 0]
        if cuts:
            self.finish(row, "stop", text[: min(cuts)])
            return
        if row.stream:
            safe = stable_prefix(text, row.stops)
            if len(safe) > len(row.sent) and safe.startswith(row.sent):
                row.emit(Event("delta", row.index, text=safe[len(row.sent):], logprobs=row.unsent_logprobs()))
                row.sent = safe

    def finish(self, row: Row, reason: str, text: str | None = None) -> None:
        final = self.engine.decode(row.tokens) if text is None else text
        if row.stream and len(final) > len(row.sent) and final.startswith(row.sent):
            row.emit(Event("delta", row.index, text=final[len(row.sent):], logprobs=row.unsent_logprobs()))
            row.sent = final
        row.text, row.finish_reason = final, reason
        rest = row.unsent_logprobs() if row.stream else None  # tokens whose text a stop string cut, say
        row.emit(Event("end", row.index, text=final, finish_reason=reason, tokens=len(row.tokens), logprobs=rest))

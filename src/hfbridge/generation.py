"""Batched, left-padded generation with input-length budgeting.

Prompts are tokenized exactly as training renders them (:mod:`hfbridge.data.formats`), sorted by length so
batches carry little padding, left-padded, generated in batches, and returned in the original order. A prompt
longer than ``context - max_new_tokens`` keeps its last tokens (with a warning), so generation never runs past
the model's context.

Greedy decoding of a Hugging Face causal LM with full attention runs hfbridge's own loop
(:func:`greedy_decode`), which gives the tokens ``model.generate(do_sample=False)`` gives, faster: a
preallocated KV cache laid out as ``generate`` lays it out (no concatenation per step), the prompt prefix every
row shares (a system prompt, a chat template's header) computed once and copied into each row, rows that
stopped dropped from the batch, and logits only for the last position. Anything else (sampling, beams, logits
processors, image inputs, sliding windows, models with their own ``generate``) goes through ``model.generate``.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

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


# ------------------------------------------------------------------------------------------ the greedy fast path
# Keyword arguments of ``generate`` the fast path honours (with these values); any other keeps ``model.generate``.
_GREEDY_KWARGS = {"do_sample": (False,), "num_beams": (1, None), "use_cache": (True, None),
                  "temperature": None, "top_p": None, "top_k": None, "pad_token_id": None}
# Generation-config fields that make ``generate`` change greedy logits or stop differently, with their neutral
# values: a model whose generation config sets any of them keeps ``model.generate``.
_NEUTRAL_GENERATION = {"repetition_penalty": (1.0, None), "no_repeat_ngram_size": (0, None), "bad_words_ids": (None,),
                       "min_length": (0, None), "min_new_tokens": (None, 0), "forced_bos_token_id": (None,),
                       "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
                       "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
                       "guidance_scale": (None, 1.0), "watermarking_config": (None,), "num_beams": (1, None),
                       "stop_strings": (None,), "max_time": (None,), "penalty_alpha": (None,),
                       "prompt_lookup_num_tokens": (None,), "assistant_early_exit": (None,),
                       "encoder_repetition_penalty": (1.0, None), "epsilon_cutoff": (0.0, None)}
_MASKS = ("sdpa", "eager")  # attention implementations that take an explicit 4-D mask as transformers builds it


def greedy_fast_path(model, generate_kwargs: dict, max_length: int):
    """The module :func:`greedy_decode` runs for ``model`` (the model, or a LoRA-style peft model's base model,
    whose layers carry the adapters), or ``None`` when decoding must go through ``model.generate``: sampling,
    beams, logits processors or stopping criteria asked for, a generation config that changes greedy decoding,
    an encoder-decoder, a model with its own ``generate``, an attention other than sdpa/eager, or a sliding window
    shorter than ``max_length`` (prompt and new tokens)."""
    from transformers import GenerationMixin, PreTrainedModel

    for key, value in generate_kwargs.items():
        allowed = _GREEDY_KWARGS.get(key, ())
        if key not in _GREEDY_KWARGS or (allowed is not None and value not in allowed):
            return None
    module = model
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        if any(c.is_prompt_learning for c in model.peft_config.values()):
            return None
        module = model.get_base_model()
    if not isinstance(module, PreTrainedModel) or type(module).generate is not GenerationMixin.generate:
        return None
    config = module.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "_attn_implementation", None) not in _MASKS:
        return None
    if not cache_argument(inspect.signature(module.forward).parameters):
        return None
    layer_types = getattr(text, "layer_types", None) or ["full_attention"]
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        return None
    window = sliding_window(module)
    if window is not None and max_length > window:
        return None
    generation = getattr(module, "generation_config", None)
    for key, neutral in _NEUTRAL_GENERATION.items():
        if generation is not None and getattr(generation, key, None) not in neutral:
            return None
    return module


def sliding_window(module) -> int | None:
    """The sliding window of ``module``'s attention (0 when windowed with no size given), or ``None``."""
    config = module.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or ["full_attention"]
    window = getattr(text, "sliding_window", None)
    if "sliding_attention" in layer_types or (window is not None and getattr(text, "use_sliding_window", True)):
        return window if window is not None else 0
    return None


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values in preallocated ``[rows, heads, slots, head_dim]`` tensors, written at the
    slots its :class:`_SlotCache` says; returns the slots written so far (no concatenation)."""

    is_sliding = False

    def __init__(self, owner: _SlotCache, index: int):
        super().__init__()
        self.owner, self.index = owner, index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, heads = key_states.shape[:2]
        slots, kwargs = self.owner.slots, {"dtype": key_states.dtype, "device": key_states.device}
        self.keys = torch.zeros((rows, heads, slots, key_states.shape[-1]), **kwargs)
        self.values = torch.zeros((rows, heads, slots, value_states.shape[-1]), **kwargs)
        self.owner.seed_layer(self)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.owner.start, self.owner.start + key_states.shape[2]
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.start + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.start

    def get_max_length(self) -> int:
        return self.owner.slots


class _SlotCache(Cache):
    """A KV cache for :func:`greedy_decode`: ``slots`` slots per row, the next forward writing from slot
    ``start``; ``seed`` gives, per layer, keys and values ``[1, heads, n, head_dim]`` copied into each row ``r``
    at slots ``offsets[r] .. offsets[r] + n`` (the shared prompt prefix) when the layer is first written."""

    def __init__(self, layers: int, slots: int, seed: list | None = None, offsets: list[int] | None = None):
        self.slots, self.start = slots, 0
        self.seed, self.offsets = seed, offsets
        super().__init__(layers=[_SlotLayer(self, i) for i in range(layers)])

    def seed_layer(self, layer: _SlotLayer) -> None:
        if not self.seed:
            return
        keys, values = self.seed[layer.index]
        for row, offset in enumerate(self.offsets or []):
            n = min(keys.shape[2], self.slots - offset)
            if n > 0:
                layer.keys[row, :, offset : offset + n] = keys[0, :, :n]
                layer.values[row, :, offset : offset + n] = values[0, :, :n]

    def keep_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = layer.keys.index_select(0, rows)
                layer.values = layer.values.index_select(0, rows)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _Step:
    """One forward of :func:`greedy_decode`: the module, its cache keyword, and how masks are given."""

    def __init__(self, module):
        self.module = module
        parameters = inspect.signature(module.forward).parameters
        self.cache_name = cache_argument(parameters)
        self.keep_last = "logits_to_keep" in parameters
        config = module.config.get_text_config() if hasattr(module.config, "get_text_config") else module.config
        self.layers = config.num_hidden_layers
        self.additive = config._attn_implementation == "eager"
        self.dtype = next(module.parameters()).dtype

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, cache: _SlotCache,
                 start: int) -> torch.Tensor:
        """Logits of the last position of each row; ``allowed`` is the ``[rows, queries, keys]`` boolean mask."""
        cache.start = start
        mask = allowed[:, None]
        if self.additive:  # eager attention adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(self.dtype).min)
        kwargs = {"logits_to_keep": 1} if self.keep_last else {}
        out = self.module(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          **{self.cache_name: cache}, **kwargs)
        return out.logits[:, -1]


class PrefixStore:
    """Keys and values of the last ``size`` shared prompt prefixes :func:`greedy_decode` computed (the least
    recently used is dropped first; a prefix that extends a stored one replaces it), reused by later batches whose
    rows start with (part of) one of them."""

    def __init__(self, size: int = 1):
        if size < 1:
            raise ValueError(f"a prefix store holds at least 1 prefix, got {size}")
        self.size = size
        self.entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    @property
    def ids(self) -> list[int]:
        """The most recently used prefix."""
        return list(next(reversed(self.entries))) if self.entries else []

    def longest(self, prefix: Sequence[int]) -> int:
        """How many first tokens of ``prefix`` a stored prefix holds."""
        return max((_common_prefix(ids, prefix) for ids in self.entries), default=0)

    def covering(self, step: _Step, prefix: list[int], device) -> list:
        """Per layer, keys and values of ``prefix`` (computed now for what the best stored prefix lacks)."""
        best = max(self.entries, key=lambda ids: _common_prefix(ids, prefix), default=())
        have = _common_prefix(best, prefix)
        kv = self.entries.get(best, [])
        if have < len(prefix):
            cache = _SlotCache(step.layers, len(prefix), [(k[:, :, :have], v[:, :, :have]) for k, v in kv]
                               if have else None, [0])
            new = torch.tensor([prefix[have:]], dtype=torch.long, device=device)
            positions = torch.arange(have, len(prefix), device=device)[None]
            allowed = torch.ones(len(prefix), len(prefix), dtype=torch.bool, device=device).tril()[None, have:]
            step(new, positions, allowed, cache, have)
            if have == len(best):  # the new prefix extends the stored one: it replaces it
                self.entries.pop(best, None)
            kv = [(layer.keys, layer.values) for layer in cache.layers]
            best = tuple(prefix)
            self.entries[best] = kv
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        self.entries.move_to_end(best)
        return [(k[:, :, : len(prefix)], v[:, :, : len(prefix)]) for k, v in kv]


class Steering:
    """Per-row control of one batch of the decoding loop, for callers that need more than greedy decoding up to a
    stop token (the server: sampled rows, stop strings, streaming, cancellation, deadlines). ``rows`` are indices
    into the batch, in the order ``make_inputs`` was given its items. The same object steers the fast path
    (:func:`greedy_decode`) and ``model.generate`` (as a logits processor and a stopping criterion), so a caller
    gets the same tokens from either."""

    def pick(self, rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The next token of each of ``rows`` from their last-position logits (``[len(rows), vocab]``, float32)."""
        return logits.argmax(-1)

    def advance(self, rows: list[int], tokens: list[int]) -> list[bool]:
        """Give each of ``rows`` its new token; ``True`` where that row is done and takes no more tokens."""
        raise NotImplementedError


class _Rows:
    """The rows the fast greedy loop is decoding: their KV cache, which cache slots each row attends to
    (``valid``, ``[rows, slots]``), each row's next position and next token, and their ids (indices into the
    caller's prompts, joined rows after them). The next forward writes slot ``at``."""

    def __init__(self, cache: _SlotCache, valid: torch.Tensor, position: torch.Tensor, token: torch.Tensor,
                 ids: list[int], at: int):
        self.cache, self.valid, self.position, self.token, self.ids, self.at = cache, valid, position, token, ids, at

    def keep(self, keep: list[int]) -> _Rows | None:
        """These rows only (indices into :attr:`ids`); ``None`` when none is left."""
        if not keep:
            return None
        if len(keep) < len(self.ids):
            index = torch.tensor(keep, device=self.valid.device)
            self.cache.keep_rows(index)
            self.valid, self.position, self.token = self.valid[index], self.position[index], self.token[index]
            self.ids = [self.ids[k] for k in keep]
        return self

    def used(self) -> tuple[int, int]:
        """The slots in use: from the first any row attends to up to ``at``."""
        seen = self.valid[:, : self.at].any(0).nonzero()
        return (int(seen[0]) if len(seen) else self.at), self.at


def _merge(a: _Rows, b: _Rows, need: int) -> _Rows:
    """``a``'s rows then ``b``'s in one cache with ``need`` slots after the next write. Each keeps its keys in the
    same order, moved so that both write their next token at the same slot; slots no row attends to are dropped
    (positions are each row's own, so moving keys changes nothing they compute)."""
    (a0, a1), (b0, b1) = a.used(), b.used()
    at = max(a1 - a0, b1 - b0)
    slots = at + need
    cache = _SlotCache(len(a.cache.layers), slots)
    for layer, la, lb in zip(cache.layers, a.cache.layers, b.cache.layers):
        for name in ("keys", "values"):
            x, y = getattr(la, name), getattr(lb, name)
            merged = x.new_zeros((x.shape[0] + y.shape[0], x.shape[1], slots, x.shape[3]))
            merged[: x.shape[0], :, at - (a1 - a0) : at] = x[:, :, a0:a1]
            merged[x.shape[0] :, :, at - (b1 - b0) : at] = y[:, :, b0:b1]
            setattr(layer, name, merged)
        layer.is_initialized = True
    valid = a.valid.new_zeros((len(a.ids) + len(b.ids), slots))
    valid[: len(a.ids), at - (a1 - a0) : at] = a.valid[:, a0:a1]
    valid[len(a.ids) :, at - (b1 - b0) : at] = b.valid[:, b0:b1]
    return _Rows(cache, valid, torch.cat([a.position, b.position]), torch.cat([a.token, b.token]), a.ids + b.ids, at)


def _prefill(step: _Step, store: PrefixStore, prompts: Sequence[Sequence[int]], ids: list[int], slots_after: int,
             pad_token_id: int, device) -> tuple[_Rows, torch.Tensor]:
    """The prompts' forward: rows left-padded to the longest prompt ``T`` as ``generate`` lays them out, with
    ``slots_after`` more slots; the prefix all rows share is taken from (or computed once into) ``store``.
    Returns the rows (next write at slot ``T``) and their last-position logits."""
    rows = len(prompts)
    lengths = [len(p) for p in prompts]
    total = max(lengths)
    shared = min(lengths) - 1
    for p in prompts[1:]:
        shared = _common_prefix(prompts[0][:shared], p)
    if rows == 1:  # nothing shared within the batch: only reuse what the store has
        shared = store.longest(prompts[0][:shared])
    seed = store.covering(step, list(prompts[0][:shared]), device) if shared else None
    tail = total - shared if shared else total  # the slots the batch forward computes: [total - tail, total)
    offsets = [total - n for n in lengths]
    cache = _SlotCache(step.layers, total + slots_after, seed, offsets)

    slot = torch.arange(total + slots_after, device=device)
    first = torch.tensor(offsets, device=device)[:, None]
    valid = slot[None] >= first  # [rows, slots]: the prompt slots and, as they are written, the new ones
    valid[:, total:] = False
    tokens = torch.full((rows, tail), pad_token_id, dtype=torch.long)
    for r, p in enumerate(prompts):
        n = min(len(p), tail)
        tokens[r, tail - n :] = torch.tensor(list(p[len(p) - n :]), dtype=torch.long)
    queries = slot[total - tail : total]
    positions = (queries[None] - first).clamp(min=0)
    allowed = valid[:, None, :total] & (slot[None, None, :total] <= queries[None, :, None])
    allowed |= slot[None, None, :total] == queries[None, :, None]  # a padding query sees itself (never NaN)
    logits = step(tokens.to(device), positions, allowed, cache, total - tail)
    position = torch.tensor(lengths, device=device)
    return _Rows(cache, valid, position, position.new_zeros(rows), list(ids), total), logits


Joining = Callable[[int], Sequence[tuple[Sequence[int], int]]]


@torch.no_grad()
def greedy_decode(module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_token_id: int,
                  stops: set[int], prefix_store: PrefixStore | None = None, steering: Steering | None = None,
                  more: Joining | None = None) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token id lists, one batch), each up to its first token in ``stops``
    (not included) or ``max_new_tokens`` tokens: the tokens ``model.generate(do_sample=False)`` gives on the
    left-padded batch, cut at the first stop token. ``module`` is what :func:`greedy_fast_path` returned.

    The cache is laid out as ``generate`` lays it out (row ``r`` left-padded to the longest prompt ``T``, new
    tokens from slot ``T``) so attention sums the same keys in the same order. The longest prefix the prompts
    share (all but each row's last token at most) is computed once for the batch (or taken from
    ``prefix_store``) and copied into each row; the batch forward then covers only the last ``S`` slots, ``S``
    the longest remainder. Rows that stop leave the batch.

    With ``steering``, it chooses each token (:meth:`Steering.pick`) and ends rows (:meth:`Steering.advance`)
    instead of argmax and ``stops``; each row's list then holds every token it was given.

    With ``more`` (continuous batching), before each step ``more(rows decoding now)`` gives prompts that join
    the batch, each with its own ``max_new_tokens``: their prompts' forward runs on their own, then they decode
    with the others (their ids follow the ones before; the returned list grows with them)."""
    step = _Step(module)
    device = next(module.parameters()).device
    store = prefix_store if prefix_store is not None else PrefixStore()
    out: list[list[int]] = []
    limits: list[int] = []

    def settle(rows: _Rows, logits: torch.Tensor) -> _Rows | None:
        """Choose the rows' next tokens from ``logits``; keep the rows that go on."""
        rows.token = logits.argmax(-1) if steering is None else steering.pick(rows.ids, logits.float())
        new = rows.token.tolist()
        ended = steering.advance(rows.ids, new) if steering is not None else [t in stops for t in new]
        keep = []
        for k, (r, t, end) in enumerate(zip(rows.ids, new, ended)):
            if steering is not None or not end:
                out[r].append(t)
            if not end and len(out[r]) < limits[r]:
                keep.append(k)
        return rows.keep(keep)

    def start(new: Sequence[Sequence[int]], budgets: Sequence[int]) -> _Rows | None:
        if any(len(p) == 0 for p in new):
            raise ValueError("greedy_decode: every prompt needs at least one token")
        ids = list(range(len(out), len(out) + len(new)))
        out.extend([] for _ in new)
        limits.extend(budgets)
        return settle(*_prefill(step, store, new, ids, max(budgets) - 1, pad_token_id, device))

    rows = start(prompts, [max_new_tokens] * len(prompts))
    while True:
        if more is not None:
            joining = more(len(rows.ids) if rows is not None else 0)
            new = start([p for p, _ in joining], [m for _, m in joining]) if joining else None
            if new is not None and rows is not None:
                rows = _merge(rows, new, max(limits[r] - len(out[r]) for r in rows.ids + new.ids))
            elif new is not None:
                rows = new
        if rows is None:
            return out
        at = rows.at
        rows.valid[:, at] = True
        logits = step(rows.token[:, None], rows.position[:, None], rows.valid[:, None, : at + 1], rows.cache, at)
        rows.position += 1
        rows.at += 1
        rows = settle(rows, logits)


def _steered_generate(steering: Steering) -> dict:
    """``model.generate`` keywords that let ``steering`` pick every row's token and end rows."""
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    done: set[int] = set()

    def open_rows(n: int) -> list[int]:
        return [r for r in range(n) if r not in done]

    class Pick(LogitsProcessor):
        def __call__(self, input_ids, scores):
            rows = open_rows(scores.shape[0])
            if rows:  # generate's greedy selection then takes the picked token (finished rows it pads itself)
                index = torch.tensor(rows, device=scores.device)
                tokens = steering.pick(rows, scores[index].float())
                scores[index] = -torch.inf
                scores[index, tokens] = 0.0
            return scores

    class Advance(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            rows = open_rows(input_ids.shape[0])
            ended = steering.advance(rows, input_ids[rows, -1].tolist()) if rows else []
            done.update(r for r, end in zip(rows, ended) if end)
            return torch.tensor([r in done for r in range(input_ids.shape[0])], device=input_ids.device)

    return {"logits_processor": LogitsProcessorList([Pick()]), "stopping_criteria": StoppingCriteriaList([Advance()])}


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
    fast_greedy: bool = True,
    steer: Callable[[list], Steering] | None = None,
    more: Joining | None = None,
    prefix_store: PrefixStore | None = None,
    **generate_kwargs,
) -> list[list[int]]:
    """The one decoding loop of hfbridge: ``items`` sorted by ``lengths`` (batches carry little padding), in
    batches of ``batch_size``, ``make_inputs(batch)`` gives the left-padded model inputs, greedy unless told
    otherwise; returns each item's new tokens up to the first of ``stops``, in the original order.

    Greedy decoding of a model :func:`greedy_fast_path` accepts runs :func:`greedy_decode` (the same tokens as
    ``model.generate``, faster; ``fast_greedy=False`` keeps ``model.generate``); the shared prompt prefix is
    computed once for all batches.

    ``steer(batch)`` gives a :class:`Steering` for each batch: it picks every token and ends rows, on the fast path
    and through ``model.generate`` alike (``stops`` then only decides nothing; what the rows hold is the
    steering's).

    ``more`` lets rows join the last batch as it decodes (continuous batching, see :func:`greedy_decode`); only
    the fast path takes it: through ``model.generate`` it is never called. ``prefix_store`` keeps the shared
    prompt prefix's keys and values across calls (a server's system prompt); it must not outlive the weights."""
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
    longest = max(lengths, default=0) + max_new_tokens
    fast = greedy_fast_path(model, generate_kwargs, longest) if fast_greedy else None
    if fast is not None and not _generation_eos(fast) <= set(stops):
        fast = None  # generate would end rows at an EOS that is not a stop (and pad them): keep its tokens exactly
    store = prefix_store if prefix_store is not None else PrefixStore()
    was_training = model.training
    model.eval()
    # rows join the last batch only under full attention: a joining row's length is not known here
    joins = more if fast is not None and sliding_window(fast) is None else None
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    results: list[list[int] | None] = [None] * len(items)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in make_inputs([items[i] for i in idx]).items()}
            prompts = _left_padded_rows(inputs) if fast is not None else None
            steering = steer([items[i] for i in idx]) if steer is not None else None
            if prompts is not None:
                new = greedy_decode(fast, prompts, max_new_tokens=max_new_tokens, stops=stops,
                                    pad_token_id=generate_kwargs["pad_token_id"], prefix_store=store,
                                    steering=steering, more=joins if start + batch_size >= len(order) else None)
            else:
                steered = _steered_generate(steering) if steering is not None else {}
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs, **steered)
                new = [_until_stop(tokens, stops) for tokens in out[:, inputs["input_ids"].shape[1] :].tolist()]
            for i, tokens in zip(idx, new):
                results[i] = tokens
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _generation_eos(module) -> set[int]:
    eos = getattr(getattr(module, "generation_config", None), "eos_token_id", None)
    return {eos} if isinstance(eos, int) else set(eos or [])


def _left_padded_rows(inputs: dict) -> list[list[int]] | None:
    """Each row's prompt ids when ``inputs`` are only left-padded ``input_ids`` and ``attention_mask`` with no
    empty row (what :func:`greedy_decode` takes), else ``None``."""
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if set(inputs) - {"input_ids", "attention_mask"} or ids is None or ids.dim() != 2 or ids.shape[1] == 0:
        return None
    if mask is None:
        return ids.tolist()
    mask = mask.bool()
    if mask.shape != ids.shape or not bool(mask[:, -1].all()) or not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        return None
    return [row[m].tolist() for row, m in zip(ids, mask)]


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

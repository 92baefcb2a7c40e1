"""Jitted decoding with a KV cache: greedy, or sampling with temperature, top-k and top-p from a seeded key.

One compiled program per model, ``max_new_tokens`` and sampling on/off; ``temperature``, ``top_k``, ``top_p`` and
the key are traced values, so changing them does not recompile. The logits filters follow transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and
``TopPLogitsWarper`` (in that order, as ``generate`` applies them).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp


def _eos_ids(eos: int | Sequence[int] | None) -> jax.Array:
    if eos is None:
        return jnp.asarray([-1], jnp.int32)
    return jnp.asarray([eos] if isinstance(eos, int) else list(eos), jnp.int32)


def top_k_filter(logits: jax.Array, top_k: int | jax.Array) -> jax.Array:
    """Logits below the ``top_k``-th largest set to -inf (ties with it are kept), as ``TopKLogitsWarper``;
    ``top_k`` may be traced (then 0 means no filtering)."""
    if isinstance(top_k, int):
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        return jnp.where(logits < kth, -jnp.inf, logits)
    k = jnp.clip(top_k, 1, logits.shape[-1])
    kth = jnp.take(jnp.sort(logits, axis=-1), logits.shape[-1] - k, axis=-1)[..., None]
    return jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)


def top_p_filter(logits: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """Nucleus filtering as ``TopPLogitsWarper``: sort ascending, drop the tokens whose cumulative probability is
    at most ``1 - top_p`` (the most likely token always stays)."""
    order = jnp.argsort(logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1 - top_p).at[..., -1].set(False)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(remove, -jnp.inf, logits)


def filter_logits(
    logits: jax.Array, temperature: float | jax.Array = 1.0, top_k: int | None = None, top_p: float | jax.Array | None = None
) -> jax.Array:
    """Temperature scaling, then top-k, then top-p (float32), as transformers' sampling warpers in ``generate``."""
    logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if top_k is not None and (not isinstance(top_k, int) or top_k > 0):
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def sample_logits(
    logits: jax.Array, key: jax.Array, temperature: float | jax.Array = 1.0, top_k: int | None = None,
    top_p: float | jax.Array | None = None,
) -> jax.Array:
    """One token per row drawn from the filtered distribution (``jax.random.categorical``)."""
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature > 0:
        raise ValueError(f"generate(temperature={temperature!r}): must be > 0 when sampling (do_sample=False is greedy)")
    if top_k is not None and (int(top_k) != top_k or top_k < 0):
        raise ValueError(f"generate(top_k={top_k!r}): must be a non-negative integer (0 or None: no top-k)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate(top_p={top_p!r}): must be in (0, 1] (1 or None: no top-p)")


def generate(
    module: Any,
    params: dict,
    input_ids,
    attention_mask=None,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | jax.Array = 0,
) -> jax.Array:
    """Prompt plus up to ``max_new_tokens`` tokens, ``(batch, prompt_len + max_new_tokens)``.

    Prompts of different lengths must be left-padded with ``attention_mask`` 0 on the padding. ``do_sample=False``
    is greedy (argmax); ``do_sample=True`` samples from the logits filtered by :func:`filter_logits`, with the
    random stream from ``seed`` (an int, or a ``jax.random`` key): the same seed gives the same tokens. After a
    row emits an end token (``eos_token_id``, default the config's) it is filled with ``pad_token_id``; the loop
    stops early when every row is done.
    """
    if int(max_new_tokens) < 1:
        raise ValueError(f"generate(max_new_tokens={max_new_tokens!r}): must be at least 1")
    if do_sample:
        _check_sampling(temperature, top_k, top_p)
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"generate: input_ids must be (batch, seq), got shape {tuple(ids.shape)}")
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    config = module.config
    eos = _eos_ids(config.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else max(int(eos[0]), 0)
    key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    fn = _compiled(module, int(max_new_tokens), bool(do_sample))
    k = jnp.int32(top_k or 0)
    p = jnp.float32(1.0 if top_p is None else top_p)
    return fn(params, ids, mask, eos, jnp.int32(pad_token_id), key, jnp.float32(temperature), k, p)


def greedy_generate(module: Any, params: dict, input_ids, attention_mask=None, max_new_tokens: int = 32,
                    eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> jax.Array:
    """Greedy decoding: :func:`generate` with ``do_sample=False``."""
    return generate(module, params, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)


@lru_cache(maxsize=32)
def _compiled(module: Any, max_new_tokens: int, do_sample: bool):
    return jax.jit(partial(_generate, module, max_new_tokens, do_sample))


def _generate(module, max_new_tokens, do_sample, params, ids, mask, eos, pad, key, temperature, top_k, top_p):
    b, t = ids.shape

    def pick(logits, key):
        if not do_sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sample_logits(logits, key, temperature, top_k, top_p)

    positions = jnp.clip(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    cache = module.init_cache(b, t + max_new_tokens)
    valid = jnp.concatenate([mask.astype(bool), jnp.zeros((b, max_new_tokens), bool)], axis=1)
    logits, cache = module.forward(params, ids, positions, valid, cache, 0)
    key, sub = jax.random.split(key)
    state = (
        jnp.int32(0),
        pick(logits[:, -1], sub),
        positions[:, -1] + 1,
        cache,
        valid,
        jnp.full((b, max_new_tokens), pad, jnp.int32),
        jnp.zeros((b,), bool),
        key,
    )

    def cond(state):
        i, *_, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, token, pos, cache, valid, out, done, key = state
        token = jnp.where(done, pad, token)
        out = out.at[:, i].set(token)
        done = done | jnp.isin(token, eos)
        valid = valid.at[:, t + i].set(True)
        logits, cache = module.forward(params, token[:, None], pos[:, None], valid, cache, t + i)
        key, sub = jax.random.split(key)
        return i + 1, pick(logits[:, 0], sub), pos + 1, cache, valid, out, done, key

    *_, out, _, _ = jax.lax.while_loop(cond, body, state)
    return jnp.concatenate([ids, out], axis=1)

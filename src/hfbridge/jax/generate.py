"""Jitted greedy decoding with a KV cache (one compiled program per model and ``max_new_tokens``)."""

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


def greedy_generate(
    module: Any,
    params: dict,
    input_ids,
    attention_mask=None,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """Prompt plus up to ``max_new_tokens`` greedy tokens, ``(batch, prompt_len + max_new_tokens)``.

    Prompts of different lengths must be left-padded with ``attention_mask`` 0 on the padding. After a row
    emits an end token (``eos_token_id``, default the config's) it is filled with ``pad_token_id``; the loop
    stops early when every row is done.
    """
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    config = module.config
    eos = _eos_ids(config.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else max(int(eos[0]), 0)
    return _compiled(module, int(max_new_tokens))(params, ids, mask, eos, jnp.int32(pad_token_id))


@lru_cache(maxsize=32)
def _compiled(module: Any, max_new_tokens: int):
    return jax.jit(partial(_generate, module, max_new_tokens))


def _generate(module, max_new_tokens, params, ids, mask, eos, pad):
    b, t = ids.shape
    positions = jnp.clip(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    cache = module.init_cache(b, t + max_new_tokens)
    valid = jnp.concatenate([mask.astype(bool), jnp.zeros((b, max_new_tokens), bool)], axis=1)
    logits, cache = module.forward(params, ids, positions, valid, cache, 0)
    state = (
        jnp.int32(0),
        jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32),
        positions[:, -1] + 1,
        cache,
        valid,
        jnp.full((b, max_new_tokens), pad, jnp.int32),
        jnp.zeros((b,), bool),
    )

    def cond(state):
        i, *_, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, token, pos, cache, valid, out, done = state
        token = jnp.where(done, pad, token)
        out = out.at[:, i].set(token)
        done = done | jnp.isin(token, eos)
        valid = valid.at[:, t + i].set(True)
        logits, cache = module.forward(params, token[:, None], pos[:, None], valid, cache, t + i)
        return i + 1, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), pos + 1, cache, valid, out, done

    *_, out, _ = jax.lax.while_loop(cond, body, state)
    return jnp.concatenate([ids, out], axis=1)

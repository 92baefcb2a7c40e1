"""The Llama family in plain JAX: Llama, Mistral, Qwen2, Qwen3 (biases, q/k norms, sliding windows, tied embeddings).

Parameters are a nested dict mirroring the Hugging Face names (``model/layers/0/self_attn/q_proj/kernel``), with
kernels stored ``(in, out)``. The module is a frozen dataclass holding only settings; ``params`` travel separately.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hfbridge.jax.config import JaxLMConfig
from hfbridge.jax.mesh import PartitionAxis
from hfbridge.jax.quant import QuantizedArray, as_dense
from hfbridge.jax.rules import LLAMA_PARTITION_RULES, constrain

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

KVCache = list[dict[str, jax.Array]]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, returned in ``x``'s dtype, as transformers does."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@dataclass(frozen=True, eq=False)
class LlamaForCausalLM:
    """A Llama-family causal LM. ``module(params, input_ids)`` returns logits ``(batch, seq, vocab)`` (jitted).

    ``dtype`` is the computation dtype, ``param_dtype`` the storage dtype, ``precision`` the matmul precision.
    With a ``mesh`` and ``shard_attention_computation``, attention activations carry sharding constraints by
    ``partition_axis``.
    """

    config: JaxLMConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: jax.lax.Precision | None = None
    mesh: Mesh | None = None
    partition_axis: PartitionAxis = field(default_factory=PartitionAxis)
    shard_attention_computation: bool = True

    def __post_init__(self):
        if self.config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"activation {self.config.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        object.__setattr__(self, "_jit_apply", jax.jit(self.apply))

    # ----------------------------------------------------------------- parameters
    def default_partition_rules(self) -> tuple:
        return LLAMA_PARTITION_RULES

    def param_shapes(self) -> dict:
        """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (in ``param_dtype``)."""
        c = self.config
        h, d, nq, nkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads

        def s(*shape):
            return jax.ShapeDtypeStruct(shape, self.param_dtype)

        def linear(n_in, n_out, bias):
            return {"kernel": s(n_in, n_out), **({"bias": s(n_out)} if bias else {})}

        layers = {}
        for i in range(c.num_hidden_layers):
            attn = {
                "q_proj": linear(h, nq * d, c.qkv_bias),
                "k_proj": linear(h, nkv * d, c.qkv_bias),
                "v_proj": linear(h, nkv * d, c.qkv_bias),
                "o_proj": linear(nq * d, h, c.o_bias),
            }
            if c.qk_norm:
                attn["q_norm"] = {"scale": s(d)}
                attn["k_norm"] = {"scale": s(d)}
            layers[str(i)] = {
                "self_attn": attn,
                "mlp": {
                    "gate_proj": linear(h, c.intermediate_size, c.mlp_bias),
                    "up_proj": linear(h, c.intermediate_size, c.mlp_bias),
                    "down_proj": linear(c.intermediate_size, h, c.mlp_bias),
                },
                "input_layernorm": {"scale": s(h)},
                "post_attention_layernorm": {"scale": s(h)},
            }
        tree = {"model": {"embed_tokens": {"embedding": s(c.vocab_size, h)}, "layers": layers, "norm": {"scale": s(h)}}}
        if not c.tie_word_embeddings:
            tree["lm_head"] = {"kernel": s(h, c.vocab_size)}
        return tree

    def init_params(self, rng: jax.Array, input_shape: tuple[int, int] | None = None) -> dict:
        """Random parameters (normal, std 0.02; norms at 1; biases at 0); ``input_shape`` is traced as a check."""
        from hfbridge.jax import tree as tree_lib

        flat = tree_lib.flatten(self.param_shapes())
        keys = jax.random.split(rng, len(flat))
        out = {}
        for key, (path, spec) in zip(keys, flat.items()):
            if path.endswith("scale"):
                out[path] = jnp.ones(spec.shape, spec.dtype)
            elif path.endswith("bias"):
                out[path] = jnp.zeros(spec.shape, spec.dtype)
            else:
                out[path] = (0.02 * jax.random.normal(key, spec.shape, jnp.float32)).astype(spec.dtype)
        params = tree_lib.unflatten(out)
        if input_shape is not None:
            self.trace(params, input_shape)
        return params

    def trace(self, params: dict, input_shape: tuple[int, int]) -> jax.ShapeDtypeStruct:
        """Trace one forward at ``input_shape`` = ``(batch, seq)`` without running it; returns the logits' shape."""
        if len(tuple(input_shape)) != 2 or any(int(n) < 1 for n in input_shape):
            raise ValueError(f"input_shape must be (batch, seq) with positive sizes, got {input_shape!r}")
        ids = jax.ShapeDtypeStruct(tuple(int(n) for n in input_shape), jnp.int32)
        return jax.eval_shape(self.apply, params, ids)

    # ----------------------------------------------------------------- forward
    def __call__(self, params: dict, input_ids, attention_mask=None, position_ids=None) -> jax.Array:
        return self._jit_apply(params, input_ids, attention_mask, position_ids)

    def apply(self, params: dict, input_ids, attention_mask=None, position_ids=None) -> jax.Array:
        """Logits for ``input_ids`` ``(batch, seq)``; ``attention_mask`` 1 for real tokens (traceable)."""
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        key_valid = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        logits, _ = self.forward(params, input_ids, position_ids, key_valid)
        return logits

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        shape = (batch, max_len, c.num_key_value_heads, c.head_dim)
        return [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)} for _ in range(c.num_hidden_layers)]

    def forward(
        self,
        params: dict,
        input_ids: jax.Array,
        position_ids: jax.Array,
        key_valid: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, KVCache | None]:
        """The full forward. With a ``cache``, keys and values are written at ``cache_index`` and ``key_valid``
        covers the whole cache ``(batch, cache_len)``; without, it covers ``input_ids``."""
        c = self.config
        model = params["model"]
        x = self._embed(model["embed_tokens"]["embedding"], input_ids)
        cos, sin = self._rope(position_ids)
        new_cache = [] if cache is not None else None
        for i, window in enumerate(c.layer_windows):
            layer = model["layers"][str(i)]
            h = rms_norm(x, layer["input_layernorm"]["scale"], c.rms_norm_eps)
            layer_cache = cache[i] if cache is not None else None
            h, layer_cache = self._attention(layer["self_attn"], h, cos, sin, key_valid, window, layer_cache, cache_index)
            if new_cache is not None:
                new_cache.append(layer_cache)
            x = x + h
            h = rms_norm(x, layer["post_attention_layernorm"]["scale"], c.rms_norm_eps)
            x = x + self._mlp(layer["mlp"], h)
        x = rms_norm(x, model["norm"]["scale"], c.rms_norm_eps)
        if c.tie_word_embeddings:
            emb = as_dense(model["embed_tokens"]["embedding"], self.dtype)
            logits = jnp.einsum("bth,vh->btv", x, emb, precision=self.precision)
        else:
            logits = self._dense(params["lm_head"], x)
        return logits, new_cache

    def _embed(self, table: Any, ids: jax.Array) -> jax.Array:
        if isinstance(table, QuantizedArray):
            return jnp.take(table.values, ids, axis=0).astype(self.dtype) * jnp.take(table.scale, ids, axis=0).astype(
                self.dtype
            )
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def _dense(self, p: dict, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, as_dense(p["kernel"], self.dtype), precision=self.precision)
        if "bias" in p:
            y = y + p["bias"].astype(self.dtype)
        return y

    def _rope(self, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        inv_freq = jnp.asarray(self.config.rope_inv_freq())
        freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb).astype(self.dtype), jnp.sin(emb).astype(self.dtype)

    def _constrain(self, x: jax.Array, *entries: Any) -> jax.Array:
        if not self.shard_attention_computation:
            return x
        return constrain(x, self.mesh, *entries)

    def _attention(self, p, x, cos, sin, key_valid, window, cache, cache_index):
        c, pa = self.config, self.partition_axis
        b, t, _ = x.shape
        nq, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = self._dense(p["q_proj"], x).reshape(b, t, nq, d)
        k = self._dense(p["k_proj"], x).reshape(b, t, nkv, d)
        v = self._dense(p["v_proj"], x).reshape(b, t, nkv, d)
        if c.qk_norm:
            q = rms_norm(q, p["q_norm"]["scale"], c.rms_norm_eps)
            k = rms_norm(k, p["k_norm"]["scale"], c.rms_norm_eps)
        q = q * cos[:, :, None] + rotate_half(q) * sin[:, :, None]
        k = k * cos[:, :, None] + rotate_half(k) * sin[:, :, None]
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = {"k": k, "v": v}
        s = k.shape[1]
        q_pos = cache_index + jnp.arange(t)
        k_pos = jnp.arange(s)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        allowed = allowed[None, None] & key_valid[:, None, None, :].astype(bool)
        if nq != nkv:
            k = jnp.repeat(k, nq // nkv, axis=2)
            v = jnp.repeat(v, nq // nkv, axis=2)
        q = self._constrain(q, pa.batch_axis, pa.sequence_axis, pa.head_axis, pa.attention_dim_axis)
        k = self._constrain(k, pa.batch_axis, pa.key_sequence_axis, pa.head_axis, pa.attention_dim_axis)
        v = self._constrain(v, pa.batch_axis, pa.key_sequence_axis, pa.head_axis, pa.attention_dim_axis)
        scores = jnp.einsum("bthd,bshd->bhts", q, k, precision=self.precision) * (d**-0.5)
        scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        scores = self._constrain(scores, pa.batch_axis, pa.head_axis, pa.sequence_axis, pa.key_sequence_axis)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhts,bshd->bthd", probs, v, precision=self.precision)
        out = self._constrain(out, pa.batch_axis, pa.sequence_axis, pa.head_axis, pa.attention_dim_axis)
        return self._dense(p["o_proj"], out.reshape(b, t, nq * d)), cache

    def _mlp(self, p: dict, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.config.hidden_act]
        return self._dense(p["down_proj"], act(self._dense(p["gate_proj"], x)) * self._dense(p["up_proj"], x))

    # ----------------------------------------------------------------- use
    def generate(self, params: dict, input_ids, attention_mask=None, max_new_tokens: int = 32, **kwargs) -> jax.Array:
        """Greedy decoding (jitted, with a KV cache); see :func:`hfbridge.jax.generate.greedy_generate`."""
        from hfbridge.jax.generate import greedy_generate

        return greedy_generate(self, params, input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs)

    def save_pretrained(self, path: str | Path, params: dict, overwrite: bool = False) -> Path:
        """Write hfbridge's JAX checkpoint (config plus safetensors of the parameter tree) into a folder that appears
        only when complete; ``from_torch=False`` loads it back. A non-empty ``path`` is refused unless
        ``overwrite``."""
        from hfbridge.jax.checkpoint import save_checkpoint

        return save_checkpoint(path, self, params, overwrite=overwrite)

    def replace(self, **changes: Any) -> LlamaForCausalLM:
        """A copy with some settings changed (e.g. ``mesh=...`` after sharding parameters yourself)."""
        return dataclasses.replace(self, **changes)

    def num_params(self, params: dict | None = None) -> int:
        from hfbridge.jax import tree as tree_lib

        tree = params if params is not None else self.param_shapes()
        return int(sum(np.prod(leaf.shape) for leaf in tree_lib.flatten(tree).values()))

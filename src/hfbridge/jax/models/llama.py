"""Rotary decoder LMs in plain JAX: Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3 (text), Phi-3, Mixtral, Qwen3-MoE.

One definition with the families' switches (biases, q/k norms, sliding windows, tied embeddings, Gemma's (1 + w)
norms, embedding scale, sandwich norms and soft-capping, Phi-3's partial rotary, mixture-of-experts MLPs).
Parameters are a nested dict mirroring the Hugging Face names (``model/layers/0/self_attn/q_proj/kernel``), with
kernels stored ``(in, out)``; stacked experts ``(n_experts, in, out)``. The module is a frozen dataclass holding
only settings; ``params`` travel separately.
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
from hfbridge.jax.rules import constrain, default_rules_for

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

# The mixture-of-experts block's Hugging Face names: (block, gate expert, up expert, down expert)
MOE_NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}

KVCache = list[dict[str, jax.Array]]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """RMSNorm computed in float32, returned in ``x``'s dtype, as transformers does. ``offset`` 1 is Gemma's norm:
    ``(1 + weight)`` multiplied in float32 before the cast."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return (y * (offset + scale.astype(jnp.float32))).astype(x.dtype)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@dataclass(frozen=True, eq=False)
class LlamaForCausalLM:
    """A rotary decoder LM (every family but GPT-2). ``module(params, input_ids)`` returns logits ``(batch, seq, vocab)`` (jitted).

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
    lora_scaling: float = 1.0  # alpha / rank of LoRA factors in the params (hfbridge.jax.lora)

    def __post_init__(self):
        if self.config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"activation {self.config.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        object.__setattr__(self, "_jit_apply", jax.jit(self.apply))

    # ----------------------------------------------------------------- parameters
    def default_partition_rules(self) -> tuple:
        return default_rules_for(self.config.model_type)

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
            layer = {"self_attn": attn, "input_layernorm": {"scale": s(h)}, "post_attention_layernorm": {"scale": s(h)}}
            if c.sandwich_norms:
                layer["pre_feedforward_layernorm"] = {"scale": s(h)}
                layer["post_feedforward_layernorm"] = {"scale": s(h)}
            if c.layer_is_moe(i):
                block, g, u, dn = MOE_NAMES[c.model_type]
                e, mi = c.num_experts, c.moe_intermediate_size
                layer[block] = {
                    "gate": {"kernel": s(h, e)},
                    "experts": {g: {"kernel": s(e, h, mi)}, u: {"kernel": s(e, h, mi)}, dn: {"kernel": s(e, mi, h)}},
                }
            else:
                layer["mlp"] = {
                    "gate_proj": linear(h, c.intermediate_size, c.mlp_bias),
                    "up_proj": linear(h, c.intermediate_size, c.mlp_bias),
                    "down_proj": linear(c.intermediate_size, h, c.mlp_bias),
                }
            layers[str(i)] = layer
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
                init = 0.0 if self.config.norm_offset else 1.0
                out[path] = jnp.full(spec.shape, init, spec.dtype)
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
        if c.embed_scale is not None:
            x = x * jnp.asarray(c.embed_scale, self.dtype)
        x = self._constrain_hidden(x)
        ropes = {rope: self._rope(position_ids, rope) for rope in {c.layer_rope(i) for i in range(c.num_hidden_layers)}}
        new_cache = [] if cache is not None else None
        for i, window in enumerate(c.layer_windows):
            layer = model["layers"][str(i)]
            cos, sin = ropes[c.layer_rope(i)]
            h = self._norm(x, layer["input_layernorm"])
            layer_cache = cache[i] if cache is not None else None
            h, layer_cache = self._attention(layer["self_attn"], h, cos, sin, key_valid, window, layer_cache, cache_index)
            if new_cache is not None:
                new_cache.append(layer_cache)
            if c.sandwich_norms:
                x = x + self._norm(h, layer["post_attention_layernorm"])
                h = self._norm(x, layer["pre_feedforward_layernorm"])
                x = x + self._norm(self._feed_forward(layer, h, i), layer["post_feedforward_layernorm"])
            else:
                x = x + h
                h = self._norm(x, layer["post_attention_layernorm"])
                x = x + self._feed_forward(layer, h, i)
            x = self._constrain_hidden(x)
        x = self._norm(x, model["norm"])
        return softcap(self._lm_head(params, x), c.final_softcap), new_cache

    def _norm(self, x: jax.Array, p: dict) -> jax.Array:
        return rms_norm(x, p["scale"], self.config.rms_norm_eps, self.config.norm_offset)

    def _lm_head(self, params: dict, x: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            emb = as_dense(params["model"]["embed_tokens"]["embedding"], self.dtype)
            return jnp.einsum("bth,vh->btv", x, emb, precision=self.precision)
        return self._dense(params["lm_head"], x)

    def _embed(self, table: Any, ids: jax.Array) -> jax.Array:
        if isinstance(table, QuantizedArray):
            return jnp.take(table.values, ids, axis=0).astype(self.dtype) * jnp.take(table.scale, ids, axis=0).astype(
                self.dtype
            )
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def _dense(self, p: dict, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, as_dense(p["kernel"], self.dtype), precision=self.precision)
        if "lora_a" in p:  # LoRA: x A B * alpha / rank beside the frozen kernel
            a, b = p["lora_a"].astype(self.dtype), p["lora_b"].astype(self.dtype)
            low = jnp.einsum("...i,ir->...r", x, a, precision=self.precision)
            y = y + jnp.einsum("...r,ro->...o", low, b, precision=self.precision) * jnp.asarray(self.lora_scaling, self.dtype)
        if "bias" in p:
            y = y + p["bias"].astype(self.dtype)
        return y

    def _rope(self, position_ids: jax.Array, rope: Any = None) -> tuple[jax.Array, jax.Array]:
        inv_freq = jnp.asarray(self.config.rope_inv_freq(rope))
        freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb).astype(self.dtype), jnp.sin(emb).astype(self.dtype)

    def _constrain(self, x: jax.Array, *entries: Any) -> jax.Array:
        if not self.shard_attention_computation:
            return x
        return constrain(x, self.mesh, *entries)

    def _constrain_hidden(self, x: jax.Array) -> jax.Array:
        """The residual stream's constraint by ``partition_axis.hidden_state_axis`` (none when it is unset)."""
        pa = self.partition_axis
        if pa.hidden_state_axis is None:
            return x
        return self._constrain(x, pa.batch_axis, pa.query_axis, pa.hidden_state_axis)

    def _attention(self, p, x, cos, sin, key_valid, window, cache, cache_index):
        c = self.config
        b, t, _ = x.shape
        nq, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = self._dense(p["q_proj"], x).reshape(b, t, nq, d)
        k = self._dense(p["k_proj"], x).reshape(b, t, nkv, d)
        v = self._dense(p["v_proj"], x).reshape(b, t, nkv, d)
        if c.qk_norm:
            q = self._norm(q, p["q_norm"])
            k = self._norm(k, p["k_norm"])
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        out, cache = self._attend(q, k, v, key_valid, window, cache, cache_index)
        return self._dense(p["o_proj"], out), cache

    def _rotate(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        cos, sin = cos[:, :, None], sin[:, :, None]
        r = cos.shape[-1]
        if r == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        rot, rest = x[..., :r], x[..., r:]  # partial rotary: only the first dims rotate
        return jnp.concatenate([rot * cos + rotate_half(rot) * sin, rest], axis=-1)

    def _attend(self, q, k, v, key_valid, window, cache, cache_index):
        """Causal (windowed) attention of ``q`` over ``k``/``v`` (``(batch, seq, heads, dim)``), writing them into
        ``cache`` at ``cache_index`` first when given; returns ``(batch, seq, heads * dim)`` and the cache."""
        c, pa = self.config, self.partition_axis
        b, t, nq, d = q.shape
        nkv = k.shape[2]
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
        decoding = cache is not None and t == 1
        q_seq = pa.generation_query_sequence_axis if decoding else pa.query_axis
        k_seq = pa.generation_key_sequence_axis if decoding else pa.key_sequence_axis
        heads = pa.generation_head_axis if decoding else pa.head_axis
        dim = pa.generation_attention_dim_axis if decoding else pa.attention_dim_axis
        q = self._constrain(q, pa.batch_axis, q_seq, heads, dim)
        k = self._constrain(k, pa.batch_axis, k_seq, heads, dim)
        v = self._constrain(v, pa.batch_axis, k_seq, heads, dim)
        scale = c.attn_scale if c.attn_scale is not None else d**-0.5
        scores = jnp.einsum("bthd,bshd->bhts", q, k, precision=self.precision) * jnp.asarray(scale, q.dtype)
        scores = softcap(scores, c.attn_softcap)
        scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        scores = self._constrain(scores, pa.batch_axis, heads, q_seq, k_seq)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhts,bshd->bthd", probs, v, precision=self.precision)
        out = self._constrain(out, pa.batch_axis, q_seq, heads, dim)
        return out.reshape(b, t, nq * d), cache

    def _feed_forward(self, layer: dict, x: jax.Array, i: int) -> jax.Array:
        if self.config.layer_is_moe(i):
            return self._moe(layer[MOE_NAMES[self.config.model_type][0]], x)
        return self._mlp(layer["mlp"], x)

    def _moe(self, p: dict, x: jax.Array) -> jax.Array:
        """Top-k routed experts, computed densely: every expert runs on every token and the outputs are weighted by
        the router's (renormalised) top-k probabilities, zero elsewhere; equal to the sparse dispatch."""
        c = self.config
        _, g, u, dn = MOE_NAMES[c.model_type]
        logits = jnp.einsum("bth,he->bte", x, as_dense(p["gate"]["kernel"], self.dtype), precision=self.precision)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top, idx = jax.lax.top_k(probs, c.num_experts_per_tok)
        if c.norm_topk_prob:
            top = top / jnp.sum(top, axis=-1, keepdims=True)
        weights = jnp.sum(jax.nn.one_hot(idx, c.num_experts, dtype=jnp.float32) * top[..., None], axis=-2)
        ex = p["experts"]
        act = _ACTIVATIONS[c.hidden_act]
        gate = jnp.einsum("bth,ehi->btei", x, as_dense(ex[g]["kernel"], self.dtype), precision=self.precision)
        up = jnp.einsum("bth,ehi->btei", x, as_dense(ex[u]["kernel"], self.dtype), precision=self.precision)
        out = jnp.einsum("btei,eih->bteh", act(gate) * up, as_dense(ex[dn]["kernel"], self.dtype), precision=self.precision)
        return jnp.einsum("bteh,bte->bth", out, weights.astype(self.dtype), precision=self.precision)

    def _mlp(self, p: dict, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.config.hidden_act]
        return self._dense(p["down_proj"], act(self._dense(p["gate_proj"], x)) * self._dense(p["up_proj"], x))

    # ----------------------------------------------------------------- use
    def generate(self, params: dict, input_ids, attention_mask=None, max_new_tokens: int = 32, **kwargs) -> jax.Array:
        """Greedy or sampled decoding (jitted, KV cache, left-padded batches); see
        :func:`hfbridge.jax.generate.generate` for ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``."""
        from hfbridge.jax.generate import generate

        return generate(self, params, input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs)

    def save_pretrained(self, path: str | Path, params: dict, overwrite: bool = False, format: str = "jax") -> Path:
        """Write ``params`` into a folder that appears only when complete. ``format="jax"``: hfbridge's JAX
        checkpoint (``from_torch=False`` loads it back); ``format="hf"``: a Hugging Face folder (``config.json`` +
        ``model.safetensors`` in transformers' layout, LoRA factors merged, 8-bit weights dequantized) that
        transformers and ``from_pretrained`` load. A non-empty ``path`` is refused unless ``overwrite`` (and then
        only a folder hfbridge wrote is replaced)."""
        if format == "hf":
            from hfbridge.jax.export import save_hf

            return save_hf(path, self, params, overwrite=overwrite)
        if format != "jax":
            raise ValueError(f"save_pretrained(format={format!r}): use 'jax' (hfbridge's JAX checkpoint) or 'hf'")
        from hfbridge.jax.checkpoint import save_checkpoint

        return save_checkpoint(path, self, params, overwrite=overwrite)

    def replace(self, **changes: Any) -> LlamaForCausalLM:
        """A copy with some settings changed (e.g. ``mesh=...`` after sharding parameters yourself)."""
        return dataclasses.replace(self, **changes)

    def num_params(self, params: dict | None = None) -> int:
        from hfbridge.jax import tree as tree_lib

        tree = params if params is not None else self.param_shapes()
        return int(sum(np.prod(leaf.shape) for leaf in tree_lib.flatten(tree).values()))

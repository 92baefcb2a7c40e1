"""GPT-2 in plain JAX: learned position embeddings, LayerNorm with bias, fused ``c_attn``, ``gelu_new`` MLP.

Parameters mirror the Hugging Face names (``transformer/h/0/attn/c_attn/kernel``); GPT-2's ``Conv1D`` weights are
already ``(in, out)``, so they are stored as they are. The LM head is tied to ``transformer/wte`` unless the config
unties it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from hfbridge.jax.models.llama import _ACTIVATIONS, KVCache, LlamaForCausalLM
from hfbridge.jax.quant import as_dense


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32 and returned in ``x``'s dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


@dataclass(frozen=True, eq=False)
class GPT2LMHeadModel(LlamaForCausalLM):
    """GPT-2; the same interface as :class:`LlamaForCausalLM` (forward, cache, generation, saving, LoRA)."""

    def param_shapes(self) -> dict:
        c = self.config
        h, inner = c.hidden_size, c.intermediate_size

        def s(*shape):
            return jax.ShapeDtypeStruct(shape, self.param_dtype)

        def linear(n_in, n_out):
            return {"kernel": s(n_in, n_out), "bias": s(n_out)}

        def norm():
            return {"scale": s(h), "bias": s(h)}

        layers = {
            str(i): {
                "ln_1": norm(),
                "attn": {"c_attn": linear(h, 3 * h), "c_proj": linear(h, h)},
                "ln_2": norm(),
                "mlp": {"c_fc": linear(h, inner), "c_proj": linear(inner, h)},
            }
            for i in range(c.num_hidden_layers)
        }
        tree = {
            "transformer": {
                "wte": {"embedding": s(c.vocab_size, h)},
                "wpe": {"embedding": s(c.max_position_embeddings, h)},
                "h": layers,
                "ln_f": norm(),
            }
        }
        if not c.tie_word_embeddings:
            tree["lm_head"] = {"kernel": s(h, c.vocab_size)}
        return tree

    def forward(self, params, input_ids, position_ids, key_valid, cache: KVCache | None = None, cache_index=0):
        c = self.config
        model = params["transformer"]
        x = self._embed(model["wte"]["embedding"], input_ids) + self._embed(model["wpe"]["embedding"], position_ids)
        x = self._constrain_hidden(x)
        new_cache = [] if cache is not None else None
        eps = c.rms_norm_eps
        for i in range(c.num_hidden_layers):
            layer = model["h"][str(i)]
            h = layer_norm(x, layer["ln_1"]["scale"], layer["ln_1"]["bias"], eps)
            b, t, _ = h.shape
            q, k, v = jnp.split(self._dense(layer["attn"]["c_attn"], h), 3, axis=-1)
            shape = (b, t, c.num_attention_heads, c.head_dim)
            out, layer_cache = self._attend(
                q.reshape(shape), k.reshape(shape), v.reshape(shape), key_valid, None,
                cache[i] if cache is not None else None, cache_index,
            )
            if new_cache is not None:
                new_cache.append(layer_cache)
            x = x + self._dense(layer["attn"]["c_proj"], out)
            h = layer_norm(x, layer["ln_2"]["scale"], layer["ln_2"]["bias"], eps)
            act = _ACTIVATIONS[c.hidden_act]
            x = self._constrain_hidden(x + self._dense(layer["mlp"]["c_proj"], act(self._dense(layer["mlp"]["c_fc"], h))))
        x = layer_norm(x, model["ln_f"]["scale"], model["ln_f"]["bias"], eps)
        if c.tie_word_embeddings:
            emb = as_dense(model["wte"]["embedding"], self.dtype)
            return jnp.einsum("bth,vh->btv", x, emb, precision=self.precision), new_cache
        return self._dense(params["lm_head"], x), new_cache

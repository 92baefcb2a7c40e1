"""The model configuration the JAX definitions read, built from a Hugging Face config; dtype and precision names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "mixtral", "qwen3_moe",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_GEMMA = ("gemma", "gemma2", "gemma3_text")


class UnsupportedArchitectureError(ValueError):
    """A checkpoint whose architecture has no JAX definition in hfbridge; the message lists the supported ones."""


@dataclass(frozen=True)
class RopeSpec:
    """One rotary embedding: base, type and the type's extra parameters (sorted ``(key, value)`` pairs)."""

    theta: float = 10000.0
    type: str = "default"
    scaling: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class JaxLMConfig:
    """What the JAX decoder definitions need to know; ``hf_config`` keeps the full Hugging Face dict for saving.

    One dataclass covers every supported family; the family-specific fields keep their neutral defaults
    (``norm_offset`` 0, no soft-capping, no experts...) where a family lacks the feature.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # one entry per layer: window size, or None for full attention
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Gemma: norms scale by (1 + weight), embeddings by sqrt(hidden) (in the computation dtype)
    norm_offset: float = 0.0
    embed_scale: float | None = None
    # Gemma 2/3: post-attention and pre/post-feed-forward norms around each block ("sandwich")
    sandwich_norms: bool = False
    attn_scale: float | None = None  # None: head_dim ** -0.5 (Gemma 2/3: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    local_rope: RopeSpec | None = None  # Gemma 3: the RoPE of sliding-window layers
    rotary_dim: int | None = None  # Phi-3's partial_rotary_factor: only the first rotary_dim dims rotate
    # mixture of experts (mixtral, qwen3_moe): a router and num_experts stacked expert MLPs on moe_layers
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()
    hf_config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        return self.sliding_windows or (None,) * self.num_hidden_layers

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, i: int) -> bool:
        return self.is_moe and (self.moe_layers[i] if self.moe_layers else True)

    @property
    def rope(self) -> RopeSpec:
        return RopeSpec(self.rope_theta, self.rope_type, self.rope_scaling)

    def layer_rope(self, i: int) -> RopeSpec:
        """The RoPE of layer ``i`` (Gemma 3's sliding layers use ``local_rope``)."""
        if self.local_rope is not None and self.layer_windows[i] is not None:
            return self.local_rope
        return self.rope

    def rope_inv_freq(self, rope: RopeSpec | None = None) -> np.ndarray:
        """RoPE inverse frequencies (float32, ``rotary_dim // 2``), as transformers computes them."""
        rope = rope or self.rope
        dim = self.rotary_dim or self.head_dim
        inv = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv = inv.astype(np.float32)
        params = dict(rope.scaling)
        if rope.type == "linear":
            inv = inv / np.float32(params["factor"])
        elif rope.type == "llama3":
            factor = params["factor"]
            low, high = params["low_freq_factor"], params["high_freq_factor"]
            old_ctx = params["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
            wavelen = 2 * np.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_ctx / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        return inv


def _rope_params(hf: Any, layer_type: str | None = None) -> dict:
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    params = dict(params)
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def _rope_spec(hf: Any, layer_type: str | None = None) -> RopeSpec:
    rope = _rope_params(hf, layer_type)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"RoPE type {rope_type!r} ({getattr(hf, 'model_type', '?')}) is not supported by hfbridge.jax; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    skip = ("rope_theta", "rope_type", "partial_rotary_factor")
    extra = {k: v for k, v in rope.items() if k not in skip and _hashable(v)}
    return RopeSpec(float(rope["rope_theta"]), rope_type, tuple(sorted(extra.items())))


def _refuse(hf: Any, what: str) -> None:
    raise UnsupportedArchitectureError(f"{hf.model_type}: {what} is not supported by hfbridge.jax")


def _windows_from_layer_types(hf: Any, n_layers: int) -> tuple[int | None, ...]:
    window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None) or ["full_attention"] * n_layers
    return tuple(window if t == "sliding_attention" and window is not None else None for t in types)


def config_from_hf(hf: Any) -> JaxLMConfig:
    """Build a :class:`JaxLMConfig` from a transformers config; unsupported architectures raise a clear error."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = ", ".join(getattr(hf, "architectures", None) or []) or "unknown architecture"
        raise UnsupportedArchitectureError(
            f"hfbridge.jax has no JAX definition for model_type {model_type!r} ({archs}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "gpt2":
        return _gpt2_config(hf)
    n_layers = hf.num_hidden_layers
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    attention_bias = bool(getattr(hf, "attention_bias", False))
    extra: dict[str, Any] = {}
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    elif model_type in ("mistral", "phi3", "mixtral"):
        qkv_bias = o_bias = False
    else:
        qkv_bias = o_bias = attention_bias
    window = getattr(hf, "sliding_window", None)
    if model_type in ("mistral", "phi3", "mixtral"):
        windows = (window,) * n_layers
    elif model_type in ("qwen2", "qwen3", "qwen3_moe") and window is not None:
        windows = _windows_from_layer_types(hf, n_layers)
    elif model_type in ("gemma2", "gemma3_text"):
        windows = _windows_from_layer_types(hf, n_layers)
    else:
        windows = (None,) * n_layers
    hidden_act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu")
    if model_type in _GEMMA:
        extra.update(norm_offset=1.0, embed_scale=float(hf.hidden_size) ** 0.5)
        if model_type == "gemma" and hidden_act == "gelu":
            hidden_act = "gelu_pytorch_tanh"  # what transformers' GemmaConfig does with the legacy value
    if model_type in ("gemma2", "gemma3_text"):
        if getattr(hf, "use_bidirectional_attention", False):
            _refuse(hf, "use_bidirectional_attention")
        extra.update(
            sandwich_norms=True,
            attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,
            attn_softcap=getattr(hf, "attn_logit_softcapping", None),
            final_softcap=getattr(hf, "final_logit_softcapping", None),
        )
    if model_type == "gemma3_text":
        rope = _rope_spec(hf, "full_attention")
        extra["local_rope"] = _rope_spec(hf, "sliding_attention")
    else:
        rope = _rope_spec(hf)
    if model_type == "phi3":
        factor = float(_rope_params(hf).get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)))
        if factor != 1.0:
            extra["rotary_dim"] = int(head_dim * factor)
    if model_type == "mixtral":
        extra.update(
            num_experts=hf.num_local_experts, num_experts_per_tok=hf.num_experts_per_tok,
            moe_intermediate_size=hf.intermediate_size, norm_topk_prob=True,
        )
    elif model_type == "qwen3_moe":
        step = getattr(hf, "decoder_sparse_step", 1) or 1
        dense = set(getattr(hf, "mlp_only_layers", None) or [])
        extra.update(
            num_experts=hf.num_experts, num_experts_per_tok=hf.num_experts_per_tok,
            moe_intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
            moe_layers=tuple(i not in dense and hf.num_experts > 0 and (i + 1) % step == 0 for i in range(n_layers)),
        )
    eos = getattr(hf, "eos_token_id", None)
    if isinstance(eos, list):
        eos = tuple(eos)
    return JaxLMConfig(
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.rms_norm_eps),
        max_position_embeddings=getattr(hf, "max_position_embeddings", 2048),
        hidden_act=hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        sliding_windows=tuple(windows),
        rope_theta=rope.theta,
        rope_type=rope.type,
        rope_scaling=rope.scaling,
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_id=eos,
        pad_token_id=getattr(hf, "pad_token_id", None),
        hf_config=hf.to_dict(),
        **extra,
    )


def _gpt2_config(hf: Any) -> JaxLMConfig:
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or getattr(hf, "reorder_and_upcast_attn", False):
        _refuse(hf, "scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn")
    if getattr(hf, "add_cross_attention", False):
        _refuse(hf, "cross-attention (add_cross_attention)")
    eos = getattr(hf, "eos_token_id", None)
    head_dim = hf.n_embd // hf.n_head
    return JaxLMConfig(
        model_type="gpt2",
        vocab_size=hf.vocab_size,
        hidden_size=hf.n_embd,
        intermediate_size=hf.n_inner or 4 * hf.n_embd,
        num_hidden_layers=hf.n_layer,
        num_attention_heads=hf.n_head,
        num_key_value_heads=hf.n_head,
        head_dim=head_dim,
        rms_norm_eps=float(hf.layer_norm_epsilon),
        max_position_embeddings=hf.n_positions,
        hidden_act=hf.activation_function,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        sliding_windows=(None,) * hf.n_layer,
        attn_scale=head_dim**-0.5 if hf.scale_attn_weights else 1.0,
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=getattr(hf, "pad_token_id", None),
        hf_config=hf.to_dict(),
    )


def _hashable(v: Any) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


def load_hf_config(path: str | Path, overrides: dict | None = None):
    """The transformers config of the folder ``path``, with ``overrides`` applied to its fields."""
    from transformers import AutoConfig

    overrides = dict(overrides or {})
    config = AutoConfig.from_pretrained(str(path))
    if overrides:
        data = config.to_dict()
        data.update(overrides)
        config = type(config).from_dict(data)
    return config


def read_config_json(path: str | Path) -> dict:
    with open(Path(path) / "config.json") as f:
        return json.load(f)


_DTYPES = {
    "float32": jnp.float32, "fp32": jnp.float32, "f32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16, "f16": jnp.float16,
}

_PRECISIONS = {
    "fastest": jax.lax.Precision.DEFAULT, "default": jax.lax.Precision.DEFAULT, "bfloat16": jax.lax.Precision.DEFAULT,
    "high": jax.lax.Precision.HIGH, "tensorfloat32": jax.lax.Precision.HIGH, "bfloat16_3x": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST, "float32": jax.lax.Precision.HIGHEST,
}


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """A JAX dtype from a name (``"bf16"``, ``"float32"``...), a numpy/JAX dtype, or a torch dtype."""
    if isinstance(dtype, str):
        key = dtype.lower().replace("torch.", "")
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
        return jnp.dtype(_DTYPES[key])
    if type(dtype).__module__.startswith("torch"):
        return resolve_dtype(str(dtype))
    return jnp.dtype(dtype)


def resolve_precision(precision: Any) -> jax.lax.Precision | None:
    """A ``jax.lax.Precision`` from a name (``"fastest"``, ``"high"``, ``"highest"``...), a Precision, or None."""
    if precision is None or isinstance(precision, jax.lax.Precision):
        return precision
    if isinstance(precision, str):
        key = precision.lower()
        if key in _PRECISIONS:
            return _PRECISIONS[key]
    raise ValueError(f"unknown precision {precision!r}; use a jax.lax.Precision or one of {sorted(_PRECISIONS)}")

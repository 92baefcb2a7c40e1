"""The model configuration the JAX definitions read, built from a Hugging Face config; dtype and precision names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedArchitectureError(ValueError):
    """A checkpoint whose architecture has no JAX definition in hfbridge; the message lists the supported ones."""


@dataclass(frozen=True)
class JaxLMConfig:
    """What the Llama-family JAX model needs to know; ``hf_config`` keeps the full Hugging Face dict for saving."""

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
    hf_config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        return self.sliding_windows or (None,) * self.num_hidden_layers

    def rope_inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies (float32, ``head_dim // 2``), as transformers computes them."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv = inv.astype(np.float32)
        params = dict(self.rope_scaling)
        if self.rope_type == "linear":
            inv = inv / np.float32(params["factor"])
        elif self.rope_type == "llama3":
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


def _rope_params(hf: Any) -> dict:
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    params = dict(params)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def config_from_hf(hf: Any) -> JaxLMConfig:
    """Build a :class:`JaxLMConfig` from a transformers config; unsupported architectures raise a clear error."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = ", ".join(getattr(hf, "architectures", None) or []) or "unknown architecture"
        raise UnsupportedArchitectureError(
            f"hfbridge.jax has no JAX definition for model_type {model_type!r} ({archs}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    n_layers = hf.num_hidden_layers
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    attention_bias = bool(getattr(hf, "attention_bias", False))
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    elif model_type == "mistral":
        qkv_bias = o_bias = False
    else:
        qkv_bias = o_bias = attention_bias
    window = getattr(hf, "sliding_window", None)
    if model_type == "mistral":
        windows = (window,) * n_layers
    elif model_type in ("qwen2", "qwen3") and window is not None:
        types = getattr(hf, "layer_types", None) or ["full_attention"] * n_layers
        windows = tuple(window if t == "sliding_attention" else None for t in types)
    else:
        windows = (None,) * n_layers
    rope = _rope_params(hf)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"RoPE type {rope_type!r} is not supported by hfbridge.jax; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    eos = getattr(hf, "eos_token_id", None)
    if isinstance(eos, list):
        eos = tuple(eos)
    extra = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type") and _hashable(v)}
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
        hidden_act=getattr(hf, "hidden_act", "silu"),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        sliding_windows=tuple(windows),
        rope_theta=float(rope["rope_theta"]),
        rope_type=rope_type,
        rope_scaling=tuple(sorted(extra.items())),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_id=eos,
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

"""8-bit weights: int8 values with one float scale per channel, dequantized on the fly inside the model."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hfbridge.jax import tree as tree_lib

DEFAULT_BIT_TARGETS = (r"kernel$", r"embedding$")


@jax.tree_util.register_dataclass
@dataclass
class QuantizedArray:
    """``values * scale``: int8 ``values`` and float32 ``scale`` with size 1 along ``reduce_axis``.

    Kernels ``(in, out)`` get one scale per output channel (``reduce_axis=0``); embeddings ``(vocab, hidden)``
    one per row (``reduce_axis=1``).
    """

    values: Any
    scale: Any
    reduce_axis: int = field(default=0, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.scale.nbytes)

    def dequantize(self, dtype: Any = jnp.float32):
        return self.values.astype(dtype) * self.scale.astype(dtype)


def quantize(x: np.ndarray | jax.Array, reduce_axis: int = 0) -> QuantizedArray:
    """Symmetric per-channel int8: ``scale = max|x| / 127`` over ``reduce_axis`` (host numpy or JAX input).

    Host arrays are processed in row blocks, so the float temporaries stay small next to the tensor.
    """
    if isinstance(x, np.ndarray) and x.ndim == 2:
        return _quantize_host(x, reduce_axis)
    x32 = jnp.asarray(x).astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x32), axis=reduce_axis, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0).astype(jnp.float32)
    values = jnp.clip(jnp.round(x32 / scale), -127, 127).astype(jnp.int8)
    return QuantizedArray(values, scale, reduce_axis)


def _quantize_host(x: np.ndarray, reduce_axis: int, block_bytes: int = 8 << 20) -> QuantizedArray:
    rows = max(1, block_bytes // max(1, x.shape[1] * 4))
    blocks = [slice(i, i + rows) for i in range(0, x.shape[0], rows)]
    if reduce_axis == 0:
        absmax = np.zeros((1, x.shape[1]), np.float32)
        for b in blocks:
            np.maximum(absmax, np.abs(x[b].astype(np.float32)).max(axis=0, keepdims=True), out=absmax)
    else:
        absmax = np.concatenate([np.abs(x[b].astype(np.float32)).max(axis=1, keepdims=True) for b in blocks])
    scale = np.where(absmax > 0, absmax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    values = np.empty(x.shape, np.int8)
    for b in blocks:
        s = scale if reduce_axis == 0 else scale[b]
        values[b] = np.clip(np.rint(x[b].astype(np.float32) / s), -127, 127)
    return QuantizedArray(values, scale, reduce_axis)


def reduce_axis_for(path: str) -> int:
    """Embeddings are scaled per row (token), everything else per output channel (last axis kept)."""
    return 1 if path.endswith("embedding") else 0


def is_targeted(path: str, targets: Sequence[str] | None) -> bool:
    return any(re.search(t, path) for t in (DEFAULT_BIT_TARGETS if targets is None else targets))


def quantize_params(params: Mapping, targets: Sequence[str] | None = None) -> dict:
    """Quantize every 2-D parameter whose path matches one of the ``targets`` regexes (default kernels, embeddings)."""

    def fn(path: str, leaf: Any) -> Any:
        if isinstance(leaf, QuantizedArray) or leaf.ndim != 2 or not is_targeted(path, targets):
            return leaf
        return quantize(leaf, reduce_axis_for(path))

    return tree_lib.map_with_path(fn, params)


def dequantize_params(params: Mapping, dtype: Any = jnp.float32) -> dict:
    return tree_lib.map_with_path(
        lambda _, leaf: leaf.dequantize(dtype) if isinstance(leaf, QuantizedArray) else leaf, params
    )


def param_bytes(params: Mapping) -> int:
    """Bytes the parameters occupy (int8 values plus scales for quantized ones)."""
    return sum(int(leaf.nbytes) for leaf in tree_lib.flatten(params).values())


def as_dense(w: Any, dtype: Any):
    """A weight ready for a matmul in ``dtype``: dequantized when 8-bit, cast otherwise."""
    if isinstance(w, QuantizedArray):
        return w.dequantize(dtype)
    return w.astype(dtype)

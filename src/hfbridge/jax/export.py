"""JAX parameters back to a Hugging Face folder (``config.json`` + ``model.safetensors``) that transformers loads.

The inverse of :mod:`hfbridge.jax.convert`: kernels transposed back to ``(out, in)`` (GPT-2's ``Conv1D``\\ s stay
``(in, out)``), Phi-3's ``q/k/v_proj`` and ``gate/up_proj`` re-fused, stacked MoE experts written per expert, tied
LM heads left out, LoRA factors merged into their kernels and 8-bit weights dequantized. Each tensor is computed
only when the writer reaches it (a sharded parameter is fetched from its devices then, one at a time), so host
memory holds the parameters plus about one tensor, never a second full copy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hfbridge.io import atomic_dir
from hfbridge.jax import tree as tree_lib
from hfbridge.jax.quant import QuantizedArray
from hfbridge.jax.st_io import SINGLE_NAME, save_tensors


@dataclass
class LazyTensor:
    """A tensor described by ``shape`` and ``dtype`` whose values ``fn()`` computes when it is written."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fn: Callable[[], np.ndarray]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        value = np.asarray(self.fn())
        if tuple(value.shape) != tuple(self.shape):
            raise ValueError(f"lazy tensor computed shape {value.shape}, announced {self.shape}")
        return value.astype(dtype or self.dtype, copy=False)


def gather(x: Any) -> np.ndarray:
    """A fresh host copy of ``x``, filled shard by shard (each distinct shard fetched once). Unlike
    ``np.asarray(jax_array)``, which caches the host copy on the array (a second full copy of every parameter
    once all are written), nothing stays referenced after the caller drops the result."""
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    out = np.empty(x.shape, dtype=x.dtype)
    seen = set()
    for shard in x.addressable_shards:
        key = tuple((s.start, s.stop, s.step) for s in shard.index)
        if key not in seen:
            seen.add(key)
            out[shard.index] = np.asarray(shard.data)
    return out


def _host(leaf: Any) -> np.ndarray:
    """One parameter on the host (gathered from its shards), dequantized when 8-bit."""
    if isinstance(leaf, QuantizedArray):
        return gather(leaf.values).astype(np.float32) * gather(leaf.scale).astype(np.float32)
    return gather(leaf)


def _dtype(leaf: Any) -> np.dtype:
    return np.dtype(np.float32) if isinstance(leaf, QuantizedArray) else np.dtype(leaf.dtype)


def _kernel(flat: dict, path: str, scaling: float) -> tuple[tuple[int, ...], np.dtype, Callable[[], np.ndarray]]:
    """``(in, out)`` kernel at ``path`` with its LoRA factors (``lora_a``, ``lora_b`` beside it) merged."""
    base = path.rsplit("/", 1)[0]
    leaf = flat[path]
    a, b = flat.get(f"{base}/lora_a"), flat.get(f"{base}/lora_b")
    dtype = _dtype(leaf)

    def fn() -> np.ndarray:
        w = _host(leaf)
        if a is not None:
            delta = gather(a).astype(np.float32) @ gather(b).astype(np.float32) * np.float32(scaling)
            w = (w.astype(np.float32) + delta).astype(dtype)
        return w

    return tuple(leaf.shape), dtype, fn


def _transposed(shape, dtype, fn) -> LazyTensor:
    return LazyTensor(tuple(reversed(shape)), dtype, lambda: np.ascontiguousarray(fn().T))


_EXPERTS = re.compile(r"^(.*)/experts/(\w+)/kernel$")


def hf_tensors(module: Any, params: dict) -> dict[str, LazyTensor]:
    """``{hf_name: LazyTensor}`` in transformers' layout for ``module``'s ``params`` (nothing computed yet)."""
    config = module.config
    flat = tree_lib.flatten(params)
    scaling = float(getattr(module, "lora_scaling", 1.0))
    conv1d = config.model_type == "gpt2"
    out: dict[str, LazyTensor] = {}
    fused: dict[str, list[tuple[str, Any]]] = {}
    for path, leaf in flat.items():
        *parts, last = path.split("/")
        name = ".".join(parts)
        if last in ("lora_a", "lora_b"):
            continue
        if last in ("embedding", "scale", "bias"):
            key = f"{name}.{last if last == 'bias' else 'weight'}"
            out[key] = LazyTensor(tuple(leaf.shape), _dtype(leaf), lambda leaf=leaf: _host(leaf))
            continue
        if last != "kernel":
            raise ValueError(f"cannot export parameter {path!r}: unknown leaf name {last!r}")
        shape, dtype, fn = _kernel(flat, path, scaling)
        experts = _EXPERTS.match(path)
        if experts and len(shape) == 3:
            prefix = experts.group(1).replace("/", ".")
            for e in range(shape[0]):
                out[f"{prefix}.experts.{e}.{experts.group(2)}.weight"] = LazyTensor(
                    (shape[2], shape[1]), dtype, lambda fn=fn, e=e: np.ascontiguousarray(fn()[e].T)
                )
            continue
        if config.model_type == "phi3" and parts[-1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            target = ".".join(parts[:-1]) + (".qkv_proj.weight" if parts[-1].endswith(("q_proj", "k_proj", "v_proj"))
                                             else ".gate_up_proj.weight")
            fused.setdefault(target, []).append((parts[-1], (shape, dtype, fn)))
            if len(fused[target]) == (3 if "qkv" in target else 2):
                out[target] = _fuse(fused.pop(target))
            continue
        if conv1d and parts[-1] != "lm_head":
            out[f"{name}.weight"] = LazyTensor(shape, dtype, fn)
        else:
            out[f"{name}.weight"] = _transposed(shape, dtype, fn)
    if fused:
        raise ValueError(f"cannot re-fuse {sorted(fused)}: some of their parts are missing from the parameters")
    return out


def _fuse(parts: list[tuple[str, Any]]) -> LazyTensor:
    """Phi-3's fused weight ``(q+k+v, in)`` / ``(gate+up, in)`` from its parts, in transformers' order."""
    order = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    parts = sorted(parts, key=lambda p: order.index(p[0]))
    shapes = [p[1][0] for p in parts]
    dtype = parts[0][1][1]
    fns = [p[1][2] for p in parts]
    shape = (sum(s[1] for s in shapes), shapes[0][0])
    return LazyTensor(shape, dtype, lambda: np.concatenate([np.asarray(fn()).T for fn in fns], axis=0))


def save_hf(path: str | Path, module: Any, params: dict, overwrite: bool = False) -> Path:
    """Write a Hugging Face folder for ``module`` and ``params`` (see the module docstring); it appears only when
    complete, and a non-empty ``path`` is refused unless ``overwrite`` (then only a folder hfbridge wrote)."""
    tensors = hf_tensors(module, params)  # every name and shape is checked before the folder is made
    config = dict(module.config.hf_config)
    dtypes = {np.dtype(t.dtype).name for t in tensors.values()}
    config["dtype"] = "bfloat16" if dtypes == {"bfloat16"} else "float16" if dtypes == {"float16"} else "float32"
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_tensors(tmp / SINGLE_NAME, tensors, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    return Path(path)

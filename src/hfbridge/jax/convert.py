"""Hugging Face safetensors to JAX parameters, one tensor at a time, without building the PyTorch model.

Each tensor is read from its shard, renamed, transposed when it is a linear weight, cast to ``param_dtype``,
optionally quantized to int8, and handed to a placement function (a device, or a sharding on the mesh) before
the next one is read, so host memory holds one shard's mapping plus the parameters already placed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hfbridge.jax import tree as tree_lib
from hfbridge.jax.quant import QuantizedArray, is_targeted, quantize, reduce_axis_for
from hfbridge.jax.st_io import checkpoint_files, iter_tensors

log = logging.getLogger(__name__)

Place = Callable[[str, Any], Any]


def hf_to_jax_name(name: str, ndim: int) -> tuple[str, bool] | None:
    """``(path, transpose)`` for a Hugging Face tensor name, or None for buffers that are not parameters.

    ``model.layers.0.self_attn.q_proj.weight`` -> ``model/layers/0/self_attn/q_proj/kernel`` (transposed);
    ``*.embed_tokens.weight`` -> ``embedding``; 1-D ``*.weight`` (norms) -> ``scale``; ``*.bias`` -> ``bias``.
    """
    *module, leaf = name.split(".")
    if not module or name.endswith("rotary_emb.inv_freq"):
        return None
    base = "/".join(module)
    if leaf == "bias":
        return f"{base}/bias", False
    if leaf != "weight":
        return None
    if module[-1] == "embed_tokens":
        return f"{base}/embedding", False
    if ndim == 2:
        return f"{base}/kernel", True
    if ndim == 1:
        return f"{base}/scale", False
    return None


def iter_hf_params(folder: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """``(jax_path, array)`` for every parameter tensor of a Hugging Face safetensors checkpoint, shard by shard."""
    for file in checkpoint_files(folder):
        log.debug("reading %s", file)
        for name, array in iter_tensors(file):
            mapped = hf_to_jax_name(name, array.ndim)
            if mapped is None:
                log.debug("skipping %s (not a parameter)", name)
                continue
            path, transpose = mapped
            yield path, (np.ascontiguousarray(array.T) if transpose else array)


def assemble_params(
    entries: Iterable[tuple[str, Any]],
    expected: dict,
    param_dtype: Any,
    place: Place,
    load_in_8bit: bool = False,
    bit_targeted_params: Sequence[str] | None = None,
    source: str = "checkpoint",
) -> dict:
    """Check, cast, (de)quantize and place each ``(path, array)``; return the nested parameter dict.

    ``expected`` is the model's ``param_shapes()``; a tensor with a different shape, or a parameter the
    checkpoint lacks, raises. Extra tensors (e.g. ``lm_head`` of a tied model) are skipped with a log line.
    """
    shapes = {path: tuple(spec.shape) for path, spec in tree_lib.flatten(expected).items()}
    np_dtype = np.dtype(param_dtype)
    placed: dict[str, Any] = {}
    for path, value in entries:
        if path not in shapes:
            log.info("%s: skipping %s, which the JAX model has no parameter for", source, path)
            continue
        if tuple(value.shape) != shapes[path]:
            raise ValueError(f"{source}: {path} has shape {tuple(value.shape)}, the model expects {shapes[path]}")
        if load_in_8bit and value.ndim == 2 and is_targeted(path, bit_targeted_params):
            if not isinstance(value, QuantizedArray):
                value = quantize(np.asarray(value), reduce_axis_for(path))
        elif isinstance(value, QuantizedArray):
            value = np.asarray(value.values, np.float32) * np.asarray(value.scale, np.float32)
        if not isinstance(value, QuantizedArray) and value.dtype != np_dtype:
            value = value.astype(np_dtype)
        placed[path] = place(path, value)
        del value
    missing = [path for path in shapes if path not in placed]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} parameter(s) the model needs: {missing[:10]}")
    return tree_lib.unflatten({path: placed[path] for path in shapes})

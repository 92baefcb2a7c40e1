"""Hugging Face safetensors to JAX parameters, one tensor at a time, without building the PyTorch model.

Each tensor is read from its shard, renamed, transposed when it is a linear weight, cast to ``param_dtype``,
optionally quantized to int8, and handed to a placement function (a device, or a sharding on the mesh) before
the next one is read, so host memory holds one shard's mapping plus the parameters already placed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hfbridge.jax import tree as tree_lib
from hfbridge.jax.quant import QuantizedArray, is_targeted, quantize, reduce_axis_for
from hfbridge.jax.st_io import checkpoint_files, iter_tensors

log = logging.getLogger(__name__)

Place = Callable[[str, Any], Any]


def hf_to_jax_name(name: str, ndim: int, conv1d: bool = False) -> tuple[str, bool] | None:
    """``(path, transpose)`` for a Hugging Face tensor name, or None for buffers that are not parameters.

    ``model.layers.0.self_attn.q_proj.weight`` -> ``model/layers/0/self_attn/q_proj/kernel`` (transposed);
    ``*.embed_tokens.weight`` (GPT-2: ``wte``, ``wpe``) -> ``embedding``; 1-D ``*.weight`` (norms) -> ``scale``;
    ``*.bias`` -> ``bias``. ``conv1d``: 2-D weights are GPT-2 ``Conv1D``s, already ``(in, out)`` (not transposed),
    except ``lm_head``.
    """
    *module, leaf = name.split(".")
    if not module or name.endswith("rotary_emb.inv_freq"):
        return None
    base = "/".join(module)
    if leaf == "bias":
        return f"{base}/bias", False
    if leaf != "weight":
        return None
    if module[-1] in EMBEDDING_MODULES:
        return f"{base}/embedding", False
    if ndim == 2:
        return f"{base}/kernel", not (conv1d and module[-1] != "lm_head")
    if ndim == 1:
        return f"{base}/scale", False
    return None


EMBEDDING_MODULES = ("embed_tokens", "wte", "wpe")
_EXPERT = re.compile(r"^(.*)/experts/(\d+)/(\w+)/kernel$")


def iter_hf_params(folder: str | Path, config: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(jax_path, array)`` for every parameter tensor of a Hugging Face safetensors checkpoint, shard by shard.

    With the model's ``config``, family layouts are converted on the way: Phi-3's fused ``qkv_proj`` and
    ``gate_up_proj`` are split into ``q/k/v_proj`` and ``gate/up_proj``; per-expert MoE weights are stacked into
    ``(n_experts, in, out)`` kernels (one layer's experts are held until the last arrives); GPT-2's names get the
    ``transformer.`` prefix old checkpoints lack.
    """
    model_type = getattr(config, "model_type", None)
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for file in checkpoint_files(folder):
        log.debug("reading %s", file)
        for name, array in iter_tensors(file):
            if model_type == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
                name = f"transformer.{name}"
            mapped = hf_to_jax_name(name, array.ndim, conv1d=model_type == "gpt2")
            if mapped is None:
                log.debug("skipping %s (not a parameter)", name)
                continue
            path, transpose = mapped
            value = np.ascontiguousarray(array.T) if transpose else array
            found = _EXPERT.match(path)
            if found and config is not None and config.num_experts:
                prefix, index, weight = found.groups()
                group = experts.setdefault((prefix, weight), {})
                group[int(index)] = value
                if len(group) == config.num_experts:
                    del experts[(prefix, weight)]
                    yield f"{prefix}/experts/{weight}/kernel", np.stack([group[e] for e in range(config.num_experts)])
                continue
            if model_type == "phi3" and path.endswith(("self_attn/qkv_proj/kernel", "mlp/gate_up_proj/kernel")):
                yield from _split_fused(path, value, config)
                continue
            yield path, value
    if experts:
        incomplete = {f"{p}/experts/*/{w}": sorted(g) for (p, w), g in experts.items()}
        raise ValueError(f"{folder}: experts missing from the checkpoint (found only these indices): {incomplete}")


def _split_fused(path: str, kernel: np.ndarray, config: Any) -> Iterator[tuple[str, np.ndarray]]:
    """Phi-3's fused kernels ``(in, q+k+v)`` and ``(in, gate+up)`` as separate ``(in, out)`` kernels."""
    base = path.rsplit("/", 2)[0]
    if path.endswith("qkv_proj/kernel"):
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        if kernel.shape[1] != q + 2 * kv:
            raise ValueError(f"{path}: fused qkv has {kernel.shape[1]} outputs, the config implies {q} + 2 * {kv}")
        parts = {"q_proj": kernel[:, :q], "k_proj": kernel[:, q : q + kv], "v_proj": kernel[:, q + kv :]}
    else:
        n = config.intermediate_size
        if kernel.shape[1] != 2 * n:
            raise ValueError(f"{path}: fused gate_up has {kernel.shape[1]} outputs, the config implies 2 * {n}")
        parts = {"gate_proj": kernel[:, :n], "up_proj": kernel[:, n:]}
    for name, part in parts.items():
        yield f"{base}/{name}/kernel", np.ascontiguousarray(part)


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

"""hfbridge's own JAX checkpoint: ``config.json`` (the Hugging Face config), ``hfbridge_jax.json`` (format,
dtypes, quantized parameters) and ``jax_model.safetensors`` (the parameter tree, keys are ``/``-joined paths;
an 8-bit parameter is stored as ``<path>:int8`` and ``<path>:scale``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hfbridge.io import atomic_dir
from hfbridge.jax import tree as tree_lib
from hfbridge.jax.export import LazyTensor, gather
from hfbridge.jax.quant import QuantizedArray
from hfbridge.jax.st_io import iter_tensors, save_tensors

WEIGHTS_NAME = "jax_model.safetensors"
META_NAME = "hfbridge_jax.json"
FORMAT = "hfbridge-jax"
FORMAT_VERSION = 1


def is_jax_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / META_NAME).exists() and (Path(folder) / WEIGHTS_NAME).exists()


def save_checkpoint(folder: str | Path, module: Any, params: dict, overwrite: bool = False) -> Path:
    """Write ``module``'s config and ``params`` (sharded arrays are gathered one at a time) to ``folder``, which
    appears only when complete (weights before the metadata that marks it a checkpoint); a non-empty ``folder`` is
    refused unless ``overwrite`` (and then only one hfbridge wrote)."""
    lora = [p for p in tree_lib.flatten(params) if p.endswith(("/lora_a", "/lora_b"))]
    if lora:
        raise ValueError(f"params carry LoRA factors ({lora[0]}...): merge them first (hfbridge.jax.lora.merge_lora), "
                         "save the adapter (save_lora_adapter), or export merged with format='hf'")
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        _write_checkpoint(tmp, module, params)
    return Path(folder)


def _write_checkpoint(folder: Path, module: Any, params: dict) -> None:
    flat = tree_lib.flatten(params)
    tensors: dict[str, Any] = {}
    quantized: dict[str, int] = {}
    for path, leaf in flat.items():
        if isinstance(leaf, QuantizedArray):
            tensors[f"{path}:int8"] = _lazy(leaf.values)
            tensors[f"{path}:scale"] = _lazy(leaf.scale)
            quantized[path] = leaf.reduce_axis
        else:
            tensors[path] = _lazy(leaf)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_type": module.config.model_type,
        "param_dtype": str(np.dtype(module.param_dtype)),
        "dtype": str(np.dtype(module.dtype)),
        "quantized": quantized,
    }
    save_tensors(folder / WEIGHTS_NAME, tensors, metadata={"format": FORMAT})
    (folder / "config.json").write_text(json.dumps(module.config.hf_config, indent=2, sort_keys=True, default=str))
    (folder / META_NAME).write_text(json.dumps(meta, indent=2))


def _lazy(x: Any) -> LazyTensor:
    """Fetched shard by shard when written, with no host copy left cached on the array."""
    return LazyTensor(tuple(x.shape), np.dtype(x.dtype), lambda: gather(x))


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    if not is_jax_checkpoint(folder):
        hint = " (it holds Hugging Face weights: use from_torch=True)" if list(folder.glob("*.safetensors")) else ""
        raise FileNotFoundError(f"{folder} is not an hfbridge JAX checkpoint: {META_NAME} or {WEIGHTS_NAME} missing{hint}")
    meta = json.loads((folder / META_NAME).read_text())
    if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{folder / META_NAME}: unknown format {meta.get('format')!r} version {meta.get('version')}")
    return meta


def iter_checkpoint_params(folder: str | Path) -> Iterator[tuple[str, Any]]:
    """``(path, array or QuantizedArray)`` for each parameter of an hfbridge JAX checkpoint."""
    folder = Path(folder)
    quantized = read_meta(folder)["quantized"]
    pending: dict[str, dict[str, np.ndarray]] = {}
    for key, array in iter_tensors(folder / WEIGHTS_NAME):
        path, _, part = key.partition(":")
        if not part:
            yield path, array
            continue
        pending.setdefault(path, {})[part] = array
        if len(pending[path]) == 2:
            parts = pending.pop(path)
            yield path, QuantizedArray(parts["int8"], parts["scale"], int(quantized[path]))
    if pending:
        raise ValueError(f"{folder / WEIGHTS_NAME}: incomplete 8-bit parameters {sorted(pending)}")

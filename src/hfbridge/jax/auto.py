"""``AutoJaxModelForCausalLM.from_pretrained``: a Hugging Face causal LM as a (sharded) JAX model and its params."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hfbridge.jax import tree as tree_lib
from hfbridge.jax.checkpoint import is_jax_checkpoint, iter_checkpoint_params, read_meta
from hfbridge.jax.config import config_from_hf, load_hf_config, resolve_dtype, resolve_precision
from hfbridge.jax.convert import assemble_params, iter_hf_params
from hfbridge.jax.mesh import DEFAULT_AXIS_DIMS, DEFAULT_AXIS_NAMES, PartitionAxis, create_mesh, devices_for
from hfbridge.jax.models import model_class_for
from hfbridge.jax.quant import QuantizedArray, param_bytes
from hfbridge.jax.rules import (
    PartitionRules,
    axis_renaming,
    find_spec,
    placement_fn,
    quantized_specs,
    rename_rules,
)


class AutoJaxModelForCausalLM:
    """Loads Hugging Face causal LMs (``SUPPORTED_MODEL_TYPES``: the Llama family, Gemma 1/2/3, Phi-3, GPT-2,
    Mixtral, Qwen3-MoE) as hfbridge JAX models."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        device: Any = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        precision: jax.lax.Precision | str | None = "fastest",
        sharding_axis_dims: Sequence[int] = DEFAULT_AXIS_DIMS,
        sharding_axis_names: Sequence[str] = DEFAULT_AXIS_NAMES,
        partition_axis: PartitionAxis | None = None,
        shard_attention_computation: bool = True,
        input_shape: Sequence[int] = (1, 1),
        shard_fns: Mapping[str | tuple, Callable] | None = None,
        backend: str | None = None,
        config_kwargs: Mapping[str, Any] | None = None,
        auto_shard_params: bool = False,
        partition_rules: PartitionRules | None = None,
        load_in_8bit: bool = False,
        bit_targeted_params: Sequence[str] | None = None,
        verbose_params: bool = False,
        from_torch: bool = True,
        **kwargs: Any,
    ) -> tuple[Any, dict]:
        """Load a causal LM and return ``(module, params)``; see ``docs/jax.md`` for every argument.

        - ``pretrained_model_name_or_path``: a Hugging Face folder (or, with ``from_torch=False``, an hfbridge
          JAX checkpoint folder), a hub id in the local cache, or the embedded ``smollm2-135m-instruct``.
        - ``device``: where parameters are placed when they are not sharded (default ``jax.devices("cpu")[0]``).
        - ``dtype`` / ``param_dtype``: computation and storage dtypes; ``precision``: matmul precision
          (``jax.lax.Precision`` or ``"fastest"``, ``"high"``, ``"highest"``...).
        - ``sharding_axis_dims`` / ``sharding_axis_names``: the mesh (one ``-1`` inferred from the device count
          of ``backend``); ``partition_axis`` names the axes activations use.
        - ``shard_attention_computation``: sharding constraints inside attention (when the params are sharded).
        - ``input_shape``: ``(batch, seq)`` traced once after loading to check model and params agree.
        - ``shard_fns``: ``{param_path: fn}`` placing single parameters; keys are ``"a/b/c"`` paths, EasyDeL's
          flattened tuples ``("model", "layers", "0", ...)`` (a leading ``"params"`` is dropped), dotted paths, or a
          nested dict like the params. A parameter's shard_fn wins over the rules; the others follow the rules
          with ``auto_shard_params`` and are replicated over the mesh without it.
        - ``auto_shard_params``: shard every parameter by ``partition_rules`` (default: the architecture's, written
          for dp/fsdp/tp/sp and renamed by position to custom ``sharding_axis_names``).
        - ``config_kwargs`` (and any other ``**kwargs`` that are config fields): config overrides.
        - ``load_in_8bit``: int8 per-channel storage of the parameters matching ``bit_targeted_params``
          (regexes, default kernels and embeddings).
        - ``verbose_params``: print parameter counts and bytes; ``from_torch``: convert Hugging Face
          safetensors (True) or load hfbridge's own JAX checkpoint (False).
        """
        trust_remote_code = bool(kwargs.pop("trust_remote_code", False))
        folder = _resolve_folder(pretrained_model_name_or_path, trust_remote_code)
        dtype, param_dtype = resolve_dtype(dtype), resolve_dtype(param_dtype)
        precision = resolve_precision(precision)
        renaming = axis_renaming(sharding_axis_names)
        partition_axis = partition_axis or PartitionAxis().renamed(renaming)
        device = device if device is not None else jax.devices("cpu")[0]
        mesh = create_mesh(sharding_axis_dims, sharding_axis_names, devices=devices_for(backend))

        meta = read_meta(folder) if not from_torch else None
        if from_torch and is_jax_checkpoint(folder):
            raise ValueError(f"{folder} is an hfbridge JAX checkpoint, not Hugging Face weights: use from_torch=False")
        hf_config = load_hf_config(folder, _config_overrides(folder, config_kwargs, kwargs))
        config = config_from_hf(hf_config)
        if meta is not None and meta["model_type"] != config.model_type:
            raise ValueError(f"{folder}: checkpoint model_type {meta['model_type']!r} but config says {config.model_type!r}")
        module = model_class_for(config)(
            config=config,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            partition_axis=partition_axis,
            shard_attention_computation=shard_attention_computation,
        )
        expected = module.param_shapes()
        if partition_rules is not None:
            rules = tuple(partition_rules)
        else:
            rules = rename_rules(module.default_partition_rules(), renaming)
        shard_fns = _normalise_shard_fns(shard_fns, expected)
        if auto_shard_params:
            for path in tree_lib.flatten(expected):
                if path not in shard_fns:
                    find_spec(path, rules)  # fail before reading any weight
        sharded = auto_shard_params or bool(shard_fns)
        place = _placer(mesh, rules, shard_fns, auto_shard_params, sharded, device)

        entries = iter_hf_params(folder, config) if from_torch else iter_checkpoint_params(folder)
        params = assemble_params(
            entries, expected, param_dtype, place,
            load_in_8bit=load_in_8bit, bit_targeted_params=bit_targeted_params, source=str(folder),
        )
        if sharded:
            module = module.replace(mesh=mesh)
        module.trace(params, tuple(input_shape))
        if verbose_params:
            _print_params(module, params, folder)
        return module, params


def _resolve_folder(name: str | os.PathLike, trust_remote_code: bool) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from hfbridge.models.loading import resolve_model_path

    return Path(resolve_model_path(name, trust_remote_code=trust_remote_code))


def _config_overrides(folder: Path, config_kwargs: Mapping[str, Any] | None, kwargs: dict) -> dict:
    """``config_kwargs`` plus those ``**kwargs`` that name config fields; any other keyword is an error."""
    if kwargs:
        base = load_hf_config(folder)
        unknown = sorted(k for k in kwargs if not hasattr(base, k))
        if unknown:
            raise TypeError(
                f"from_pretrained() got unexpected keyword argument(s) {unknown}: they are neither arguments nor "
                f"fields of the {type(base).__name__}"
            )
    return {**kwargs, **dict(config_kwargs or {})}


def _normalise_shard_fns(shard_fns: Mapping | None, expected: dict) -> dict[str, Callable]:
    """``shard_fns`` as ``{path: fn}``; accepts ``"a/b/c"`` paths, EasyDeL's tuple keys (``flatten_dict`` of the
    params, with or without a leading ``"params"``), dotted paths, and nested dicts. Unknown paths are an error."""
    if not shard_fns:
        return {}
    known = tree_lib.flatten(expected)
    flat: dict[str, Callable] = {}
    for key, fn in _flat_items(shard_fns):
        parts = [str(p) for p in key] if isinstance(key, tuple) else str(key).replace(".", "/").split("/")
        if parts and parts[0] == "params" and "/".join(parts) not in known:
            parts = parts[1:]
        flat["/".join(parts)] = fn
    unknown = sorted(p for p in flat if p not in known)
    if unknown:
        raise ValueError(f"shard_fns name parameters the model does not have: {unknown[:5]} (paths look like {next(iter(known))!r})")
    bad = [p for p, fn in flat.items() if not callable(fn)]
    if bad:
        raise TypeError(f"shard_fns values must be callables; not for {bad[:5]}")
    return flat


def _flat_items(tree: Mapping, prefix: tuple = ()) -> list[tuple[Any, Any]]:
    """``(key, fn)`` pairs: nested dicts flattened to tuples of keys; tuple and string keys kept as given."""
    items = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            items.extend(_flat_items(value, prefix + (tuple(key) if isinstance(key, tuple) else (key,))))
        elif prefix:
            items.append((prefix + (tuple(key) if isinstance(key, tuple) else (key,)), value))
        else:
            items.append((key, value))
    return items


def _placer(
    mesh: Mesh, rules: PartitionRules, shard_fns: dict, auto: bool, sharded: bool, device: Any
) -> Callable[[str, Any], Any]:
    replicated = NamedSharding(mesh, P())

    def place(path: str, value: Any) -> Any:
        if path in shard_fns:
            return _apply_custom(shard_fns[path], value, mesh)
        if auto:
            return placement_fn(mesh, find_spec(path, rules))(value)
        return jax.device_put(value, replicated if sharded else device)

    return place


def _apply_custom(fn: Callable, value: Any, mesh: Mesh) -> Any:
    """A user shard function applied to an array, or to the int8 values of a quantized one (scales follow)."""
    if not isinstance(value, QuantizedArray):
        return fn(value)
    values = fn(value.values)
    sharding = values.sharding
    if isinstance(sharding, NamedSharding):
        _, scale_spec = quantized_specs(sharding.spec, value, sharding.mesh)
        scale = jax.device_put(value.scale, NamedSharding(sharding.mesh, scale_spec))
    else:
        scale = jax.device_put(value.scale, sharding)
    return QuantizedArray(values, scale, value.reduce_axis)


def _print_params(module: Any, params: dict, folder: Path) -> None:
    flat = tree_lib.flatten(params)
    total = module.num_params(params)
    embed = sum(int(jnp.size(v.values if isinstance(v, QuantizedArray) else v)) for p, v in flat.items() if "embed" in p)
    quantized = sum(isinstance(v, QuantizedArray) for v in flat.values())
    print(
        f"hfbridge.jax: {module.config.model_type} from {folder}: {total:,} parameters "
        f"({total - embed:,} without embeddings) in {len(flat)} tensors, {param_bytes(params) / 2**20:.1f} MiB, "
        f"{quantized} of them 8-bit"
    )


# The seed's name (EasyDeL's), for code written against it: the same class, the same arguments and return value.
AutoEasyDeLModelForCausalLM = AutoJaxModelForCausalLM

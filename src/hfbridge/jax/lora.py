"""LoRA for the JAX models: low-rank factors beside chosen kernels, trained alone, merged or saved for PEFT.

:func:`add_lora` adds ``lora_a`` ``(in, r)`` and ``lora_b`` ``(r, out)`` next to each selected ``kernel`` (the
module computes ``x W + (x A B) * alpha / r``); :func:`lora_optimizer` wraps an optax optimizer so only the
factors move (the frozen weights get zero updates, and XLA drops their unused gradients);
:func:`merge_lora` folds the factors into the kernels; :func:`save_lora_adapter` writes a PEFT adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads onto the
transformers model. ``save_pretrained(..., format="hf")`` merges on the fly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hfbridge.io import atomic_dir
from hfbridge.jax import tree as tree_lib
from hfbridge.jax.quant import QuantizedArray
from hfbridge.jax.st_io import save_tensors

LORA_LEAVES = ("lora_a", "lora_b")
DEFAULT_TARGETS = (r"self_attn/(q_proj|v_proj)$",)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _targets(params: dict, target_modules: Sequence[str]) -> list[str]:
    """Module paths (``model/layers/0/self_attn/q_proj``) whose 2-D ``kernel`` matches one of the regexes."""
    flat = tree_lib.flatten(params)
    found = []
    for path, leaf in flat.items():
        if not path.endswith("/kernel"):
            continue
        module_path = path[: -len("/kernel")]
        if any(re.search(t, module_path) for t in target_modules):
            if len(leaf.shape) != 2:
                raise ValueError(f"LoRA target {module_path!r} has a {len(leaf.shape)}-D kernel; only 2-D projections "
                                 "take LoRA factors (stacked experts do not)")
            found.append(module_path)
    if not found:
        examples = [p[: -len("/kernel")] for p in flat if p.endswith("/kernel")][:4]
        raise ValueError(f"LoRA target_modules {list(target_modules)} match no projection; module paths look like {examples}")
    return found


def _placed_like(value: jax.Array, kernel: Any, dims: tuple[int | None, int | None]) -> jax.Array:
    """``value`` on the kernel's mesh, dimension ``i`` sharded like the kernel's dimension ``dims[i]``."""
    sharding = getattr(kernel.values if isinstance(kernel, QuantizedArray) else kernel, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = list(sharding.spec) + [None] * 2
        return jax.device_put(value, NamedSharding(sharding.mesh, P(*(None if d is None else spec[d] for d in dims))))
    if sharding is not None:
        return jax.device_put(value, sharding)
    return value


def add_lora(
    module: Any, params: dict, r: int = 8, alpha: float = 16.0, target_modules: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
) -> tuple[Any, dict]:
    """``(module, params)`` with LoRA factors on every projection whose module path matches a ``target_modules``
    regex (``re.search``; e.g. ``r"self_attn/(q|k|v|o)_proj$"``, ``r"mlp/"``). ``lora_a`` is drawn as PEFT does
    (uniform in ``±1/sqrt(in)``), ``lora_b`` is zero, so the model starts unchanged; the module carries
    ``lora_scaling = alpha / r``. Factors are placed on the kernel's mesh (``a`` like its input dimension, ``b``
    like its output dimension)."""
    if int(r) != r or r < 1:
        raise ValueError(f"add_lora(r={r!r}): the rank must be a positive integer")
    if any(leaf in p for p in tree_lib.flatten(params) for leaf in LORA_LEAVES):
        raise ValueError("params already carry LoRA factors; merge_lora first to add new ones")
    targets = _targets(params, target_modules)
    flat = dict(tree_lib.flatten(params))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(targets))
    for key, module_path in zip(keys, targets):
        kernel = flat[f"{module_path}/kernel"]
        n_in, n_out = kernel.shape
        dtype = kernel.values.dtype if isinstance(kernel, QuantizedArray) else kernel.dtype
        dtype = jnp.float32 if isinstance(kernel, QuantizedArray) else dtype
        bound = 1.0 / np.sqrt(n_in)
        a = jax.random.uniform(key, (n_in, int(r)), jnp.float32, -bound, bound).astype(dtype)
        flat[f"{module_path}/lora_a"] = _placed_like(a, kernel, (0, None))
        flat[f"{module_path}/lora_b"] = _placed_like(jnp.zeros((int(r), n_out), dtype), kernel, (None, 1))
    return module.replace(lora_scaling=float(alpha) / int(r)), tree_lib.unflatten(flat)


def lora_trainable_mask(params: dict) -> dict:
    """A tree like ``params``: True for LoRA factors, False for everything else."""
    return tree_lib.map_with_path(lambda path, _: path.rsplit("/", 1)[-1] in LORA_LEAVES, params)


def lora_optimizer(optimizer: Any, params: dict) -> Any:
    """``optimizer`` applied to the LoRA factors only; every other parameter gets a zero update (and no state)."""
    import optax

    mask = lora_trainable_mask(params)
    if not any(jax.tree.leaves(mask)):
        raise ValueError("params carry no LoRA factors; call add_lora first")
    labels = jax.tree.map(lambda trained: "lora" if trained else "frozen", mask)
    return optax.multi_transform({"lora": optimizer, "frozen": optax.set_to_zero()}, labels)


def lora_modules(params: dict) -> list[str]:
    return [p[: -len("/lora_a")] for p in tree_lib.flatten(params) if p.endswith("/lora_a")]


def merge_lora(module: Any, params: dict) -> tuple[Any, dict]:
    """``(module, params)`` with ``kernel += lora_a @ lora_b * lora_scaling`` and the factors removed (each merged
    kernel keeps its sharding)."""
    flat = dict(tree_lib.flatten(params))
    modules = lora_modules(params)
    if not modules:
        raise ValueError("params carry no LoRA factors to merge")
    scaling = float(module.lora_scaling)
    for module_path in modules:
        a, b = flat.pop(f"{module_path}/lora_a"), flat.pop(f"{module_path}/lora_b")
        kernel = flat[f"{module_path}/kernel"]
        if isinstance(kernel, QuantizedArray):
            raise ValueError(f"{module_path}: cannot merge LoRA into an 8-bit kernel; load without load_in_8bit")
        merged = (kernel.astype(jnp.float32) + (a.astype(jnp.float32) @ b.astype(jnp.float32)) * scaling).astype(kernel.dtype)
        flat[f"{module_path}/kernel"] = jax.device_put(merged, kernel.sharding)
    return module.replace(lora_scaling=1.0), tree_lib.unflatten(flat)


def save_lora_adapter(
    path: str | Path, module: Any, params: dict, base_model_name_or_path: str | None = None, overwrite: bool = False
) -> Path:
    """Write the LoRA factors as a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors`` with
    ``lora_A.weight`` ``(r, in)`` and ``lora_B.weight`` ``(out, r)``) for the transformers model of the same
    checkpoint. Families whose Hugging Face modules differ from the JAX ones (Phi-3's fused projections, GPT-2's
    ``Conv1D``) are refused: export them merged with ``save_pretrained(..., format="hf")``."""
    if module.config.model_type in ("phi3", "gpt2"):
        raise ValueError(
            f"{module.config.model_type}: its Hugging Face projections are fused or Conv1D, so a PEFT adapter would "
            "not address the same modules; use save_pretrained(path, params, format='hf') for a merged model"
        )
    modules = lora_modules(params)
    if not modules:
        raise ValueError("params carry no LoRA factors to save")
    flat = tree_lib.flatten(params)
    rank = int(flat[f"{modules[0]}/lora_a"].shape[1])
    tensors: dict[str, Any] = {}
    for module_path in modules:
        name = "base_model.model." + module_path.replace("/", ".")
        a, b = flat[f"{module_path}/lora_a"], flat[f"{module_path}/lora_b"]
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a).T)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b).T)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": float(module.lora_scaling) * rank,
        "lora_dropout": 0.0,
        "target_modules": [m.replace("/", ".") for m in modules],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_tensors(tmp / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return Path(path)

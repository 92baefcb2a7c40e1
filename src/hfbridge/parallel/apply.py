"""The one place where parallelism is applied to a model: tensor/sequence parallel, then FSDP2, in that order.

:func:`parallelize_model` is what ``HFAutoModelForCausalLM._parallelize`` calls when a device mesh is given:

1. checks (4-bit weights, adapters with tensor parallelism, heads divisible by ``tp * sp``);
2. tensor parallelism over the ``tp * sp`` ranks from the plan (:mod:`hfbridge.parallel.plans`), with sequence
   parallelism for norms and activations when ``sp > 1``; tied input/output embeddings are tied again after;
3. activation checkpointing of each decoder block, when asked;
4. FSDP2 ``fully_shard`` on each decoder block, then on the root, over the ``(dp, fsdp)`` mesh: hybrid sharding
   (replicated over ``dp``, sharded over ``fsdp``) with a ``MixedPrecisionPolicy`` and optional CPU offload.

A model still on the meta device (see :mod:`hfbridge.parallel.materialize`) is parallelized there, then each rank
allocates and loads only its shards.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hfbridge.models import loading
from hfbridge.parallel import plans
from hfbridge.parallel.mesh import MeshLayout, ParallelConfig, mesh_layout
from hfbridge.peft import is_peft_model, is_quantized

log = logging.getLogger(__name__)


class UnsupportedParallelismError(ValueError):
    """A combination of model and parallelism hfbridge does not support; the message says what to use instead."""


def parallelize_model(model: nn.Module, mesh, config: ParallelConfig | None = None) -> nn.Module:
    """Apply tensor/sequence parallelism, activation checkpointing and FSDP2 to ``model`` over ``mesh``."""
    config = config or ParallelConfig()
    layout = mesh_layout(mesh)
    check_supported(model, layout)
    if layout.model is not None:
        apply_tensor_parallel(model, layout, config)
    if config.activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, layout, config)
    model._hfbridge_mesh_sizes = dict(layout.sizes)
    return model


def check_supported(model: nn.Module, layout: MeshLayout) -> None:
    world = layout.data_parallel_size * layout.model_parallel_size
    if is_quantized(model) and world > 1:
        raise UnsupportedParallelismError(
            "4-bit/8-bit (bitsandbytes) weights cannot be sharded: FSDP2 and tensor parallelism need plain "
            "floating-point parameters. Train QLoRA on one device, or without load_in_4bit on several"
        )
    if layout.model is not None and is_peft_model(model):
        raise UnsupportedParallelismError(
            "tensor/sequence parallelism (tp*sp > 1) with an adapter (LoRA, ...) is not supported: peft wraps the "
            "layers the plan splits. Use fsdp/dp for adapters (e.g. sharding_axis_dims=(1,-1,1,1)), or full "
            "fine-tuning with tensor parallelism"
        )
    if layout.model is not None:
        plans.check_divisibility(getattr(model, "config", None), layout.model_parallel_size)


def _tied_groups(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Parameters shared by several modules (tied embeddings), as ``[(module, attribute), ...]`` groups."""
    seen: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            seen.setdefault(id(param), []).append((module, attr))
    return [group for group in seen.values() if len(group) > 1]


def apply_tensor_parallel(model: nn.Module, layout: MeshLayout, config: ParallelConfig) -> dict[str, Any]:
    """Split the planned modules over the model-parallel mesh; returns the plan used."""
    from torch.distributed.tensor.parallel import parallelize_module

    plan, source = plans.resolve_plan(model, config.partition_rules)
    styles = plans.parallel_styles(model, plan, layout.sequence_parallel)
    tied = _tied_groups(model)
    log.info("tensor parallel over %d ranks%s from %s", layout.model_parallel_size,
             " with sequence parallel" if layout.sequence_parallel else "", source)
    parallelize_module(model, layout.model, styles)
    for group in tied:  # parallelize_module replaced each module's parameter; share the first again
        first_module, first_attr = group[0]
        shared = getattr(first_module, first_attr)
        for module, attr in group[1:]:
            other = getattr(module, attr)
            if getattr(other, "placements", None) != getattr(shared, "placements", None):
                raise plans.PlanError(
                    f"tied parameters ({first_attr} of {type(first_module).__name__} and {attr} of "
                    f"{type(module).__name__}) were given different tensor-parallel placements "
                    f"({getattr(shared, 'placements', None)} vs {getattr(other, 'placements', None)}); plan them alike"
                )
            setattr(module, attr, shared)
    return plan


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: classes its ``_no_split_modules`` name, else the longest ``ModuleList``."""
    base = model.get_base_model() if is_peft_model(model) else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in the backward pass (the same mechanism as the module's own
    ``activation_checkpointing=True``: transformers' non-reentrant checkpointing, inside FSDP2's block)."""
    from hfbridge.models.speed import enable_activation_checkpointing

    enable_activation_checkpointing(model)


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in loading._DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use {', '.join(sorted(loading._DTYPES))}")
    return loading._DTYPES[value]


def apply_fsdp(model: nn.Module, layout: MeshLayout, config: ParallelConfig) -> None:
    """FSDP2 on every decoder block and on the root, over ``(dp, fsdp)`` (hybrid when both are > 1)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if layout.sizes["dp"] > 1:
        mesh = layout.data  # 2-D: replicate over dp, shard over fsdp
    elif layout.data.ndim == 2:
        mesh = layout.data["fsdp"]
    else:
        mesh = layout.data
    mp_policy = MixedPrecisionPolicy(param_dtype=_dtype(config.param_dtype), reduce_dtype=_dtype(config.reduce_dtype))
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if config.cpu_offload else OffloadPolicy()
    kwargs = {"mesh": mesh, "mp_policy": mp_policy, "offload_policy": offload}
    for block in decoder_blocks(model):
        fully_shard(block, reshard_after_forward=config.reshard_after_forward, **kwargs)
    # The root reshards too: a forward without a backward (a no-grad probe, evaluation) must not leave unsharded
    # parameters registered, or an optimizer built afterwards would hold the wrong tensors.
    fully_shard(model, reshard_after_forward=config.reshard_after_forward, **kwargs)

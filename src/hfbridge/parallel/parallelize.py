"""The one place where a model is made ready to train fast and spread out, in torchtitan's order.

:func:`parallelize_model` is what the model modules call (through their plan, :mod:`hfbridge.parallel.mesh_plan`) from
``configure_model``:

1. checks (4-bit weights only with an adapter over ``dp``/``fsdp``, adapters with sequence parallelism, heads
   divisible by ``tp * sp``);
   with ``cp > 1``, context parallelism's attention (:mod:`hfbridge.parallel.context`, the model checked first);
2. tensor parallelism over the ``tp * sp`` ranks from the plan (:mod:`hfbridge.parallel.plans`), with sequence
   parallelism for norms and activations when ``sp > 1``; tied input/output embeddings are tied again after;
3. activation checkpointing of the decoder blocks (every block, selective, or every k-th), when asked;
4. ``torch.compile`` of each decoder block (regional compilation), when asked;
5. FSDP2 ``fully_shard`` on each decoder block, then on the root (4-bit weights left whole on every rank), over the
   ``(dp, fsdp)`` mesh (``fsdp x cp`` with context parallelism): hybrid sharding (replicated over ``dp``, sharded
   over ``fsdp``) with a ``MixedPrecisionPolicy`` and optional CPU offload.

Without a mesh (one process) only 3 and 4 apply. A model still on the meta device (see
:mod:`hfbridge.parallel.materialize`) is parallelized there, then each rank allocates and loads only its shards.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hfbridge.models import loading
from hfbridge.models.hooks import CheckpointingMode, check_checkpointing_mode
from hfbridge.models.peft_adapters import base_model, is_peft_model, is_quantized
from hfbridge.parallel import plans
from hfbridge.parallel.context import ContextParallel
from hfbridge.parallel.mesh import MeshLayout, ParallelConfig, mesh_layout

log = logging.getLogger(__name__)


class UnsupportedParallelismError(ValueError):
    """A combination of model and parallelism hfbridge does not support; the message says what to use instead."""


def parallelize_model(model: nn.Module, mesh=None, config: ParallelConfig | None = None,
                      activation_checkpointing: CheckpointingMode = False, compile: bool = False) -> nn.Module:
    """Apply tensor/sequence parallelism, activation checkpointing, ``torch.compile`` and FSDP2 to ``model``, in
    that order, over ``mesh`` (``None``: one process, checkpointing and compile only). Checkpointing is on when
    ``activation_checkpointing`` or ``config.activation_checkpointing`` asks for it."""
    config = config or ParallelConfig()
    layout = mesh_layout(mesh) if mesh is not None else None
    if layout is not None:
        check_supported(model, layout)
        if layout.context is not None:  # cp: attention gathers the keys and values of the split sequence
            ContextParallel(layout.context).attach(base_model(model))
        if layout.model is not None:
            apply_tensor_parallel(model, layout, config)
    mode = check_checkpointing_mode(activation_checkpointing) or config.activation_checkpointing
    if mode:
        enable_activation_checkpointing(model, mode)
    if compile:
        compile_layers(model)
    if layout is not None:
        apply_fsdp(model, layout, config)
    return model


QUANTIZED_NOT_SPLIT = (
    "bitsandbytes packs each 4-bit weight into a flat byte buffer with per-block scales (its quant_state), which "
    "cannot be split into rows or columns. QLoRA trains over fsdp/dp (the 4-bit base replicated on every rank, the "
    "adapter and its optimizer state sharded)"
)


def check_supported(model: nn.Module, layout: MeshLayout) -> None:
    world = layout.data_parallel_size * layout.model_parallel_size
    if is_quantized(model) and world > 1:
        if getattr(base_model(model), "is_loaded_in_8bit", False):
            raise UnsupportedParallelismError(
                "8-bit (bitsandbytes LLM.int8) weights on a device mesh are not supported: only 4-bit NF4 (QLoRA) "
                "is, with fsdp/dp. Use load_in_4bit, or train 8-bit on one device"
            )
        if layout.model is not None:
            raise UnsupportedParallelismError(
                f"4-bit weights with tensor/sequence parallelism (tp*sp > 1) are not supported: {QUANTIZED_NOT_SPLIT}, "
                "e.g. sharding_axis_dims=(1,-1,1,1)"
            )
        if not is_peft_model(model):
            raise UnsupportedParallelismError(
                "4-bit weights are frozen: on a device mesh a 4-bit model trains an adapter (QLoRA), e.g. "
                "model_transform=LoRA(...)"
            )
    if layout.model is not None and is_peft_model(model) and layout.sequence_parallel:
        raise UnsupportedParallelismError(
            "sequence parallelism (sp > 1) with an adapter (LoRA, ...) is not supported: the adapter's output "
            "would have to be split over the sequence like the row-wise layer it adds to. Use tp for LoRA (e.g. "
            "sharding_axis_dims=(1,-1,2,1)), or full fine-tuning with sp"
        )
    if layout.model is not None:
        plans.check_divisibility(getattr(model, "config", None), layout.model_parallel_size)


# ------------------------------------------------------------------------------------------- tensor parallelism
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

    target = base_model(model)  # with an adapter: the model peft wrapped, its LoRA layers split like their base
    plan, source = plans.resolve_plan(target, config.partition_rules)
    if is_peft_model(model):
        plan = plans.adapter_plan(target, plan)
    styles = plans.parallel_styles(target, plan, layout.sequence_parallel)
    tied = _tied_groups(model)
    log.info("tensor parallel over %d ranks%s from %s", layout.model_parallel_size,
             " with sequence parallel" if layout.sequence_parallel else "", source)
    parallelize_module(target, layout.model, styles)
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
    names = set(getattr(base_model(model), "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


# ------------------------------------------------------------------------------------------- checkpointing, compile
def enable_activation_checkpointing(model: nn.Module, mode: CheckpointingMode = True) -> None:
    """Recompute decoder layers' activations in backward (transformers' non-reentrant checkpointing; on a mesh,
    inside FSDP2's block).

    ``mode``: ``True`` / ``"full"`` checkpoints every layer (keeps only each layer's input); ``"selective"`` every
    layer, but keeps the outputs of matrix products and attention, so only the cheap pointwise ops (norms,
    activations, rotary, residual adds) are recomputed; an int ``k`` checkpoints every k-th layer in full.
    """
    mode = check_checkpointing_mode(mode)
    if mode is False:
        return
    base = base_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False) or not hasattr(base, "gradient_checkpointing_enable"):
        raise ValueError(f"activation_checkpointing={mode!r}, but {type(base).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _selective_context
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not isinstance(mode, bool) and isinstance(mode, int):  # every k-th layer (k > 1 after the check)
        for i, layer in enumerate(_checkpointing_layers(base)):
            layer.gradient_checkpointing = i % mode == 0
    if is_peft_model(model) and hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()  # frozen embeddings: the checkpointed layers still get inputs with grad
    if getattr(base, "config", None) is not None:
        base.config.use_cache = False


def _checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    """transformers' decoder layers (the modules its checkpointing and regional compilation apply to)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _save_matmuls_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_matmuls_policy)


def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "linear", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


_SAVED_OPS = _saved_ops()


def compile_layers(model: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` each decoder layer in place (regional compilation: one layer's code serves them all,
    and shapes are dynamic, since packed rows vary in length); a model without recognisable layers is compiled
    whole. Returns the number of layers compiled."""
    compile_kwargs.setdefault("dynamic", True)
    layers = _checkpointing_layers(model)
    if not layers:
        model.compile(**compile_kwargs)
        return 0
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)


# ------------------------------------------------------------------------------------------- FSDP2
def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in loading._DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use {', '.join(sorted(loading._DTYPES))}")
    return loading._DTYPES[value]


def quantized_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The packed 4-bit (bitsandbytes ``Params4bit``) weights of ``model``: frozen, replicated, never sharded."""
    return {p for p in model.parameters() if type(p).__name__ == "Params4bit"}


def broadcast_trainable_from_rank0(model: nn.Module, group=None) -> None:
    """Give every rank rank 0's trainable weights (an adapter each rank initialised itself), before sharding."""
    src = torch.distributed.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                torch.distributed.broadcast(p.data, src=src, group=group)


def apply_fsdp(model: nn.Module, layout: MeshLayout, config: ParallelConfig) -> None:
    """FSDP2 on every decoder block and on the root, over ``(dp, fsdp)`` (hybrid when both are > 1)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if layout.sizes["dp"] > 1:
        mesh = layout.data  # 2-D: replicate over dp, shard over fsdp
    elif layout.data.ndim == 2:
        mesh = layout.data[layout.data.mesh_dim_names[-1]]  # fsdp (fsdp_cp with context parallelism)
    else:
        mesh = layout.data
    mp_policy = MixedPrecisionPolicy(param_dtype=_dtype(config.param_dtype), reduce_dtype=_dtype(config.reduce_dtype))
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if config.cpu_offload else OffloadPolicy()
    kwargs = {"mesh": mesh, "mp_policy": mp_policy, "offload_policy": offload}
    if is_quantized(model):  # QLoRA: the packed 4-bit weights stay whole on every rank; the rest is sharded
        kwargs["ignored_params"] = quantized_parameters(model)
        broadcast_trainable_from_rank0(model, layout.data_flat.get_group())
    for block in decoder_blocks(model):
        fully_shard(block, reshard_after_forward=config.reshard_after_forward, **kwargs)
    # The root reshards too: a forward without a backward (a no-grad probe, evaluation) must not leave unsharded
    # parameters registered, or an optimizer built afterwards would hold the wrong tensors.
    fully_shard(model, reshard_after_forward=config.reshard_after_forward, **kwargs)

"""Build a model without its weights, parallelize it, then let each rank load only its own shards.

No rank holds the whole model when it does not have to:

* :func:`skeleton` builds the architecture on the meta device (parameters take no memory; buffers such as
  rotary frequencies are real, they are computed, not loaded);
* the model is parallelized there (:func:`hfbridge.parallel.parallelize.parallelize_model`);
* :func:`materialize` allocates each rank's shards and fills them: straight from the safetensors files, each
  rank reading only its slices (``torch.distributed.checkpoint.HuggingFaceStorageReader``), or, when the
  weights are not all in the files (random init, or a transform such as LoRA that adds initialised weights),
  rank 0 builds the full model once and broadcasts it shard by shard.

4-bit (bitsandbytes NF4) models are the exception: their packed weights are quantized while they load, so every
rank loads the (small) 4-bit model whole and keeps its frozen base replicated; FSDP2 then shards only the
floating-point parameters (the adapter, norms, embeddings, head) and the adapter's optimizer state
(:func:`quantized_replica`, :func:`hfbridge.parallel.parallelize.apply_fsdp`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfbridge.models import loading
from hfbridge.parallel.parallelize import UnsupportedParallelismError

log = logging.getLogger(__name__)


@dataclass
class WeightSource:
    """Where a skeleton's weights come from, and how the full model would be built (for the broadcast path)."""

    path: Path
    load_pretrained_weights: bool
    dtype: torch.dtype
    attn_implementation: str | None
    trust_remote_code: bool
    transform: Callable | None = None
    auto_class: Any = None
    rng_state: torch.Tensor | None = None  # the random state when the skeleton was built (the transform draws from it)
    load_in_4bit: bool = False  # bitsandbytes NF4: the model is loaded whole, quantized (:func:`load_quantized`)


def skeleton_for(module, auto_class=None, model_name=None) -> nn.Module:
    """The meta-device skeleton of an ``HFAutoModelForCausalLM``'s model, remembering where its weights are (a 4-bit
    model: the whole quantized model, see :func:`quantized_replica`)."""
    name = module.model_name if model_name is None else model_name
    source = WeightSource(
        path=loading.resolve_model_path(name, module.trust_remote_code),
        load_pretrained_weights=module.load_pretrained_weights,
        dtype=loading.resolve_dtype(module.default_dtype),
        attn_implementation=module.attn_implementation,
        trust_remote_code=module.trust_remote_code,
        transform=module.model_transform,
        auto_class=auto_class,
        rng_state=torch.get_rng_state(),
        load_in_4bit=module.load_in_4bit,
    )
    return quantized_replica(source) if source.load_in_4bit else skeleton(source)


def quantized_replica(source: WeightSource) -> nn.Module:
    """The 4-bit model of ``source``, loaded whole on this rank (on its own device), with every rank's random state
    set to rank 0's, so that the adapter a transform adds next is drawn alike on every rank, as one process would
    draw it (:func:`hfbridge.parallel.parallelize.apply_fsdp` also broadcasts the trainable weights from rank 0)."""
    if not source.load_pretrained_weights:
        raise UnsupportedParallelismError("load_in_4bit needs pretrained weights (load_pretrained_weights=True)")
    model = load_quantized(source)
    model._hfbridge_weight_source = source  # how the gathered copy is rebuilt (hfbridge.parallel.export)
    if torch.distributed.is_initialized():
        state = [torch.get_rng_state()]
        torch.distributed.broadcast_object_list(state, src=0)
        torch.set_rng_state(state[0])
    return model


def load_quantized(source: WeightSource) -> nn.Module:
    """The 4-bit model of ``source``, whole, on this rank's device (no collective: one rank may call it alone)."""
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    return loading.load_pretrained_model(
        source.path, auto_class=source.auto_class, dtype=source.dtype, attn_implementation=source.attn_implementation,
        load_in_4bit=True, trust_remote_code=source.trust_remote_code, device_map={"": device},
    )


def skeleton(source: WeightSource) -> nn.Module:
    """The model of ``source`` on the meta device (buffers real), ready to be parallelized."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = loading.load_config(source.path, source.trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = loading._from_config_with_attention_fallback(
            source.auto_class or AutoModelForCausalLM, config, source.attn_implementation, dtype=source.dtype,
            trust_remote_code=source.trust_remote_code,
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # init_empty_weights re-registers parameters, which unties them
    model._hfbridge_weight_source = source
    return model


def is_skeleton(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _build_full(source: WeightSource) -> dict[str, torch.Tensor]:
    """Rank 0's full state dict: load (or random-init) and transform exactly as one process would."""
    model = loading.load_pretrained_model(
        source.path, auto_class=source.auto_class, load_pretrained_weights=source.load_pretrained_weights,
        dtype=source.dtype,
        attn_implementation=source.attn_implementation, trust_remote_code=source.trust_remote_code,
    )
    if source.transform is not None:
        result = source.transform(model)
        model = model if result is None else result
    return model.state_dict()


def materialize(model: nn.Module, mesh=None) -> str:
    """Allocate this rank's shards of a parallelized skeleton and fill them; returns how (``"sharded"`` or
    ``"broadcast"``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    source: WeightSource = model._hfbridge_weight_source
    device = torch.device("cpu")
    if mesh is not None and mesh.device_type != "cpu":
        device = torch.device(mesh.device_type, torch.accelerator.current_device_index())
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    if source.load_pretrained_weights and source.transform is None and _has_safetensors(source.path):
        if load_shards_from_safetensors(model, source.path):
            return "sharded"
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    full = {}
    if rank == 0:  # draw random initial weights (LoRA's, a random init) as one process would have
        if source.rng_state is not None:
            torch.set_rng_state(source.rng_state)
        full = _build_full(source)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if torch.distributed.is_initialized():  # and leave every rank where that one process would be
        state = [torch.get_rng_state()]
        torch.distributed.broadcast_object_list(state, src=0)
        torch.set_rng_state(state[0])
    return "broadcast"


def _has_safetensors(path: Path) -> bool:
    return any(Path(path).glob("*.safetensors"))


def load_shards_from_safetensors(model: nn.Module, path: str | Path) -> bool:
    """Each rank reads its slices of every weight from the model folder's safetensors files. Keys are matched
    through transformers' checkpoint renamings (vision-language families store ``vision_tower.*`` for the module's
    ``model.vision_tower.*``, ...). Returns False, having loaded nothing, when some weight of the model has no
    one-to-one counterpart in the files (weights merged or split on load): the caller then broadcasts from rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reader = dcp.HuggingFaceStorageReader(str(path))
    in_files = set(reader.read_metadata().state_dict_metadata)
    state = get_model_state_dict(model)
    file_key = _file_keys(model, in_files, state)
    buffers = {name for name, _ in model.named_buffers()}
    twins: dict[int, list[str]] = {}  # tied weights (lm_head = embed_tokens) are one parameter under two names
    for name, param in model.named_parameters(remove_duplicate=False):
        twins.setdefault(id(param), []).append(name)
    loaded_through = {name: names for names in twins.values() for name in names}
    wanted = {file_key[key]: value for key, value in state.items() if key in file_key}
    for key in state:
        if key in file_key or key in buffers:
            continue
        if any(twin in file_key for twin in loaded_through.get(key, ())):
            continue
        log.info("weight %r of the model has no one-to-one counterpart in the safetensors files of %s: rank 0 "
                 "loads the model and broadcasts it", key, path)
        return False
    dcp.load(wanted, storage_reader=reader)
    return True


def _file_keys(model: nn.Module, in_files: set[str], state: dict) -> dict[str, str]:
    """The model's state-dict key of each safetensors key, renamed as ``from_pretrained`` would (keys that a
    converter merges or splits are left out)."""
    mapping = {key: key for key in in_files if key in state}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        conversions = get_model_conversion_mapping(model)
    except Exception:  # an older transformers, or a model it has no mapping for
        return mapping
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = dict.fromkeys(state)
    for key in in_files:
        if key in mapping:
            continue
        renamed, pattern = rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None),
                                             meta)
        if pattern is None and renamed in state:
            mapping[renamed] = key
    return mapping

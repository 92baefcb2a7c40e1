"""From sharded weights to one Hugging Face folder: from a running job, or from a checkpoint, any layout.

* :func:`gather_plain_model`: every rank takes part in gathering the full weights; rank 0 gets an ordinary
  (unsharded) copy of the model, which ``HFAutoModelForCausalLM.save_pretrained`` then saves as usual (adapter
  alone, merged, or the full model). A 4-bit (QLoRA) model is rebuilt as it was trained: rank 0 loads the packed
  4-bit model whole, as every rank did, applies the same transform and takes only the gathered trainable weights
  (the adapter); the 4-bit base is never cast or dequantized.
* :func:`export_hf`: one process, no process group: a ``step-N`` checkpoint (sharded over fsdp, tp, both, any
  number of ranks) into a safetensors folder plain transformers loads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from hfbridge.models import loading
from hfbridge.models.peft_adapters import is_quantized
from hfbridge.parallel import checkpoint as ckpt
from hfbridge.parallel.materialize import load_quantized, skeleton

log = logging.getLogger(__name__)

STATE_PREFIX = "state_dict."  # the DCP key of the model state in a checkpoint


def _plain_skeleton(module) -> nn.Module:
    """An unsharded meta-device model with the same structure (and transform) as ``module.model``; for a 4-bit
    model, the 4-bit model itself (loaded whole, on this rank's device), transformed."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    source = getattr(module.model, "_hfbridge_weight_source", None)
    with torch.random.fork_rng():  # building a skeleton must not move the training's random state
        if source is not None:
            model = load_quantized(source) if source.load_in_4bit else skeleton(source)
            if source.transform is not None:
                result = source.transform(model)
                model = model if result is None else result
            return model
        config = getattr(module.model, "config", None)
        if config is None or hasattr(module.model, "peft_config"):
            raise NotImplementedError(
                f"saving a sharded {type(module.model).__name__} given as a module is not supported; give the model "
                "by name (folder, hub id, .gguf) so hfbridge can rebuild it, or use export_hf on a checkpoint"
            )
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()
        return model


def gather_plain_model(module) -> nn.Module | None:
    """The full, unsharded model on rank 0 (``None`` on the other ranks). Collective: every rank calls it.

    A 4-bit model gathers its trainable weights alone (its packed base is whole on every rank already) into a
    4-bit model rank 0 loads afresh (:func:`_load_trainable`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    quantized = is_quantized(module.model)
    if quantized and not getattr(getattr(module.model, "_hfbridge_weight_source", None), "load_in_4bit", False):
        raise NotImplementedError(
            f"saving a sharded quantized {type(module.model).__name__} is supported for 4-bit models hfbridge "
            "loaded itself (HFAutoModelForCausalLM(load_in_4bit=True, ...) given by name), not for one given as a "
            "module or loaded in 8-bit"
        )
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=quantized)
    full = get_model_state_dict(module.model, options=options)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    model = _plain_skeleton(module)
    if quantized:
        trained = [name for name, p in module.model.named_parameters() if p.requires_grad]
        _load_trainable(model, {name: full[name] for name in trained if name in full}, trained)
    else:
        model.load_state_dict(full, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    return model


def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor], trained: list[str]) -> None:
    """Copy the gathered trainable weights ``state`` (of the sharded model's ``trained`` parameters) into the same
    parameters of ``model``, which must have exactly those trainable parameters, of the same shapes."""
    params = dict(model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    problems = []
    if missing := [name for name in trained if name not in state]:
        problems.append(f"the gather returned no weight for {missing[:5]}")
    if extra := sorted(set(trained) - trainable):
        problems.append(f"the rebuilt model has no trainable parameter {extra[:5]}")
    if untrained := sorted(trainable - set(trained)):
        problems.append(f"the rebuilt model's parameters {untrained[:5]} were not trained")
    problems += [f"{name}: shape {tuple(value.shape)} gathered, {tuple(params[name].shape)} rebuilt"
                 for name, value in state.items() if name in params and value.shape != params[name].shape][:5]
    if problems:
        raise RuntimeError("cannot rebuild the trained 4-bit model on rank 0 (the same 4-bit model and transform "
                           "as on every rank): " + "; ".join(problems))
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def export_hf(checkpoint: str | os.PathLike, model_source: str | os.PathLike, output: str | os.PathLike,
              overwrite: bool = False, dtype: str | torch.dtype | None = None) -> Path:
    """Consolidate a sharded checkpoint (any mesh) into a Hugging Face folder at ``output``, in one process.

    ``checkpoint`` is a checkpoint folder (its newest complete step) or one ``step-N`` folder; ``model_source``
    the model the run started from (its config and tokenizer are reused; a checkpoint of another model is
    refused). Full fine-tuning checkpoints: an adapter run's final adapter is written by ``save_pretrained``.
    """
    import torch.distributed.checkpoint as dcp
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from hfbridge.io import atomic_dir

    path = ckpt.resolve_checkpoint(checkpoint)
    model_path = loading.resolve_model_path(model_source)
    config = loading.load_config(model_path)
    torch_dtype = loading.resolve_dtype(dtype or "float32")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.tie_weights()
    meta = ckpt.read_meta(path)
    if str(meta.get("fingerprint", {}).get("class", "")).startswith("Peft"):
        raise ValueError(
            f"checkpoint {path} is of an adapter run: its adapter is saved by save_pretrained at the end of the run "
            "(hfbridge finetune writes adapter/ and model/); export_hf consolidates full fine-tuning checkpoints"
        )
    ckpt.check_fingerprint(meta.get("fingerprint", {}), ckpt.model_fingerprint(model), path)
    prefix = STATE_PREFIX + meta.get("model_key_prefix", "")
    stored = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    state = {}
    for name, param in model.named_parameters():  # tied weights appear once
        key = prefix + name
        if key not in stored:
            raise ckpt.CheckpointMismatchError(f"checkpoint {path} has no weight {name!r}")
        state[key] = torch.empty(param.shape, dtype=param.dtype)
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ckpt.CheckpointMismatchError(f"checkpoint {path} left weights unset: {still_meta[:5]}")
    with atomic_dir(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            loading.load_tokenizer(model_path).save_pretrained(tmp)
        except Exception as e:  # a model folder without a tokenizer still exports
            log.warning("no tokenizer saved with the export (%s)", e)
    log.info("exported %s (step %s) to %s", path, meta.get("step"), output)
    return Path(output)

"""A Lightning strategy that builds the ``(dp, fsdp, tp, sp)`` mesh and hands it to ``configure_model``.

It is Lightning's ``ModelParallelStrategy`` (FSDP2 + DTensor, ``configure_model`` required) with:

* the 4-D mesh of a :class:`~hfbridge.parallel.ParallelConfig` instead of the 2-D one;
* ``data_parallel_rank`` / ``data_parallel_size``: the ``(dp, fsdp)`` coordinate that
  :class:`hfbridge.CausalLMDataModule` shards the data by (tensor/sequence-parallel ranks share a batch);
* sharded checkpoints that are complete or ignored (:mod:`hfbridge.parallel.checkpoint`), with the data position,
  random states and the model's fingerprint, resumed with ``trainer.fit(..., ckpt_path=folder)``.

Usage (under ``torchrun``, or let Lightning start the processes)::

    trainer = pl.Trainer(accelerator="cpu", devices=4, strategy=MeshParallelStrategy(
        ParallelConfig(sharding_axis_dims=(1, -1, 2, 1))))
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import Callback
from lightning.pytorch.strategies import ModelParallelStrategy

from hfbridge.models.peft_adapters import is_quantized
from hfbridge.optim import total_grad_norm
from hfbridge.parallel import checkpoint as ckpt
from hfbridge.parallel.mesh import MeshLayout, ParallelConfig, build_device_mesh, mesh_layout

log = logging.getLogger(__name__)


class MeshParallelStrategy(ModelParallelStrategy):
    """FSDP2 + tensor/sequence parallelism over a ``(dp, fsdp, tp, sp)`` mesh.

    Args:
        parallel: the mesh and sharding settings; ``None`` takes the LightningModule's ``parallel`` attribute,
            else the default (FSDP over all processes).
        keep_last: complete checkpoints kept in a checkpoint folder (older ones are removed after each save).
    """

    def __init__(
        self,
        parallel: ParallelConfig | None = None,
        keep_last: int | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=True,
            process_group_backend=process_group_backend, timeout=timeout,
        )
        self.parallel = parallel
        self.keep_last = keep_last
        self._layout: MeshLayout | None = None

    # ------------------------------------------------------------------------------------------- mesh
    def setup_environment(self) -> None:
        super(ModelParallelStrategy, self).setup_environment()
        self._setup_distributed()
        module = self.lightning_module
        config = self.parallel or getattr(module, "parallel", None) or ParallelConfig()
        self.parallel = config
        if getattr(module, "parallel", None) is None:
            module.parallel = config
        if getattr(module, "_device_mesh", None) is not None:  # built before the model was loaded: keep it
            self._device_mesh = module._device_mesh
        else:
            self._device_mesh = build_device_mesh(config, self.world_size, self.root_device.type)
        self._layout = mesh_layout(self._device_mesh)
        module._device_mesh = self._device_mesh
        log.info("device mesh %s over %d processes", self._layout.sizes, self.world_size)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        plugin = self.precision_plugin  # gradients live on several meshes: clip by their global norm
        plugin.clip_grad_by_norm = lambda optimizer, clip_val: clip_grad_norm_(plugin.main_params(optimizer), clip_val)

    @property
    def layout(self) -> MeshLayout:
        if self._layout is None:
            raise RuntimeError("the device mesh is built when the processes start (Trainer.fit)")
        return self._layout

    @property
    def data_parallel_rank(self) -> int:
        return self.layout.data_parallel_rank

    @property
    def data_parallel_size(self) -> int:
        return self.layout.data_parallel_size

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.data_parallel_size, "rank": self.data_parallel_rank}

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Save into ``filepath`` (a ``step-N`` folder) through ``step-N.tmp``, then ``COMPLETE`` and ``latest``."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        shards = {"state_dict": checkpoint_model_state(self.model, checkpoint.pop("state_dict"))}
        for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
            shards[f"optimizer_{i}"] = state
        module = self.lightning_module
        meta = {
            "step": checkpoint.get("global_step"),
            "epoch": checkpoint.get("epoch"),
            "data_position": data_position(module.trainer) if module._trainer is not None else None,
            "fingerprint": ckpt.model_fingerprint(module.model),
            "model_key_prefix": "model.",
            "mesh": self.layout.sizes,
        }
        ckpt.save_sharded(path, shards, checkpoint, meta, keep_last=self.keep_last)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Resume from a checkpoint folder (its newest complete step) or one ``step-N`` folder."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = ckpt.resolve_checkpoint(self.broadcast(str(checkpoint_path)))
        module = self.lightning_module
        ckpt.check_fingerprint(ckpt.read_meta(path).get("fingerprint", {}), ckpt.model_fingerprint(module.model), path)
        shards = {"state_dict": checkpoint_model_state(self.model, get_model_state_dict(self.model))}
        for i, optimizer in enumerate(self.optimizers):
            shards[f"optimizer_{i}"] = get_optimizer_state_dict(self.model, optimizer)
        trainer_state, meta = ckpt.load_sharded(path, shards)
        # a 4-bit model's checkpoint holds what trains alone: its frozen packed base stays as loaded
        set_model_state_dict(self.model, shards["state_dict"],
                             options=StateDictOptions(strict=not _quantized(self.model)))
        for i, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(self.model, optimizer, shards[f"optimizer_{i}"])
        position = meta.get("data_position")
        datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
        if position and datamodule is not None:
            if hasattr(datamodule, "resume_at"):
                datamodule.resume_at(position["epoch"], position["batches"])
            else:
                log.warning("%s cannot skip to the saved data position; the epoch restarts", type(datamodule).__name__)
        log.info("resumed from %s (step %s)", path, meta.get("step"))
        return trainer_state


_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a LightningModule whose ``model`` is the network, or the network) is a 4/8-bit model."""
    return is_quantized(model) or is_quantized(getattr(model, "model", None))


def checkpoint_model_state(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The part of ``model``'s state dict ``state`` a checkpoint holds: all of it, but for a 4-bit (QLoRA) model
    only the trainable parameters and buffers. Its packed base is frozen and rebuilt at load from the model the
    run identity names, and bitsandbytes' quantization state, which the state dict carries beside each packed
    weight, does not load back through ``load_state_dict``."""
    if not _quantized(model):
        return state

    def canonical(name: str) -> str:
        for wrapper in _WRAPPERS:
            name = name.replace(wrapper, "")
        return name

    kept = {canonical(n) for n, p in model.named_parameters() if p.requires_grad}
    if missing := sorted(kept - set(state)):
        raise RuntimeError(f"the model's state dict has no entry for its trainable parameters {missing[:5]}")
    kept |= {canonical(n) for n, _ in model.named_buffers()}
    return {key: value for key, value in state.items() if key in kept}


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients sharded over different meshes (FSDP-only parameters on
    the data mesh, tensor-parallel ones on data x model): the norm of each mesh's group, gathered, then combined."""
    parameters = [p for p in parameters if p.grad is not None]
    total = total_grad_norm(parameters, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).item()  # as torch.nn.utils.clip_grads_with_norm_
    with torch.no_grad():
        for p in parameters:
            p.grad.mul_(coef)
    return total


def data_position(trainer) -> dict[str, int]:
    """The epoch and the micro-batches of it already trained on (saved with a checkpoint)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return {"epoch": int(trainer.current_epoch), "batches": int(progress.processed)}


class ShardedCheckpoint(Callback):
    """Save a sharded checkpoint every ``every_n_steps`` optimizer steps (and at the end) into ``dirpath``,
    keeping the last ``keep_last``. Needs :class:`MeshParallelStrategy`; resume with
    ``trainer.fit(..., ckpt_path=dirpath)``."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep_last: int | None = 3, save_last: bool = True):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (or None to keep all), got {keep_last}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.save_last = save_last
        self._last_saved = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not isinstance(trainer.strategy, MeshParallelStrategy):
            raise TypeError(
                f"ShardedCheckpoint needs Trainer(strategy=MeshParallelStrategy(...)), not {type(trainer.strategy).__name__}"
            )
        trainer.strategy.keep_last = self.keep_last

    def _save(self, trainer) -> None:
        step = trainer.global_step
        trainer.save_checkpoint(self.dirpath / ckpt.step_dir_name(step))
        self._last_saved = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step != self._last_saved and step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and trainer.global_step > 0 and trainer.global_step != self._last_saved:
            self._save(trainer)

"""``HFAutoModelForCausalLM``: a Lightning module around any Hugging Face causal LM (seed 000)."""

from __future__ import annotations

import copy
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from hfbridge.data.collators import NUM_LABEL_TOKENS_KEY
from hfbridge.io import atomic_dir
from hfbridge.losses import count_label_tokens, masked_cross_entropy
from hfbridge.models import loading, speed
from hfbridge.optim import OptimizerConfig, build_optimizer
from hfbridge.peft import is_peft_model, is_quantized

log = logging.getLogger(__name__)

LOSS_KEYS = ("labels", "loss_mask", NUM_LABEL_TOKENS_KEY)


class HFAutoModelForCausalLM(pl.LightningModule):
    """A Lightning module around any Hugging Face causal LM.

    Args (the seed's, with its names):
        model_name: a hub id, a local HF folder, a ``.gguf`` file, the embedded alias ``smollm2-135m-instruct``, or
            an ``nn.Module`` / ``PreTrainedModel`` to train as it is. The seed's default ``'gpt2'`` cannot be
            loaded without a hub, so the default is the embedded SmolLM2-135M-Instruct.
        load_pretrained_weights: load the weights, or build the architecture from its config with random ones.
        tokenizer: a tokenizer; ``None`` loads the model's own.
        loss_fn: ``loss_fn(logits, labels, loss_mask)`` returning the mean over trained tokens; labels are already
            next-token targets (see :mod:`hfbridge.losses`). Default :func:`masked_cross_entropy`.
        model_transform: a callable applied to the loaded model (for example :class:`hfbridge.LoRA`); it returns
            the new model, or ``None`` if it changed the model in place.
        model_accelerator: a callable applied last (kernels, ``torch.compile``), same contract.
        trust_remote_code: run code shipped with the model; off unless asked for.
        default_dtype: ``"auto"`` (default) is float32 on CPU and bfloat16 on GPUs that support it. The seed's
            default bfloat16 was measured 40x slower than float32 on CPU, hence the change.
        load_in_4bit: bitsandbytes NF4 weights (CPU too); with a LoRA transform this is QLoRA.
        attn_implementation: ``"sdpa"`` by default; a model without it falls back with a warning.

    hfbridge's own:
        optim: an :class:`hfbridge.OptimizerConfig` (AdamW, warmup then cosine by default).
        chunked_loss: compute the loss without the full ``tokens x vocabulary`` logits: the backbone's hidden
            states of the trained positions only are projected, 512 at a time (or this many, given an int), with
            the same loss and gradients. On by default; models where the head cannot be split off, and a custom
            ``loss_fn``, use the full logits.
        activation_checkpointing: recompute decoder layers in backward instead of keeping their activations:
            ``True``/``"full"`` every layer, ``"selective"`` every layer but keeping matrix-product and attention
            outputs (only pointwise ops are recomputed), an int ``k`` every k-th layer.
        compile: ``torch.compile`` each decoder layer (regional compilation).
        liger: Liger kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) on CUDA GPUs; needs
            ``liger-kernel``. Without a GPU it warns and uses the chunked PyTorch loss.
        device_mesh: a ``torch.distributed`` ``DeviceMesh`` to spread the model over (the ``(dp, fsdp, tp, sp)``
            mesh of :func:`hfbridge.parallel.build_device_mesh`, or Lightning's 2-D one). Usually left ``None``:
            :class:`hfbridge.parallel.MeshParallelStrategy` builds it and hands it over before ``configure_model``.
        parallel: a :class:`hfbridge.parallel.ParallelConfig` (mesh sizes, partition rules, mixed precision,
            CPU offload); see docs/distributed.md.

    Batches hold ``input_ids``, optional ``attention_mask`` and ``position_ids``, ``labels`` (next-token targets,
    -100 where not trained), an optional ``loss_mask``, and the optional ``num_label_tokens`` of the optimizer step
    that :class:`hfbridge.CausalLMDataModule` stamps: with it the loss is normalised by the label tokens of the
    whole step (over gradient accumulation and data-parallel ranks), not per micro-batch.
    """

    def __init__(
        self,
        *,
        model_name: str | os.PathLike | nn.Module = loading.EMBEDDED_NAME,
        load_pretrained_weights: bool = True,
        tokenizer=None,
        loss_fn: Callable = masked_cross_entropy,
        model_transform: Callable | None = None,
        model_accelerator: Callable | None = None,
        trust_remote_code: bool = False,
        default_dtype: str | torch.dtype = "auto",
        load_in_4bit: bool = False,
        attn_implementation: str = "sdpa",
        optim: OptimizerConfig | None = None,
        chunked_loss: bool | int = True,
        activation_checkpointing: bool | str | int = False,
        compile: bool = False,
        liger: bool = False,
        device_mesh=None,
        parallel=None,
    ):
        super().__init__()
        if load_in_4bit:
            loading.require_bitsandbytes()
        if liger:
            speed.require_liger()
        self.model_name = model_name
        self._tokenizer = tokenizer
        self.model = None
        self.loss_fn = loss_fn
        self.load_pretrained_weights = load_pretrained_weights
        self.is_hf_model = True
        self.model_transform = model_transform
        self.model_accelerator = model_accelerator
        self.trust_remote_code = trust_remote_code
        self.default_dtype = default_dtype
        self.load_in_4bit = load_in_4bit
        self.attn_implementation = attn_implementation
        self.optim = optim or OptimizerConfig()
        self._forward_keys: set[str] | None = None
        self.chunked_loss = chunked_loss
        self.activation_checkpointing = speed.check_checkpointing_mode(activation_checkpointing)
        self.compile_layers = compile
        self.liger = liger
        self._head_split: tuple[nn.Module, speed.HeadSplit | None] | None = None
        self._step_loss_sum = 0.0
        self._step_tokens_seen = 0
        self._device_mesh = device_mesh
        self.parallel = parallel
        self._dp_mesh = None

    # ----------------------------------------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if isinstance(self.model_name, nn.Module):
                raise ValueError("model_name is a module, so there is no tokenizer to load; pass tokenizer=...")
            self._tokenizer = self.configure_tokenizer(self.model_name, self.trust_remote_code)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value):
        self._tokenizer = value

    @staticmethod
    def configure_tokenizer(model_name, trust_remote_code: bool = False):
        """The tokenizer of ``model_name`` (any name :mod:`hfbridge.models.loading` resolves), with a pad token."""
        return loading.load_tokenizer(model_name, trust_remote_code)

    # ----------------------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        """Load (or randomly initialise) the model, then apply the transform, parallelism and accelerator.

        Idempotent: a second call does nothing. Lightning calls it before fitting.
        """
        if self.model is not None:
            return
        if isinstance(self.model_name, nn.Module):
            model = self.model_name
            if not _is_hf_model(model):  # a native module: give it the Hugging Face API
                from hfbridge.adapters import to_hf_api

                model = to_hf_api(model, self._tokenizer)
            self.is_hf_model = _is_hf_model(model)
        else:
            model = self._load_model()
        model = _apply(self.model_transform, model)
        self._after_transform(model)
        self._apply_speed_options(model)
        model = self._parallelize(model)
        model = _apply(self.model_accelerator, model)
        if self.compile_layers:
            speed.compile_layers(model)
        model.train()  # from_pretrained returns eval mode; this module trains (dropout on where configured)
        self.model = model
        self._forward_keys = None

    def _load_model(self, auto_class=None, model_name: str | os.PathLike | None = None) -> nn.Module:
        """Load ``model_name`` (default ``self.model_name``), or build it with random weights, with the settings
        of this module; subclasses for other kinds of model pass their ``auto_class``.

        With a device mesh the model is built on the meta device instead: ``_parallelize`` shards it, then each
        rank loads only its own shards (:mod:`hfbridge.parallel.materialize`)."""
        if self._device_mesh is not None:
            from hfbridge.parallel.materialize import skeleton_for

            return skeleton_for(self, auto_class, model_name)
        return loading.load_pretrained_model(
            self.model_name if model_name is None else model_name,
            auto_class=auto_class,
            load_pretrained_weights=self.load_pretrained_weights,
            dtype=self.default_dtype,
            attn_implementation=self.attn_implementation,
            load_in_4bit=self.load_in_4bit,
            trust_remote_code=self.trust_remote_code,
        )

    def _after_transform(self, model: nn.Module) -> None:
        """Subclasses' changes to the loaded (and transformed) model before it is parallelized; none here."""

    def _parallelize(self, model: nn.Module) -> nn.Module:
        """Where tensor/sequence parallelism and FSDP2 are applied when a device mesh is given: all of it is in
        :func:`hfbridge.parallel.apply.parallelize_model`. A meta-device model is then filled, each rank loading
        only its shards."""
        if self._device_mesh is None:
            return model
        from hfbridge.parallel.apply import parallelize_model
        from hfbridge.parallel.materialize import is_skeleton, materialize
        from hfbridge.parallel.mesh import mesh_layout

        model = parallelize_model(model, self._device_mesh, self.parallel)
        if is_skeleton(model):
            materialize(model, self._device_mesh)
        self._dp_mesh = mesh_layout(self._device_mesh).data_flat
        if self.chunked_loss:  # it calls the backbone and the head apart, outside FSDP's root: full logits
            log.info("loss without full logits: off on a device mesh (the model is sharded)")
            self.chunked_loss = False
        return model

    @property
    def context_length(self) -> int | None:
        config = getattr(self.model, "config", None)
        return loading.context_length(config) if config is not None else None

    # ----------------------------------------------------------------------------------------------- forward
    def _model_forward_keys(self) -> set[str] | None:
        """The named arguments of the model's ``forward`` (``None``: it takes only ``*args/**kwargs``)."""
        if self._forward_keys is None:
            base = self.model.get_base_model() if is_peft_model(self.model) else self.model
            params = inspect.signature(base.forward).parameters.values()
            named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
            if not named:
                return None
            self._forward_keys = named
        return self._forward_keys

    def _remove_extra_batch_keys(self, batch: dict, reserved_keys: Sequence[str] = ("labels", "loss_mask")) -> dict:
        """Keep only the keys the model's ``forward`` takes, plus ``reserved_keys``."""
        keys = self._model_forward_keys()
        if keys is None:
            return dict(batch)
        return {k: v for k, v in batch.items() if k in keys or k in reserved_keys}

    def forward(self, batch: dict):
        """Run the model on a batch. Loss keys (``labels``, ``loss_mask``) are not passed to the model: the loss
        is computed by ``loss_fn`` on already-shifted labels, never by the model's own (shifting) loss."""
        inputs = self._remove_extra_batch_keys({k: v for k, v in batch.items() if k not in LOSS_KEYS}, ())
        keys = self._model_forward_keys()
        if keys is not None and "use_cache" in keys:
            inputs.setdefault("use_cache", False)  # no KV cache is needed to train
        return self.model(**inputs)

    def _dp_size_and_group(self):
        """Size and process group of the data-parallel ranks: those that see different data, and the ranks whose
        gradients FSDP2 / DDP average. On a ``(dp, fsdp, tp, sp)`` mesh that is the ``dp x fsdp`` ranks (the
        ``tp * sp`` ranks of a group share a batch and are not averaged over); without a mesh, the world."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 1, None
        mesh = getattr(self, "_dp_mesh", None)
        if mesh is not None:
            return mesh.size(), mesh.get_group()
        if self._trainer is not None and self.trainer.world_size == 1:
            return 1, None  # one process under a process group started by someone else
        return torch.distributed.get_world_size(), None

    def _token_normalised_loss(self, mean_loss: torch.Tensor, n_micro: int, n_step_local) -> torch.Tensor:
        """Scale a micro-batch's mean loss so that the summed gradients equal the gradient of
        ``sum(all token losses of the step, all data-parallel ranks) / (label tokens of the step)``.

        Lightning divides by ``accumulate_grad_batches`` and data-parallel reduction averages over ranks, so both
        are multiplied back.
        """
        dp_size, group = self._dp_size_and_group()
        n_step = torch.as_tensor(n_step_local, dtype=torch.float64, device=mean_loss.device).clone()
        if dp_size > 1:
            torch.distributed.all_reduce(n_step, group=group)
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        scale = n_micro / n_step.clamp(min=1).item() * dp_size * accumulate
        return mean_loss * scale

    def _apply_speed_options(self, model: nn.Module) -> None:
        """Activation checkpointing and Liger kernels, in place (``torch.compile`` comes after parallelism)."""
        if self.activation_checkpointing:
            speed.enable_activation_checkpointing(model, self.activation_checkpointing)
        if self.liger and speed.liger_usable():
            speed.apply_liger_kernels(model)

    def _split(self) -> speed.HeadSplit | None:
        """The model as backbone + linear head for the loss without full logits, or ``None`` (found once per model)."""
        if not self.chunked_loss or self.loss_fn is not masked_cross_entropy:
            return None
        if self._head_split is None or self._head_split[0] is not self.model:
            split, reason = speed.split_head(self.model)
            log.info("loss without full logits: %s (%s)", "on" if split else "off, full logits", reason)
            self._head_split = (self.model, split)
        return self._head_split[1]

    def _loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        """The mean loss over the batch's trained tokens, and their number (for training and validation)."""
        labels, loss_mask = batch["labels"], batch.get("loss_mask")
        split = self._split()
        if split is None:
            mean_loss = self.loss_fn(self.forward(batch).logits, labels, loss_mask)
        else:
            hidden = split.hidden_states({k: v for k, v in batch.items() if k not in LOSS_KEYS})
            chunk = 512 if self.chunked_loss is True else int(self.chunked_loss)
            mean_loss = speed.linear_loss(hidden, split.head, labels, loss_mask, chunk, self.liger)
        return mean_loss, count_label_tokens(labels, loss_mask)

    def training_step(self, batch: dict, batch_idx: int | None = None) -> torch.Tensor:
        """Loss of one micro-batch, normalised per label token of the whole optimizer step when the batch says
        how many there are (``num_label_tokens``), else per token of this micro-batch. Logs ``train_loss``
        (the per-token loss of the optimizer step) and ``lr``."""
        mean_loss, n_micro = self._loss(batch)
        n_step = batch.get(NUM_LABEL_TOKENS_KEY)
        if n_step is None:
            self._log_train_loss(mean_loss.detach(), n_micro, n_micro)
            return mean_loss
        n_step = int(n_step)
        self._log_train_loss(mean_loss.detach(), n_micro, n_step)
        return self._token_normalised_loss(mean_loss, n_micro, n_step)

    def _log_train_loss(self, mean_loss: torch.Tensor, n_micro: int, n_step: int) -> None:
        if self._trainer is None:
            return
        self._step_loss_sum += float(mean_loss) * n_micro
        self._step_tokens_seen += n_micro
        if self._step_tokens_seen >= n_step:
            step_loss = self._step_loss_sum / max(self._step_tokens_seen, 1)
            self.log("train_loss", step_loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n_step)
            self._step_loss_sum, self._step_tokens_seen = 0.0, 0
        optimizers = self.trainer.optimizers
        if optimizers:
            self.log("lr", optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False, prog_bar=False)

    def validation_step(self, batch: dict, batch_idx: int = 0) -> torch.Tensor:
        """Per-token validation loss; ``val_loss`` is the token-weighted mean over the whole validation set."""
        loss, n = self._loss(batch)
        if self._trainer is not None:
            self.log("val_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=max(n, 1), sync_dist=True)
        return loss

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1000
        optimizer, scheduler = build_optimizer(self.model, self.optim, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping; on a device mesh, by the global norm of gradients that live on several meshes
        (FSDP-only and tensor-parallel parameters), which ``torch.nn.utils.clip_grad_norm_`` cannot combine."""
        if self._dp_mesh is None or not gradient_clip_val or gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        from hfbridge.parallel.strategy import clip_grad_norm_

        clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], gradient_clip_val)

    # ----------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, path: str | os.PathLike, merged: bool = False, overwrite: bool = True) -> Path:
        """Save the model and tokenizer as a folder plain transformers loads (``from_pretrained``).

        With an adapter, the adapter alone is saved (peft's ``PeftModel.from_pretrained`` loads it onto the base
        model), or with ``merged=True`` the model with the adapter merged into its weights. The folder appears only
        when complete.
        """
        if self.model is None:
            raise RuntimeError("no model to save: call configure_model() or fit first")
        path = Path(path)
        model = self.model
        if self._dp_mesh is not None:  # sharded: every rank gathers, rank 0 saves an unsharded copy
            from hfbridge.parallel.export import gather_plain_model

            model = gather_plain_model(self)
            if model is None:
                return path
        with atomic_dir(path, overwrite=overwrite) as tmp:
            if is_peft_model(model) and merged:
                if is_quantized(model):
                    raise ValueError(
                        "merging an adapter into 4/8-bit weights would lose precision; save the adapter "
                        "(merged=False) and merge it into the full-precision base model instead"
                    )
                model = copy.deepcopy(model).merge_and_unload()
            model.save_pretrained(tmp, safe_serialization=True)
            self._save_preprocessing(tmp)
        return path

    def _save_preprocessing(self, folder: Path) -> None:
        """Save what turns inputs into model inputs (here the tokenizer) beside the model."""
        if self._tokenizer is not None or not isinstance(self.model_name, nn.Module):
            self.tokenizer.save_pretrained(folder)


def _apply(fn: Callable | None, model: nn.Module) -> nn.Module:
    if fn is None:
        return model
    result = fn(model)
    return model if result is None else result


def _is_hf_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) or (is_peft_model(model))

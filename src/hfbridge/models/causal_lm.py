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
from hfbridge.models import loading
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
    ):
        super().__init__()
        if load_in_4bit:
            loading.require_bitsandbytes()
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
        self._step_loss_sum = 0.0
        self._step_tokens_seen = 0

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
            model = loading.load_pretrained_model(
                self.model_name,
                load_pretrained_weights=self.load_pretrained_weights,
                dtype=self.default_dtype,
                attn_implementation=self.attn_implementation,
                load_in_4bit=self.load_in_4bit,
                trust_remote_code=self.trust_remote_code,
            )
        model = _apply(self.model_transform, model)
        model = self._parallelize(model)
        model = _apply(self.model_accelerator, model)
        model.train()  # from_pretrained returns eval mode; this module trains (dropout on where configured)
        self.model = model
        self._forward_keys = None

    def _parallelize(self, model: nn.Module) -> nn.Module:
        """Where tensor/sequence parallelism and FSDP are applied when a device mesh is given (see parallel/)."""
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
        """Size and process group of the data-parallel dimension (ranks that see different data)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 1, None
        mesh = getattr(self, "_dp_mesh", None)
        if mesh is not None:
            return mesh.size(), mesh.get_group()
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

    def training_step(self, batch: dict, batch_idx: int | None = None) -> torch.Tensor:
        """Loss of one micro-batch, normalised per label token of the whole optimizer step when the batch says
        how many there are (``num_label_tokens``), else per token of this micro-batch. Logs ``train_loss``
        (the per-token loss of the optimizer step) and ``lr``."""
        labels, loss_mask = batch["labels"], batch.get("loss_mask")
        outputs = self.forward(batch)
        mean_loss = self.loss_fn(outputs.logits, labels, loss_mask)
        n_micro = count_label_tokens(labels, loss_mask)
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
        labels, loss_mask = batch["labels"], batch.get("loss_mask")
        outputs = self.forward(batch)
        loss = self.loss_fn(outputs.logits, labels, loss_mask)
        n = count_label_tokens(labels, loss_mask)
        if self._trainer is not None:
            self.log("val_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=max(n, 1), sync_dist=True)
        return loss

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1000
        optimizer, scheduler = build_optimizer(self.model, self.optim, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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
        with atomic_dir(path, overwrite=overwrite) as tmp:
            model = self.model
            if is_peft_model(model) and merged:
                if is_quantized(model):
                    raise ValueError(
                        "merging an adapter into 4/8-bit weights would lose precision; save the adapter "
                        "(merged=False) and merge it into the full-precision base model instead"
                    )
                model = copy.deepcopy(model).merge_and_unload()
            model.save_pretrained(tmp, safe_serialization=True)
            if self._tokenizer is not None or not isinstance(self.model_name, nn.Module):
                self.tokenizer.save_pretrained(tmp)
        return path


def _apply(fn: Callable | None, model: nn.Module) -> nn.Module:
    if fn is None:
        return model
    result = fn(model)
    return model if result is None else result


def _is_hf_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) or (is_peft_model(model))

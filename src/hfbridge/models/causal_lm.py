"""``HFAutoModelForCausalLM``: a Lightning module around any Hugging Face causal LM (seed 000)."""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from hfbridge.losses import NUM_LABEL_TOKENS_KEY, count_label_tokens, masked_cross_entropy
from hfbridge.models import hooks, loading, varlen_attention
from hfbridge.models.chunked_loss import HeadSplit, forward_keys, split_head
from hfbridge.models.fused_mlp import fuse_gated_mlps
from hfbridge.models.liger import apply_liger_kernels, liger_usable, require_liger
from hfbridge.models.peft_adapters import base_model, is_peft_model
from hfbridge.models.saving import save_hf_folder
from hfbridge.optim import OptimizerConfig, build_optimizer

log = logging.getLogger(__name__)

LOSS_KEYS = ("labels", "loss_mask", NUM_LABEL_TOKENS_KEY)
SEED_INPUT_IDS_KEY = "tokens"  # NeMo's data sets (GPTSFTDataset) name the input ids ``tokens``
TAKES_MODULE_ATTR = "takes_module"  # a transform with ``takes_module = True`` is called with the Lightning module
MIXED_STEP = ("an optimizer step mixes batches with and without num_label_tokens; a data loader gives it to every "
              "batch or to none")


def module_transform(fn: Callable) -> Callable:
    """Mark ``fn`` as a transform in the seed's (NeMo's) form: ``fn(module)`` gets the Lightning module and changes
    ``module.model`` (wrapping it, replacing it, or in place); what it returns is ignored. Without the mark (or an
    annotation, see :meth:`HFAutoModelForCausalLM.transform_takes_module`) a transform gets the model itself."""

    @functools.wraps(fn)
    def transform(module):
        return fn(module)

    setattr(transform, TAKES_MODULE_ATTR, True)
    return transform


def with_input_ids(batch: dict) -> dict:
    """``batch`` with NeMo's ``tokens`` key read as ``input_ids`` (``input_ids`` wins when both are there)."""
    if SEED_INPUT_IDS_KEY in batch and "input_ids" not in batch:
        return {("input_ids" if k == SEED_INPUT_IDS_KEY else k): v for k, v in batch.items()}
    return batch


@dataclass
class _OpenStep:
    """An optimizer step being accumulated from batches that do not carry ``num_label_tokens``.

    ``estimate`` is a provisional label-token total of the step (all data-parallel ranks, the same on every rank)
    that the micro-batch losses are normalised by; when the step's last backward is done, the gradients are
    multiplied by ``estimate / actual total``."""

    estimate: float
    tokens: int = 0  # this rank's label tokens so far
    loss_sum: float = 0.0  # this rank's summed token losses so far


class HFAutoModelForCausalLM(pl.LightningModule):
    """A Lightning module around any Hugging Face causal LM.

    Args (the seed's, with its names):
        model_name: a hub id, a local HF folder, a ``.gguf`` file, the embedded alias ``smollm2-135m-instruct``, or
            an ``nn.Module`` / ``PreTrainedModel`` to train as it is (a native module without the Hugging Face API
            gets it from :func:`hfbridge.to_hf_api`). The seed's default ``'gpt2'`` cannot be loaded without a hub,
            so the default is the embedded SmolLM2-135M-Instruct.
        load_pretrained_weights: load the weights, or build the architecture from its config with random ones.
        tokenizer: a tokenizer; ``None`` loads the model's own.
        loss_fn: ``loss_fn(logits, labels, loss_mask)`` returning the mean over trained tokens; labels are already
            next-token targets (see :mod:`hfbridge.losses`). Default :func:`masked_cross_entropy`. It gets
            ``[batch, seq, vocab]`` logits and ``[batch, seq]`` labels and mask; with ``loss_fn_flat=True``, the
            seed's flattened form: ``logits.float().view(-1, vocab)``, ``labels.view(-1)``, ``loss_mask.view(-1)``
            (or ``None``), so a loss written for NeMo runs unchanged.
        model_transform: a callable applied to the loaded model. Two forms, told apart without calling it
            (:meth:`transform_takes_module`): hfbridge's (for example :class:`hfbridge.LoRA`) gets the Hugging Face
            model and returns the new model, or ``None`` if it changed the model in place; the seed's (NeMo's) gets
            this Lightning module and changes ``module.model``; it is used when the callable has
            ``takes_module = True`` (:func:`module_transform` sets it) or its first parameter is annotated with a
            ``LightningModule`` class (this one's, or a base of it; a string annotation is read by its name).
        model_accelerator: a callable applied last, after the transform and the parallel plan (kernels,
            ``torch.compile``), in either form, told apart the same way.
        trust_remote_code: run code shipped with the model; off unless asked for.
        default_dtype: ``"auto"`` (default) is float32 on CPU and bfloat16 on GPUs that support it. The seed's
            default bfloat16 was measured 40x slower than float32 on CPU, hence the change.
        load_in_4bit: bitsandbytes NF4 weights (CPU too); with a LoRA transform this is QLoRA.
        attn_implementation: ``"sdpa"`` by default; a model without it falls back with a warning.

    hfbridge's own:
        loss_fn_flat: hand ``loss_fn`` flattened tensors, as the seed does (see ``loss_fn``).
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
            CPU offload; ``None``: the defaults), or, without :class:`~hfbridge.parallel.MeshParallelStrategy`, any
            :class:`hfbridge.models.hooks.ParallelPlan`. The parallel layer applies itself through it, with or
            without a mesh (activation checkpointing and compile are applied there too); see docs/distributed.md.

    Batches hold ``input_ids`` (or NeMo's name for them, ``tokens``), optional ``attention_mask`` and
    ``position_ids``, ``labels`` (next-token targets, -100 where not trained), an optional ``loss_mask``, and the
    optional ``num_label_tokens`` of the optimizer step that :class:`hfbridge.CausalLMDataModule` stamps. The loss
    is normalised by the label tokens of the whole optimizer step (over gradient accumulation and data-parallel
    ranks), not per micro-batch, with any data loader (see :meth:`training_step`).
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
        loss_fn_flat: bool = False,
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
            require_liger()
        self.model_name = model_name
        self._tokenizer = tokenizer
        self.model = None
        self.loss_fn = loss_fn
        self.loss_fn_flat = loss_fn_flat
        self.load_pretrained_weights = load_pretrained_weights
        self.is_hf_model = True
        self.model_transform = model_transform
        self.model_accelerator = model_accelerator
        self.trust_remote_code = trust_remote_code
        self.default_dtype = default_dtype
        self.load_in_4bit = load_in_4bit
        self.attn_implementation = attn_implementation
        self.optim = optim or OptimizerConfig()
        self._forward_keys: frozenset[str] | None = None
        self.chunked_loss = chunked_loss
        self.activation_checkpointing = hooks.check_checkpointing_mode(activation_checkpointing)
        self.compile_layers = compile
        self.liger = liger
        self._head_split: tuple[nn.Module, bool, HeadSplit | None] | None = None
        self._step_loss_sum = 0.0
        self._step_tokens_seen = 0
        self._open_step: _OpenStep | None = None
        self._device_mesh = device_mesh
        self.parallel = parallel
        self._dp_mesh = None
        self._context_parallel = None  # set on a mesh with cp > 1: splits each sequence, combines the loss

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
        """Load (or randomly initialise) the model, then apply the transform, kernels, the parallel plan
        (parallelism, activation checkpointing, compile) and the accelerator.

        Idempotent: a second call does nothing. Lightning calls it before fitting.
        """
        if self.model is not None:
            return
        if isinstance(self.model_name, nn.Module):
            model = self.model_name
            if not _is_hf_model(model):  # a native module: give it the Hugging Face API
                model = hooks.hf_api(model, self._tokenizer)
            self.is_hf_model = _is_hf_model(model)
        else:
            model = self._load_model()
        try:
            model = self._apply_transform(self.model_transform, model)
            self._after_transform(model)
            if self.liger and liger_usable():
                apply_liger_kernels(model)
            model = self._parallelize(model)
            model = self._apply_transform(self.model_accelerator, model)
        except BaseException:
            self.model = None  # a seed-form transform sets it; a failed configure_model leaves nothing behind
            raise
        model.train()  # from_pretrained returns eval mode; this module trains (dropout on where configured)
        self.model = model
        self._forward_keys = None

    def transform_takes_module(self, fn: Callable) -> bool:
        """Whether ``fn`` (a ``model_transform`` or ``model_accelerator``) is in the seed's form, called with this
        Lightning module, rather than hfbridge's, called with the model. Decided without calling it: its
        ``takes_module`` attribute when it has one (:func:`module_transform`), else whether its first parameter is
        annotated with a ``LightningModule`` class (a string annotation by its last dotted name: ``LightningModule``
        or the name of this module's class or of a ``LightningModule`` base of it). Anything else gets the model."""
        flag = getattr(fn, TAKES_MODULE_ATTR, None)
        if flag is not None:
            return bool(flag)
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature
            return False
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            return False
        annotation = params[0].annotation
        if isinstance(annotation, str):
            names = {c.__name__ for c in type(self).__mro__ if issubclass(c, pl.LightningModule)}
            return annotation.rsplit(".", 1)[-1].strip("'\"") in names
        return isinstance(annotation, type) and issubclass(annotation, pl.LightningModule)

    def _apply_transform(self, fn: Callable | None, model: nn.Module) -> nn.Module:
        """``fn`` applied in its form (:meth:`transform_takes_module`); the model it leaves."""
        if fn is None:
            return model
        if self.transform_takes_module(fn):
            self.model = model
            fn(self)
            return self.model
        result = fn(model)
        return model if result is None else result

    def _load_model(self, auto_class=None, model_name: str | os.PathLike | None = None) -> nn.Module:
        """Load ``model_name`` (default ``self.model_name``), or build it with random weights, with the settings
        of this module; subclasses for other kinds of model pass their ``auto_class``.

        With a device mesh the parallel plan builds it on the meta device instead: ``_parallelize`` shards it, then
        each rank loads only its own shards."""
        if self._device_mesh is not None:
            return self._plan().skeleton(self, auto_class, model_name)
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
        """Changes to the loaded (and transformed) model before it is parallelized (subclasses replace them): on one
        process, a plain causal model under ``sdpa`` attends packed samples one by one
        (:mod:`hfbridge.models.varlen_attention`), so a packed micro-batch is one row without padding, and its
        gated MLPs keep two activations for backward, not three (:mod:`hfbridge.models.fused_mlp`; Liger's kernels
        replace them on a GPU)."""
        if self._device_mesh is not None:
            return
        if self.attn_implementation == "sdpa":
            switched, reason = varlen_attention.enable(base_model(model))
            log.info("attention: %s (%s)", varlen_attention.NAME if switched else "sdpa", reason)
        if not self.liger:
            fuse_gated_mlps(model)

    def _plan(self) -> hooks.ParallelPlan:
        """The parallel layer, as this module's ``parallel`` argument asks for it."""
        return hooks.parallel_plan(self.parallel)

    def _parallelize(self, model: nn.Module) -> nn.Module:
        """The parallel layer applies itself, in one place (:func:`hfbridge.parallel.parallelize.parallelize_model`):
        tensor/sequence parallelism, activation checkpointing, ``torch.compile``, FSDP2; without a device mesh,
        checkpointing and compile only. A meta-device model is then filled, each rank loading only its shards."""
        plan = self._plan()
        model = plan.parallelize(model, self._device_mesh, self.activation_checkpointing, self.compile_layers)
        if self._device_mesh is None:
            return model
        self._dp_mesh = plan.data_parallel_mesh(self._device_mesh)
        context_parallel = getattr(plan, "context_parallel", None)  # a plan may not split sequences
        self._context_parallel = context_parallel(self._device_mesh) if context_parallel is not None else None
        return model

    @property
    def context_length(self) -> int | None:
        config = getattr(self.model, "config", None)
        return loading.context_length(config) if config is not None else None

    # ----------------------------------------------------------------------------------------------- forward
    def _model_forward_keys(self) -> frozenset[str] | None:
        """The named arguments of the model's ``forward`` (``None``: it takes only ``*args/**kwargs``)."""
        if self._forward_keys is None:
            self._forward_keys = forward_keys(base_model(self.model))
        return self._forward_keys

    def _remove_extra_batch_keys(self, batch: dict, reserved_keys: Sequence[str] = ("labels", "loss_mask")) -> dict:
        """Keep only the keys the model's ``forward`` takes, plus ``reserved_keys``."""
        keys = self._model_forward_keys()
        if keys is None:
            return dict(batch)
        return {k: v for k, v in batch.items() if k in keys or k in reserved_keys}

    def forward(self, batch: dict):
        """Run the model on a batch. Loss keys (``labels``, ``loss_mask``) are not passed to the model: the loss
        is computed by ``loss_fn`` on already-shifted labels, never by the model's own (shifting) loss. NeMo's
        ``tokens`` key is taken as ``input_ids``."""
        inputs = self._remove_extra_batch_keys({k: v for k, v in with_input_ids(batch).items() if k not in LOSS_KEYS}, ())
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

    def _dp_sum(self, *values: float) -> list[float]:
        """``values`` summed over the data-parallel ranks (one all-reduce, in float64: counts stay exact)."""
        dp_size, group = self._dp_size_and_group()
        if dp_size == 1:
            return [float(v) for v in values]
        totals = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(totals, group=group)
        return totals.tolist()

    def _token_normalised_loss(self, mean_loss: torch.Tensor, n_micro: int, n_step: float) -> torch.Tensor:
        """Scale a micro-batch's mean loss so that the summed gradients equal the gradient of
        ``sum(all token losses of the step, all data-parallel ranks) / n_step`` (``n_step``: the step's label
        tokens over all data-parallel ranks).

        Lightning divides by ``accumulate_grad_batches`` and data-parallel reduction averages over ranks, so both
        are multiplied back.
        """
        dp_size, _ = self._dp_size_and_group()
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return mean_loss * (n_micro / max(n_step, 1.0) * dp_size * accumulate)

    def _split(self, sharded: bool = False) -> HeadSplit | None:
        """The model as backbone + linear head for the loss without full logits, or ``None`` (found once per model).

        ``sharded``: the caller computes the loss with :meth:`HeadSplit.loss` (inside the FSDP2 root's forward,
        across a vocabulary-split head), so a sharded model keeps the loss without full logits; callers that use
        the backbone and head apart leave it off and get ``None`` for a sharded model."""
        if not self.chunked_loss or self.loss_fn is not masked_cross_entropy:
            return None
        sharded = sharded and self._dp_mesh is not None  # off a mesh both ways are the same split
        if self._head_split is None or self._head_split[0] is not self.model or self._head_split[1] != sharded:
            split, reason = split_head(self.model, sharded=sharded)
            log.info("loss without full logits: %s (%s)", "on" if split else "off, full logits", reason)
            self._head_split = (self.model, sharded, split)
        return self._head_split[2]

    def _loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        """The mean loss over the batch's trained tokens, and their number (for training and validation)."""
        batch = with_input_ids(batch)
        context = self._context_parallel
        if context is not None:  # context parallelism: this rank's part of every sequence
            batch = context.shard(batch)
        labels, loss_mask = batch["labels"], batch.get("loss_mask")
        split = self._split(sharded=True)
        if split is None:
            mean_loss = self._call_loss_fn(self.forward(batch).logits, labels, loss_mask)
        else:  # inside the root's forward: on a mesh FSDP2 gathers the head, and a vocabulary-split head works
            chunk = 512 if self.chunked_loss is True else int(self.chunked_loss)
            inputs = {k: v for k, v in batch.items() if k not in LOSS_KEYS}
            mean_loss = split.loss(inputs, labels, loss_mask, chunk, self.liger)
        if context is not None:  # the loss and label tokens of the whole micro-batch, over the cp ranks
            return context.combine(mean_loss, count_label_tokens(labels, loss_mask))
        return mean_loss, count_label_tokens(labels, loss_mask)

    def _call_loss_fn(self, logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None):
        """``loss_fn`` on the full logits: as they are, or flattened as the seed hands them (``loss_fn_flat``)."""
        if not self.loss_fn_flat:
            return self.loss_fn(logits, labels, loss_mask)
        flat_mask = None if loss_mask is None else loss_mask.reshape(-1)
        return self.loss_fn(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), flat_mask)

    def training_step(self, batch: dict, batch_idx: int | None = None) -> torch.Tensor:
        """Loss of one micro-batch, normalised per label token of the whole optimizer step (all its micro-batches,
        all data-parallel ranks), so that gradient accumulation gives the gradients of one large batch.

        * A batch that says how many label tokens its step has (``num_label_tokens``, stamped by
          :class:`hfbridge.CausalLMDataModule`) is scaled by that total at once.
        * Any other batch (a plain ``DataLoader``): the step's total is not known before its last micro-batch, so
          normalisation is deferred. Each micro-batch of a step is scaled by the same provisional total (its first
          micro-batch's label tokens, summed over data-parallel ranks, times ``accumulate_grad_batches``), and
          once the step's last backward is done (in :meth:`optimizer_step`, before Lightning's
          ``on_before_optimizer_step`` hooks and gradient clipping) the gradients are multiplied by
          ``provisional / actual`` total: gradients are linear in the loss, so they are those of one large batch.
          The loss this method returns for such a batch is the provisionally scaled one; the logged ``train_loss``
          is exact.
        * Without a trainer (or with manual optimization) a batch is its own step: the mean over its tokens.

        Logs ``train_loss`` (the per-token loss of the optimizer step, over all data-parallel ranks) and ``lr``.
        """
        mean_loss, n_micro = self._loss(batch)
        n_step = batch.get(NUM_LABEL_TOKENS_KEY)
        if n_step is not None:
            if self._open_step is not None:
                raise ValueError(MIXED_STEP)
            n_step = int(n_step)
            self._log_train_loss(mean_loss.detach(), n_micro, n_step)
            (n_step_global,) = self._dp_sum(n_step)
            return self._token_normalised_loss(mean_loss, n_micro, n_step_global)
        if self._trainer is None or not self.automatic_optimization:
            return mean_loss
        return self._deferred_loss(mean_loss, n_micro, batch_idx)

    def _deferred_loss(self, mean_loss: torch.Tensor, n_micro: int, batch_idx: int | None) -> torch.Tensor:
        """A micro-batch's loss scaled by its step's provisional label-token total (see :meth:`training_step`)."""
        accumulate = self.trainer.accumulate_grad_batches
        if accumulate > 1 and self.trainer.strategy.handles_gradient_accumulation:
            raise ValueError(
                f"{type(self.trainer.strategy).__name__} accumulates gradients itself, so the label tokens of a whole "
                "optimizer step cannot be counted here: give every batch num_label_tokens (the step's total, as "
                "hfbridge.CausalLMDataModule does) or use accumulate_grad_batches=1"
            )
        if self._open_step is None:
            if self._step_tokens_seen:
                raise ValueError(MIXED_STEP)
            (first,) = self._dp_sum(n_micro)
            self._open_step = _OpenStep(estimate=max(first, 1.0) * accumulate)
        elif batch_idx is not None and batch_idx % accumulate == 0:  # Lightning starts a new step here
            raise RuntimeError(
                "the gradients of the previous optimizer step were never normalised: an override of optimizer_step "
                "must call super().optimizer_step(...) (HFAutoModelForCausalLM normalises there)"
            )
        step = self._open_step
        step.tokens += n_micro
        step.loss_sum += float(mean_loss.detach()) * n_micro
        self._log_lr()
        return self._token_normalised_loss(mean_loss, n_micro, step.estimate)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's optimizer step; a step accumulated from batches without ``num_label_tokens`` has its
        gradients normalised right after its last backward (:meth:`training_step`)."""
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

        def closure():
            result = optimizer_closure()
            self._close_step()
            return result

        return super().optimizer_step(epoch, batch_idx, optimizer, closure)

    def _close_step(self) -> None:
        """Rescale the gradients of the deferred step from its provisional to its actual label-token total."""
        step, self._open_step = self._open_step, None
        if step is None:
            return
        loss_sum, tokens = self._dp_sum(step.loss_sum, step.tokens)
        factor = step.estimate / max(tokens, 1.0)
        if factor != 1.0:
            with torch.no_grad():
                for p in self.parameters():
                    if p.grad is not None:
                        p.grad.mul_(factor)
        self._log_step_loss(loss_sum, tokens)

    def on_train_start(self) -> None:
        self._open_step = None
        self._step_loss_sum, self._step_tokens_seen = 0.0, 0

    def _log_train_loss(self, mean_loss: torch.Tensor, n_micro: int, n_step: int) -> None:
        if self._trainer is None:
            return
        self._step_loss_sum += float(mean_loss) * n_micro
        self._step_tokens_seen += n_micro
        if self._step_tokens_seen >= n_step:
            self._log_step_loss(*self._dp_sum(self._step_loss_sum, self._step_tokens_seen))
            self._step_loss_sum, self._step_tokens_seen = 0.0, 0
        self._log_lr()

    def _log_step_loss(self, loss_sum: float, tokens: float) -> None:
        """Log ``train_loss``, the per-token loss of the whole optimizer step: ``loss_sum`` and ``tokens`` are summed
        over the data-parallel ranks (every rank reaches the end of a step together), so it is the step's, not rank
        0's share."""
        self.log("train_loss", loss_sum / max(tokens, 1.0), prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=max(int(tokens), 1))

    def _log_lr(self) -> None:
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
        """Lightning's clipping; on a device mesh, the parallel plan's: by the global norm of gradients that live on
        several meshes (FSDP-only and tensor-parallel parameters), which ``torch.nn.utils.clip_grad_norm_`` cannot
        combine (also under a strategy other than :class:`hfbridge.parallel.MeshParallelStrategy`)."""
        if self._dp_mesh is None or not gradient_clip_val or gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self._plan().clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], gradient_clip_val)

    # ----------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, path: str | os.PathLike, merged: bool = False, overwrite: bool = False) -> Path:
        """Save the model and tokenizer as a folder plain transformers loads (``from_pretrained``).

        With an adapter, the adapter alone is saved (peft's ``PeftModel.from_pretrained`` loads it onto the base
        model), or with ``merged=True`` the model with the adapter merged into its weights. The folder appears only
        when complete; a non-empty ``path`` is refused unless ``overwrite`` (and even then only a folder hfbridge
        wrote is replaced). A tokenizer that cannot be loaded does not cost the trained weights: they are saved
        without it, with a warning.
        """
        if self.model is None:
            raise RuntimeError("no model to save: call configure_model() or fit first")
        path = Path(path)
        model = self.model
        if self._dp_mesh is not None:  # sharded: every rank gathers, rank 0 saves an unsharded copy
            model = self._plan().gather(self)
            if model is None:
                return path
        try:
            preprocessor = self._preprocessor()
        except (OSError, ValueError) as e:  # a missing tokenizer/processor must not cost the trained weights
            log.warning("saving the weights without a tokenizer: it cannot be loaded (%s)", e)
            preprocessor = None
        return save_hf_folder(model, path, preprocessor, merged=merged, overwrite=overwrite)

    def _preprocessor(self):
        """What turns inputs into model inputs (here the tokenizer), saved beside the model; ``None``: nothing."""
        if self._tokenizer is None and isinstance(self.model_name, nn.Module):
            return None
        return self.tokenizer


def _is_hf_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) or (is_peft_model(model))

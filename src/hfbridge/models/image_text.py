"""``HFAutoModelForImageTextToText``: a Lightning module around any Hugging Face image-text-to-text model and its
processor (seed 001).

It is :class:`hfbridge.HFAutoModelForCausalLM` with a processor instead of a tokenizer and
``AutoModelForImageTextToText`` instead of ``AutoModelForCausalLM``: loading, the dtype policy, 4-bit, adapters,
the loss (normalised per label token of the optimizer step), validation and saving are the same code.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from hfbridge.losses import masked_cross_entropy
from hfbridge.models import hooks, loading
from hfbridge.models.causal_lm import HFAutoModelForCausalLM
from hfbridge.models.peft_adapters import base_model
from hfbridge.models.tiny_image_text import DEMO_IMAGE_TEXT_MODEL, resolve_image_text_name
from hfbridge.optim import OptimizerConfig

log = logging.getLogger(__name__)


class _static_on_class:
    """A method that is static when called on the class (``Class.method(x)``, the seed's ``@staticmethod``) and
    bound when called on an instance (``instance.method(x=None)``): the function gets ``None`` or the instance
    as its first argument."""

    def __init__(self, function: Callable):
        self.function = function
        functools.update_wrapper(self, function)

    def __get__(self, instance, owner=None) -> Callable:
        return functools.partial(self.function, instance)


class HFAutoModelForImageTextToText(HFAutoModelForCausalLM):
    """A Lightning module around any Hugging Face image-text-to-text (vision-language) model.

    Args (the seed's, with its names):
        model_name: a hub id, a local HF folder, or a ``PreTrainedModel`` (then pass ``processor``). The seed's
            default ``'gpt2'`` is neither a vision-language model nor loadable without a hub, so the default is
            ``'tiny-random-vlm'``: a tiny LLaVA-architecture model with **random weights**, built once into the
            hfbridge cache, which shows the pipeline working (``tiny-random-vlm-idefics3``, ``-gemma3``,
            ``-paligemma`` and ``-mllama`` are the other tested families). Real weights come from a hub id or a
            folder.
        load_pretrained_weights: load the weights, or build the architecture from its config with random ones.
        processor: a Hugging Face processor (tokenizer, image processor, chat template); ``None`` loads the
            model's own (:meth:`configure_processor`).
        loss_fn: ``loss_fn(logits, labels, loss_mask)``, labels already next-token targets.
        model_transform: a callable applied to the loaded model (for example :class:`hfbridge.LoRA`).
        trust_remote_code: run code shipped with the model; off unless asked for.
        default_dtype: ``"auto"`` (default) is float32 on CPU and bfloat16 on GPUs that support it. The seed's
            default bfloat16 was measured 40x slower than float32 on CPU, hence the change.
        load_in_4bit: bitsandbytes NF4 weights for the language model; the vision tower, the projector and the
            output head stay in full precision (:func:`full_precision_modules`). With a LoRA transform this is QLoRA.

    hfbridge's own: ``freeze_language_model`` / ``freeze_vision_tower`` (no parameter of the language model and
    its output head, or of the vision tower, is trained; adapters inside them included), and the causal-LM
    module's ``model_accelerator``, ``attn_implementation``, ``optim``, ``chunked_loss``,
    ``activation_checkpointing``, ``compile``, ``liger``, and ``device_mesh`` / ``parallel`` (FSDP2 and tensor
    parallelism over a ``(dp, fsdp, tp, sp)`` mesh, as for causal LMs; see docs/distributed.md and
    docs/image_text.md).

    Batches are what :class:`hfbridge.data.image_text.ImageTextDataModule` serves: the processor's outputs
    (``input_ids``, ``attention_mask``, ``pixel_values``, ...) plus ``labels`` and ``num_label_tokens``.
    """

    def __init__(
        self,
        *,
        model_name: str | os.PathLike | nn.Module = DEMO_IMAGE_TEXT_MODEL,
        load_pretrained_weights: bool = True,
        processor=None,
        loss_fn: Callable = masked_cross_entropy,
        model_transform: Callable | None = None,
        trust_remote_code: bool = False,
        default_dtype: str | torch.dtype = "auto",
        load_in_4bit: bool = False,
        freeze_language_model: bool = False,
        freeze_vision_tower: bool = False,
        model_accelerator: Callable | None = None,
        attn_implementation: str = "sdpa",
        optim: OptimizerConfig | None = None,
        chunked_loss: bool | int = True,
        activation_checkpointing: bool | str | int = False,
        compile: bool = False,
        liger: bool = False,
        device_mesh=None,
        parallel=None,
    ):
        super().__init__(
            model_name=model_name, load_pretrained_weights=load_pretrained_weights, loss_fn=loss_fn,
            model_transform=model_transform, model_accelerator=model_accelerator,
            trust_remote_code=trust_remote_code, default_dtype=default_dtype, load_in_4bit=load_in_4bit,
            attn_implementation=attn_implementation, optim=optim, chunked_loss=chunked_loss,
            activation_checkpointing=activation_checkpointing, compile=compile, liger=liger,
            device_mesh=device_mesh, parallel=parallel,
        )
        self._processor = processor
        self.freeze_language_model = freeze_language_model
        self.freeze_vision_tower = freeze_vision_tower
        if str(model_name).startswith(DEMO_IMAGE_TEXT_MODEL):
            log.warning("%s has random weights: it shows the pipeline, not a trained model. Real weights come from a "
                        "hub id or a local folder (model_name=...)", model_name)

    # ----------------------------------------------------------------------------------------------- processor
    @property
    def processor(self):
        if self._processor is None:
            if isinstance(self.model_name, nn.Module):
                raise ValueError("model_name is a module, so there is no processor to load; pass processor=...")
            self._processor = self.configure_processor(self.model_name, self.trust_remote_code)
        return self._processor

    @processor.setter
    def processor(self, value):
        self._processor = value

    @property
    def tokenizer(self):
        """The processor's tokenizer."""
        return self.processor.tokenizer

    @staticmethod
    def configure_processor(model_name, trust_remote_code: bool = False):
        """The ``AutoProcessor`` of ``model_name`` (its tokenizer given a pad token: EOS when it has none)."""
        from transformers import AutoProcessor

        path = loading.resolve_model_path(resolve_image_text_name(model_name), trust_remote_code)
        try:
            processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (ImportError, AttributeError, ValueError, TypeError) as e:
            hint = ""
            if "torchvision" in str(e).lower() or "_extra_content" in str(e):
                hint = " This processor needs torchvision (for example for its video processor), which is not installed."
            raise ValueError(f"could not load the processor of {model_name} from {path}: {e}.{hint}") from e
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or not hasattr(processor, "image_processor"):
            raise ValueError(
                f"{model_name} has no multimodal processor (AutoProcessor gave {type(processor).__name__}); "
                "is it an image-text-to-text model?"
            )
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return processor

    @_static_on_class
    def extract_skipped_token_ids(self, tokenizer=None) -> torch.IntTensor:
        """Token ids never trained as targets (image, video, padding and structural special tokens; never the
        end-of-turn token). See :func:`hfbridge.data.image_text.skipped_token_ids` (reached through
        :mod:`hfbridge.models.hooks`).

        As in the seed, a static method of the class: ``HFAutoModelForImageTextToText.extract_skipped_token_ids(
        tokenizer)`` takes a tokenizer or a processor. On a module, ``tokenizer`` is optional: without it (or given
        this module's own tokenizer) the ids come from this module's processor, which also names its image tokens.
        """
        if tokenizer is None:
            if self is None:
                raise TypeError("extract_skipped_token_ids() called on the class needs a tokenizer or a processor")
            return hooks.skipped_token_ids(self.processor)
        if self is not None and tokenizer is self.processor.tokenizer:
            return hooks.skipped_token_ids(self.processor)
        return hooks.skipped_token_ids(tokenizer)

    # ----------------------------------------------------------------------------------------------- model
    def _after_transform(self, model: nn.Module) -> None:
        """The freezing options, applied before the model is sharded (FSDP2 then keeps frozen parameters out of
        the optimizer's way) and on the meta-device skeleton alike."""
        base = base_model(model)
        if self.freeze_vision_tower:
            tower = base.get_encoder(modality="image")
            if tower is base or tower is getattr(base, "model", None):
                raise ValueError(f"cannot find the vision tower of {type(base).__name__} to freeze")
            tower.requires_grad_(False)
        if self.freeze_language_model:
            decoder = base.get_decoder()
            if decoder is base or decoder is getattr(base, "model", None):
                raise ValueError(f"cannot find the language model of {type(base).__name__} to freeze")
            decoder.requires_grad_(False)
            head = base.get_output_embeddings()
            if head is not None:
                head.requires_grad_(False)

    def _load_model(self, auto_class=None, model_name=None) -> nn.Module:
        """The model; a 4-bit one keeps its vision tower and projector in full precision
        (:func:`full_precision_modules`)."""
        from transformers import AutoModelForImageTextToText

        auto_class = auto_class or AutoModelForImageTextToText
        name = resolve_image_text_name(self.model_name if model_name is None else model_name)
        if not self.load_in_4bit or not self.load_pretrained_weights or self._device_mesh is not None:
            return super()._load_model(auto_class, name)  # (a mesh refuses 4-bit weights; so does a random init)
        path = loading.resolve_model_path(name, self.trust_remote_code)
        with torch.device("meta"):  # the architecture alone, to name its modules
            skeleton = auto_class.from_config(loading.load_config(path, self.trust_remote_code),
                                              trust_remote_code=self.trust_remote_code)
        keep = full_precision_modules(skeleton)
        log.info("4-bit: keeping %s in full precision", ", ".join(keep))
        return loading.load_pretrained_model(
            path, auto_class=auto_class, dtype=self.default_dtype, attn_implementation=self.attn_implementation,
            load_in_4bit=True, trust_remote_code=self.trust_remote_code, quantization_skip_modules=keep,
        )

    # ----------------------------------------------------------------------------------------------- forward
    def _model_forward_keys(self) -> frozenset[str] | None:
        """The model's named forward arguments, plus ``use_cache`` where its forward passes ``**kwargs`` on to the
        language model (LLaVA's): see :func:`_no_cache_keys`."""
        return _no_cache_keys(super()._model_forward_keys(), base_model(self.model))

    def _split(self, *args, **kwargs):
        """The causal LM's backbone/head split, its backbone also told ``use_cache=False`` (:func:`_no_cache_keys`)."""
        split = super()._split(*args, **kwargs)
        if split is not None:
            split.keys = _no_cache_keys(split.keys, split.backbone)
        return split

    def _preprocessor(self):
        """The processor (tokenizer, image processor, chat template), saved beside the model."""
        if self._processor is not None or not isinstance(self.model_name, nn.Module):
            return self.processor
        return None


def _no_cache_keys(keys: frozenset[str] | None, module: nn.Module) -> frozenset[str] | None:
    """``keys`` (a forward's named arguments, to which a batch is cut) with ``use_cache`` added when ``module``'s
    forward does not name it but passes ``**kwargs`` on (LLaVA's, to its language model), so that training passes
    ``use_cache=False``. Without it the language model takes ``use_cache`` from its config: it fills a KV cache
    nobody reads, and transformers builds no per-sample mask for restarting ``position_ids`` when there is a cache
    (``masking_utils``: packed sequences are detected only without one), so packed samples would attend to each
    other."""
    if keys is None or "use_cache" in keys:
        return keys
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return keys
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return keys | {"use_cache"}
    return keys


def full_precision_modules(model: nn.Module) -> list[str]:
    """Names of the modules of a vision-language model that a 4-bit load keeps in full precision (bitsandbytes'
    ``llm_int8_skip_modules``), found from the model rather than listed per family:

    * the vision tower: transformers' ``get_encoder(modality="image")``;
    * the projector (connector) between it and the language model: every other child, holding parameters, of the
      module that holds the language model (``get_decoder()``): LLaVA's ``multi_modal_projector``, Idefics3's
      ``connector``, ...;
    * transformers' own defaults, which an explicit list replaces: the output head, tied weights and the last
      module (``transformers.quantizers.base.get_keys_to_not_convert``).

    The language model's linear layers are what 4-bit quantizes; a model whose vision tower cannot be found keeps
    only the defaults (with a warning).
    """
    from transformers.quantizers.base import get_keys_to_not_convert

    names = {id(m): name for name, m in model.named_modules()}
    keep = list(get_keys_to_not_convert(model))
    try:
        decoder, tower = model.get_decoder(), model.get_encoder(modality="image")
    except (AttributeError, TypeError, ValueError):  # remote code without transformers' accessors
        decoder = tower = None
    if decoder is None or tower is None or decoder is model or tower is model or id(tower) not in names:
        log.warning("4-bit: cannot find the vision tower and language model of %s; every linear layer but the "
                    "output head is quantized", type(model).__name__)
        return sorted(set(keep))
    holder = next(m for m in model.modules() if any(child is decoder for child in m.children()))
    keep.append(names[id(tower)])
    keep += [names[id(child)] for child in holder.children()
             if child is not decoder and child is not tower and any(True for _ in child.parameters())]
    return sorted(set(keep))


# --------------------------------------------------------------------------------------------------- generation

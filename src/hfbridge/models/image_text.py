"""``HFAutoModelForImageTextToText``: a Lightning module around any Hugging Face image-text-to-text model and its
processor (seed 001).

It is :class:`hfbridge.HFAutoModelForCausalLM` with a processor instead of a tokenizer and
``AutoModelForImageTextToText`` instead of ``AutoModelForCausalLM``: loading, the dtype policy, 4-bit, adapters,
the loss (normalised per label token of the optimizer step), validation and saving are the same code.
"""

from __future__ import annotations

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


class HFAutoModelForImageTextToText(HFAutoModelForCausalLM):
    """A Lightning module around any Hugging Face image-text-to-text (vision-language) model.

    Args (the seed's, with its names):
        model_name: a hub id, a local HF folder, or a ``PreTrainedModel`` (then pass ``processor``). The seed's
            default ``'gpt2'`` is neither a vision-language model nor loadable without a hub, so the default is
            ``'tiny-random-vlm'``: a tiny LLaVA-architecture model with **random weights**, built once into the
            hfbridge cache, which shows the pipeline working (``tiny-random-vlm-idefics3`` and
            ``tiny-random-vlm-gemma3`` are the other tested families). Real weights come from a hub id or a folder.
        load_pretrained_weights: load the weights, or build the architecture from its config with random ones.
        processor: a Hugging Face processor (tokenizer, image processor, chat template); ``None`` loads the
            model's own (:meth:`configure_processor`).
        loss_fn: ``loss_fn(logits, labels, loss_mask)``, labels already next-token targets.
        model_transform: a callable applied to the loaded model (for example :class:`hfbridge.LoRA`).
        trust_remote_code: run code shipped with the model; off unless asked for.
        default_dtype: ``"auto"`` (default) is float32 on CPU and bfloat16 on GPUs that support it. The seed's
            default bfloat16 was measured 40x slower than float32 on CPU, hence the change.
        load_in_4bit: bitsandbytes NF4 weights; with a LoRA transform this is QLoRA.

    hfbridge's own: ``freeze_language_model`` / ``freeze_vision_tower`` (no parameter of the language model and
    its output head, or of the vision tower, is trained; adapters inside them included), and the causal-LM
    module's ``model_accelerator``, ``attn_implementation``, ``optim``, ``chunked_loss``,
    ``activation_checkpointing``, ``compile``, ``liger``, and ``device_mesh`` / ``parallel`` (FSDP2 over a ``(dp, fsdp, tp, sp)`` mesh, as for causal LMs; see
    docs/distributed.md).

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

    def extract_skipped_token_ids(self, tokenizer=None) -> torch.IntTensor:
        """Token ids never trained as targets (image, video, padding and structural special tokens; never the
        end-of-turn token), derived from this module's processor, or from ``tokenizer`` when it is another one.
        See :func:`hfbridge.data.image_text.skipped_token_ids` (reached through :mod:`hfbridge.models.hooks`)."""
        if tokenizer is None or tokenizer is self.processor.tokenizer:
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
        from transformers import AutoModelForImageTextToText

        name = self.model_name if model_name is None else model_name
        return super()._load_model(auto_class or AutoModelForImageTextToText, resolve_image_text_name(name))

    def _preprocessor(self):
        """The processor (tokenizer, image processor, chat template), saved beside the model."""
        if self._processor is not None or not isinstance(self.model_name, nn.Module):
            return self.processor
        return None


# --------------------------------------------------------------------------------------------------- generation

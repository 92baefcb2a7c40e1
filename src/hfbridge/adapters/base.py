"""Base classes giving Hugging Face functionality to PyTorch-native modules (seed 004, IBM FMS "Huggingface Adapters").

An :class:`HFModelArchitecture` is a transformers ``PreTrainedModel`` composed of an embedding (passed to its
sub-modules), an :class:`HFEncoder` and/or :class:`HFDecoder` that adapt the native model's forward to transformers'
arguments, and an optional head ``lm_head`` (absent: a base model). Users extend one of
:class:`HFDecoderModelArchitecture`, :class:`HFEncoderModelArchitecture` or :class:`HFEncoderDecoderModelArchitecture`
and write one method, ``_adapt``, per encoder/decoder.

An embedding or head that already lives inside the native model is not registered a second time: the attribute
(``model.embedding``, ``model.lm_head``) points at the module where it lives, so the state dict has each weight once,
under the native model's own names (``decoder.model.tok_embeddings.weight``, ...).
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    ModelOutput,
    Seq2SeqModelOutput,
)

from hfbridge.adapters.cache import NativeCache, output_cache, with_cache
from hfbridge.adapters.decoding import NativeGenerationMixin

CACHE_MODES = ("auto", "none", "internal", "hf")
CACHE_ARGUMENTS = ("past_key_values", "cache")  # the names an ``_adapt`` may give a transformers cache
_PART_NAMES = ("embedding", "lm_head")


class AdapterError(TypeError):
    """An ``_adapt`` that cannot be used as written (it returns no HF output dataclass, or lacks an input)."""


# ============================================================================================ encoder / decoder
class _Adapter(nn.Module):
    """Shared by :class:`HFEncoder` and :class:`HFDecoder`: holds the native ``model`` and calls ``_adapt``."""

    main_input_name = "input_ids"

    def __init__(self, model: nn.Module, config: PretrainedConfig, *args, **kwargs):
        super().__init__()
        self.model = model
        self.config = config

    def _adapt(self, input_ids: torch.Tensor | None = None, *args, **kwargs) -> ModelOutput:
        """Run the native model with transformers' arguments (plus the model's own); return an HF output dataclass
        (``BaseModelOutput...`` with ``last_hidden_state``, or an output with ``logits``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _adapt(self, input_ids=None, ..., **kwargs)")

    def _adapt_parameters(self) -> tuple[set[str], bool]:
        params = inspect.signature(self._adapt).parameters.values()
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return named, any(p.kind == p.VAR_KEYWORD for p in params)

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs) -> ModelOutput:
        """Call ``_adapt`` with the arguments it takes (all of them if it takes ``**kwargs``) and check its output."""
        named, var_kw = self._adapt_parameters()
        for key in ("return_dict", "output_attentions", "output_hidden_states"):
            if key not in named and not kwargs.get(key):
                kwargs.pop(key, None)
        if kwargs.get("inputs_embeds") is not None and "inputs_embeds" not in named:
            raise AdapterError(f"{type(self).__name__}._adapt takes no inputs_embeds; pass input_ids")
        passed = kwargs if var_kw else {k: v for k, v in kwargs.items() if k in named}
        output = self._adapt(input_ids=input_ids, **passed)
        return check_adapter_output(output, type(self).__name__)


def check_adapter_output(output: Any, owner: str) -> ModelOutput:
    """``output`` if it is an HF output dataclass with ``last_hidden_state`` or ``logits``, else a clear error."""
    if not isinstance(output, ModelOutput):
        raise AdapterError(
            f"{owner}._adapt returned {type(output).__name__}, not a transformers output dataclass; wrap the native "
            "output, e.g. `return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states)` "
            "(or an output with `logits=` when the native model applies its own head)"
        )
    if getattr(output, "last_hidden_state", None) is None and getattr(output, "logits", None) is None:
        raise AdapterError(
            f"{owner}._adapt returned {type(output).__name__} with neither last_hidden_state nor logits set"
        )
    return output


class HFEncoder(_Adapter):
    """Adapts a native encoder: ``_adapt(input_ids=None, attention_mask=None, <model args>, **kwargs)`` returns e.g.
    ``BaseModelOutput(last_hidden_state=...)``."""


class HFDecoder(_Adapter):
    """Adapts a native decoder: ``_adapt(input_ids=None, <model args>, **kwargs)`` returns e.g.
    ``BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=...)``.

    How generation caches keys and values is read from ``_adapt``'s named parameters (``cache_mode = "auto"``), or
    set ``cache_mode`` on the class. hfbridge's decoding loop (``generate``) and the wrapper's forward follow it:

    * ``"internal"`` (``_adapt`` names ``start_pos``): the native model keeps its own KV cache indexed by
      ``start_pos``; each step passes only the new tokens and ``start_pos`` = tokens already seen.
    * ``"hf"`` (``_adapt`` names ``past_key_values``, or ``cache``): the native model uses transformers cache
      objects, handed over under the name ``_adapt`` declares: a ``DynamicCache`` (an ``EncoderDecoderCache`` in an
      encoder-decoder) to update in place with ``cache.update(k, v, layer_idx)``. Beam search reorders it with its
      public ``reorder_cache``.
    * ``"none"``: the native model keeps no cache; each generation step recomputes the whole sequence.

    For beam search with an internal cache, override :meth:`reorder_cache` to reorder the native cache; otherwise
    the step after a reordering recomputes the whole sequence from ``start_pos=0`` (correct, slower).
    """

    cache_mode: str = "auto"

    @property
    def resolved_cache_mode(self) -> str:
        mode = type(self).cache_mode
        if mode not in CACHE_MODES:
            raise ValueError(f"{type(self).__name__}.cache_mode={mode!r}; choose one of {CACHE_MODES}")
        if mode != "auto":
            return mode
        named, _ = self._adapt_parameters()
        if "start_pos" in named:
            return "internal"
        if named & set(CACHE_ARGUMENTS):
            return "hf"
        return "none"

    @property
    def cache_argument(self) -> str:
        """The name under which ``_adapt`` takes a transformers cache (cache mode ``"hf"``)."""
        named, _ = self._adapt_parameters()
        return next((name for name in CACHE_ARGUMENTS if name in named), CACHE_ARGUMENTS[0])

    def reorder_cache(self, beam_idx: torch.Tensor) -> bool:
        """Reorder the native model's own KV cache along the batch (``cache[:n] = cache[beam_idx]``) and return
        ``True``; the default returns ``False``: the next step recomputes the sequence instead."""
        return False


# ============================================================================================ architectures
class HFModelArchitecture(PreTrainedModel):
    """A transformers ``PreTrainedModel`` around native modules: an ``embedding`` and an optional ``lm_head``.

    Subclasses register their encoder/decoder through ``parts``. The head is given (``lm_head=``) or built by an
    :class:`~hfbridge.adapters.heads.LMHeadMixin` (``_lm_head``), tied to the embedding when
    ``config.tie_word_embeddings``. Native modules keep their own initialisation: the model is built on a real
    device (not on ``meta``) and ``from_pretrained`` then loads the saved weights over it.
    """

    config_class = PretrainedConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _generative_head = False  # set by the generation heads; a base model (no head) cannot generate
    # The native model attends its own way; accept configs that name sdpa (e.g. one shared with an HF model).
    _supports_sdpa = True

    def __init__(
        self,
        embedding: nn.Module | None,
        config: PretrainedConfig,
        *args,
        lm_head: nn.Module | None = None,
        _lm_head_params: dict | None = None,
        parts: dict[str, nn.Module] | None = None,
        **kwargs,
    ):
        if args or kwargs:
            extra = [repr(a) for a in args] + list(kwargs)
            raise TypeError(f"{type(self).__name__}: unexpected arguments {', '.join(extra)}")
        super().__init__(config)
        self._part_paths: dict[str, str] = {}
        for name, module in (parts or {}).items():
            self.add_module(name, module)
        self.embedding = embedding
        if lm_head is None and _lm_head_params is not None:
            lm_head = self._lm_head(**_lm_head_params)
        self.lm_head = lm_head
        self._declare_shared_parameters()
        self.post_init()

    # ---------------------------------------------------------------------------------------- parts
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PART_NAMES and "_part_paths" in self.__dict__:
            self._set_part(name, value)
        else:
            super().__setattr__(name, value)

    def _set_part(self, name: str, module: nn.Module | None) -> None:
        """Register ``module`` as ``name``, or, if it already lives inside the model, point ``name`` at it."""
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"{name} must be an nn.Module or None, got {type(module).__name__}")
        old_path = self._part_paths.pop(name, None)
        self._modules.pop(name, None)
        if module is None:
            return
        path = self._find_path(module, exclude=name)
        if path is not None:
            self._part_paths[name] = path
        elif old_path is not None:  # replacing a part that lives in the native model: replace it there too
            parent, _, child = old_path.rpartition(".")
            setattr(self.get_submodule(parent) if parent else self, child, module)
            self._part_paths[name] = old_path
        else:
            self._modules[name] = module

    def _find_path(self, module: nn.Module, exclude: str) -> str | None:
        for path, sub in self.named_modules(remove_duplicate=False):
            if sub is module and path and path != exclude and not path.startswith(exclude + "."):
                return path
        return None

    def _get_part(self, name: str) -> nn.Module | None:
        path = self.__dict__.get("_part_paths", {}).get(name)
        if path is not None:
            return self.get_submodule(path)
        return self._modules.get(name)

    @property
    def embedding(self) -> nn.Module | None:
        return self._get_part("embedding")

    @property
    def lm_head(self) -> nn.Module | None:
        return self._get_part("lm_head")

    def get_input_embeddings(self) -> nn.Module | None:
        return self.embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embedding = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def _lm_head(self, **params) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} has no head mixin to build an lm_head; pass lm_head=...")

    # ---------------------------------------------------------------------------------------- weights
    def _declare_shared_parameters(self) -> None:
        """Parameters shared by two names (a tied head, or ties inside the native model) are saved once; declare
        the aliases so ``save_pretrained`` drops them and loading re-ties them."""
        first: dict[int, str] = {}
        shared: dict[str, str] = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            if id(param) in first:
                if first[id(param)] != name:
                    shared[name] = first[id(param)]
            else:
                first[id(param)] = name
        self._shared_parameters = shared
        if shared:
            self._tied_weights_keys = {**(type(self)._tied_weights_keys or {}), **shared}
            ignore = {f"^{re.escape(k)}$" for k in shared}
            self._keys_to_ignore_on_load_missing = set(type(self)._keys_to_ignore_on_load_missing or ()) | ignore

    def tie_weights(self, *args, **kwargs):
        super().tie_weights(*args, **kwargs)
        for alias, source in getattr(self, "_shared_parameters", {}).items():
            param = self.get_parameter(source)
            parent, _, pname = alias.rpartition(".")
            module = self.get_submodule(parent) if parent else self
            if getattr(module, pname) is not param:
                setattr(module, pname, param)

    def _init_weights(self, module: nn.Module) -> None:
        """Native modules keep the initialisation their constructors gave them."""

    @classmethod
    def get_init_context(cls, dtype, *args, **kwargs):
        """Build on a real device: native constructors compute tensors (RoPE tables, caches) that must not be on
        ``meta``; ``from_pretrained`` then loads the saved weights over the constructed model."""
        contexts = super().get_init_context(dtype, *args, **kwargs)
        return [c for c in contexts if not (isinstance(c, torch.device) and c.type == "meta")]

    def _move_missing_keys_from_meta_to_device(self, *args, **kwargs) -> None:
        """Nothing is on ``meta`` (see :meth:`get_init_context`): missing weights keep their constructor values."""

    @classmethod
    def can_generate(cls) -> bool:
        return bool(cls._generative_head)

    def _new_transformers_cache(self) -> Cache:
        """The empty transformers cache a decoder in cache mode ``"hf"`` starts from."""
        return DynamicCache()

    # ---------------------------------------------------------------------------------------- decoding
    def _decode(
        self,
        decoder: HFDecoder,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> tuple[ModelOutput, Cache | None]:
        """Run ``decoder`` for the new tokens ``input_ids``, keeping generation state per its cache mode.

        ``past_key_values`` (or ``cache=``, transformers 5.24's name) is the state of earlier calls: a
        :class:`NativeCache` or a transformers cache. Returns the adapter's output (for the new tokens only) and the
        state to hand to the next call.
        """
        if "cache" in kwargs:
            if past_key_values is not None:
                raise ValueError(f"{type(self).__name__}: pass either past_key_values or cache, not both")
            past_key_values = kwargs.pop("cache")
        mode = decoder.resolved_cache_mode
        if use_cache is None:
            use_cache = past_key_values is not None or (
                not self.training and bool(getattr(self.config, "use_cache", True))
            )
        if mode == "hf":
            if use_cache and past_key_values is None:
                past_key_values = self._new_transformers_cache()
            cache = past_key_values if use_cache else None
            if position_ids is None and input_ids is not None:
                past = cache.get_seq_length() if cache is not None else 0
                position_ids = _positions_for_new_tokens(None, attention_mask, past, input_ids.shape[1], input_ids.device)
            kwargs[decoder.cache_argument] = cache
            output = decoder(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                             **kwargs)
            returned = output_cache(output)
            return output, (returned if returned is not None else cache)
        if input_ids is None:
            raise ValueError(f"{type(self).__name__}: input_ids are required")

        cache = _adopt_native_cache(past_key_values, decoder) if use_cache else None
        n_new = input_ids.shape[1]
        past = 0 if cache is None else cache.get_seq_length()
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] != past + n_new:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens; expected {past} seen + {n_new} new"
            )
        new_positions = _positions_for_new_tokens(position_ids, attention_mask, past, n_new, input_ids.device)
        incremental = (
            mode == "internal" and past > 0 and not cache.needs_recompute
            and getattr(decoder, "_native_cache_owner", None) == cache.serial
        )
        if past == 0 or incremental:
            tokens, positions, start_pos = input_ids, new_positions, past
        else:  # recompute the whole sequence from the token history
            tokens = torch.cat([cache.tokens.to(input_ids.device), input_ids], dim=-1)
            old = cache.positions
            if old is None:
                old = torch.arange(past, device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], -1)
            positions = torch.cat([old.to(new_positions.device), new_positions.expand(input_ids.shape[0], -1)], -1)
            start_pos = 0
        call = dict(kwargs, attention_mask=attention_mask, position_ids=positions, use_cache=use_cache)
        if mode == "internal":
            call["start_pos"] = start_pos
        output = decoder(tokens, **call)
        if mode == "internal":
            decoder._native_cache_owner = cache.serial if cache is not None else None
        if tokens.shape[1] != n_new:
            output = _last_positions(output, n_new)
        if cache is not None:
            cache.append(input_ids, new_positions.expand(input_ids.shape[0], -1))
            cache.needs_recompute = False
        return output, cache


def _adopt_native_cache(past_key_values: Cache | None, decoder: HFDecoder) -> NativeCache:
    """The ``NativeCache`` of this generation: the one given, or a new one for an empty transformers cache."""
    if isinstance(past_key_values, NativeCache):
        return past_key_values
    if past_key_values is not None:
        if not isinstance(past_key_values, Cache) or past_key_values.get_seq_length() > 0:
            raise ValueError(
                f"{type(decoder).__name__} keeps no transformers KV cache (cache_mode="
                f"{decoder.resolved_cache_mode!r}), so it cannot continue from a filled {type(past_key_values).__name__}; "
                "pass the whole sequence without past_key_values"
            )
    return NativeCache(reorder_hook=decoder.reorder_cache)


def _positions_for_new_tokens(position_ids, attention_mask, past: int, n_new: int, device) -> torch.Tensor:
    """Positions of the new tokens: as given, else from the attention mask (left padding), else past..past+n."""
    if position_ids is not None:
        return position_ids[..., -n_new:]
    if attention_mask is not None and attention_mask.dim() == 2:
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.masked_fill(attention_mask == 0, 0)[:, -n_new:]
    return torch.arange(past, past + n_new, device=device).unsqueeze(0)


def _last_positions(output: ModelOutput, n: int) -> ModelOutput:
    for key in ("last_hidden_state", "logits"):
        value = getattr(output, key, None)
        if value is not None:
            output[key] = value[:, -n:]
    return output


class HFDecoderModelArchitecture(HFModelArchitecture, NativeGenerationMixin):
    """A decoder-only model: ``HFDecoderModelArchitecture(decoder, embedding, config)``."""

    def __init__(self, decoder: HFDecoder, embedding: nn.Module | None, config: PretrainedConfig, *args, **kwargs):
        if not isinstance(decoder, HFDecoder):
            raise TypeError(f"decoder must be an HFDecoder, got {type(decoder).__name__}")
        super().__init__(embedding, config, *args, parts={"decoder": decoder}, **kwargs)

    def get_decoder(self) -> HFDecoder:
        return self.decoder

    def _run(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
             use_cache=None, **kwargs) -> tuple[ModelOutput, Cache | None]:
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        return self._decode(self.decoder, input_ids, attention_mask, position_ids, past_key_values, use_cache, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """The decoder's hidden states (``last_hidden_state``) and cache (``past_key_values``)."""
        output, cache = self._run(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                                  **kwargs)
        result = with_cache(
            BaseModelOutputWithPast, cache, last_hidden_state=getattr(output, "last_hidden_state", None),
            hidden_states=getattr(output, "hidden_states", None), attentions=getattr(output, "attentions", None),
        )
        return result if return_dict is not False else result.to_tuple()


class HFEncoderModelArchitecture(HFModelArchitecture):
    """An encoder-only model: ``HFEncoderModelArchitecture(encoder, embedding, config)``."""

    def __init__(self, encoder: HFEncoder, embedding: nn.Module | None, config: PretrainedConfig, *args, **kwargs):
        if not isinstance(encoder, HFEncoder):
            raise TypeError(f"encoder must be an HFEncoder, got {type(encoder).__name__}")
        super().__init__(embedding, config, *args, parts={"encoder": encoder}, **kwargs)

    def get_encoder(self, modality: str | None = None) -> HFEncoder:
        return self.encoder

    def _run(self, input_ids=None, attention_mask=None, **kwargs) -> ModelOutput:
        kwargs.pop("use_cache", None)
        kwargs.pop("past_key_values", None)
        return self.encoder(input_ids, attention_mask=attention_mask, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """The encoder's hidden states (``last_hidden_state``)."""
        output = self._run(input_ids, attention_mask, **kwargs)
        result = BaseModelOutput(
            last_hidden_state=output.last_hidden_state, hidden_states=getattr(output, "hidden_states", None),
            attentions=getattr(output, "attentions", None),
        )
        return result if return_dict is not False else result.to_tuple()


class HFEncoderDecoderModelArchitecture(HFModelArchitecture, NativeGenerationMixin):
    """An encoder-decoder model: ``HFEncoderDecoderModelArchitecture(encoder, decoder, embedding, config)``.

    The decoder's ``_adapt`` receives ``encoder_hidden_states`` and ``encoder_attention_mask`` besides its own
    ``input_ids`` (the decoder input ids) and ``attention_mask`` (the decoder's).
    """

    def __init__(
        self, encoder: HFEncoder, decoder: HFDecoder, embedding: nn.Module | None, config: PretrainedConfig,
        *args, **kwargs,
    ):
        if not isinstance(encoder, HFEncoder):
            raise TypeError(f"encoder must be an HFEncoder, got {type(encoder).__name__}")
        if not isinstance(decoder, HFDecoder):
            raise TypeError(f"decoder must be an HFDecoder, got {type(decoder).__name__}")
        config.is_encoder_decoder = True
        super().__init__(embedding, config, *args, parts={"encoder": encoder, "decoder": decoder}, **kwargs)

    def get_encoder(self, modality: str | None = None) -> HFEncoder:
        return self.encoder

    def get_decoder(self) -> HFDecoder:
        return self.decoder

    def _new_transformers_cache(self) -> Cache:
        """Self-attention and cross-attention caches, as transformers' encoder-decoder models take them."""
        return EncoderDecoderCache(DynamicCache(), DynamicCache())

    def _run(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
             decoder_position_ids=None, encoder_outputs=None, past_key_values=None, use_cache=None,
             **kwargs) -> tuple[ModelOutput, ModelOutput, Cache | None]:
        for key in ("output_attentions", "output_hidden_states", "return_dict"):
            kwargs.pop(key, None)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids, attention_mask=attention_mask)
        elif not isinstance(encoder_outputs, ModelOutput):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
        if decoder_input_ids is None:
            raise ValueError(f"{type(self).__name__}: decoder_input_ids (or labels) are required")
        decoded, cache = self._decode(
            self.decoder, decoder_input_ids, decoder_attention_mask, decoder_position_ids, past_key_values, use_cache,
            encoder_hidden_states=encoder_outputs.last_hidden_state, encoder_attention_mask=attention_mask, **kwargs,
        )
        return encoder_outputs, decoded, cache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        encoder_outputs: ModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Seq2SeqModelOutput:
        """Encode ``input_ids`` (unless ``encoder_outputs`` are given), then decode ``decoder_input_ids``."""
        encoded, decoded, cache = self._run(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, decoder_position_ids,
            encoder_outputs, past_key_values, use_cache, **kwargs,
        )
        result = with_cache(
            Seq2SeqModelOutput, cache, last_hidden_state=getattr(decoded, "last_hidden_state", None),
            encoder_last_hidden_state=encoded.last_hidden_state,
        )
        return result if return_dict is not False else result.to_tuple()

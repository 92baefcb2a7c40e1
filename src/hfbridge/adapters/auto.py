"""``to_hf_api``: wrap a native decoder as a transformers causal LM with no adapter code.

The native ``forward`` is read from its signature: the token ids (``input_ids``, ``tokens``, ``idx``, ``x``, ... or
the first required parameter), and optionally positions (``position_ids``, ``positions``, ``pos``), a start
position for a cache kept inside the model (``start_pos``, ``offset``), a 2-D padding mask (``attention_mask``,
``padding_mask``, ``mask``: 1 = attend, 0 = padding) and a transformers ``Cache`` (``past_key_values``, ``cache``,
``kv_cache``, ``past``: updated in place with ``cache.update(k, v, layer_idx)``). Any other parameter must have a
default. One forward on two tokens tells whether it returns logits or hidden states (a tensor, or the first tensor
of a tuple, or ``logits``/``last_hidden_state`` of a dict).

The config is inferred from the module: vocabulary and hidden size from the token embedding, the number of layers
from the largest list of identical blocks (or an RNN's ``num_layers``, or an ``n_layers``-like attribute), the
context from a ``max_seq_len``/``block_size``-like attribute or the position embedding. Whatever cannot be inferred
is named in the error, with the keyword that supplies it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from hfbridge.adapters.base import HFDecoder, HFDecoderModelArchitecture
from hfbridge.adapters.heads import LMHeadModelLMHeadMixin

log = logging.getLogger(__name__)

TOKEN_NAMES = ("input_ids", "tokens", "token_ids", "idx", "ids", "x", "inputs", "input", "src")
POSITION_NAMES = ("position_ids", "positions", "pos", "input_pos", "pos_ids")
START_POS_NAMES = ("start_pos", "offset", "past_length", "start_index")
MASK_NAMES = ("attention_mask", "padding_mask", "mask")
CACHE_NAMES = ("past_key_values", "cache", "kv_cache", "past", "layer_past")
USE_CACHE_NAMES = ("use_cache",)

_LAYER_ATTRS = ("num_hidden_layers", "n_layers", "num_layers", "n_layer")
_HIDDEN_ATTRS = ("hidden_size", "dim", "n_embd", "d_model", "embed_dim")
_VOCAB_ATTRS = ("vocab_size", "n_vocab")
_CONTEXT_ATTRS = ("max_position_embeddings", "max_seq_len", "block_size", "n_positions", "n_ctx", "context_length")
_CONFIG_HOLDERS = ("params", "config", "args", "cfg")


class NativeMappingError(ValueError):
    """A native module that ``to_hf_api`` cannot map to transformers' API."""


@dataclass
class ForwardSpec:
    """Which native ``forward`` parameter plays which transformers role, and what the forward returns."""

    tokens: str
    positions: str | None = None
    start_pos: str | None = None
    mask: str | None = None
    cache: str | None = None
    use_cache: str | None = None
    cache_mode: str = "none"  # "hf" (transformers Cache), "internal" (start_pos), "none" (recompute)
    output: str | None = None  # "logits" or "hidden"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> ForwardSpec:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _forward_name(module: nn.Module) -> str:
    try:
        return f"{type(module).__name__}.forward{inspect.signature(module.forward)}"
    except (TypeError, ValueError):
        return f"{type(module).__name__}.forward"


def map_forward(module: nn.Module, cache: str = "auto") -> ForwardSpec:
    """Read ``module.forward``'s signature into a :class:`ForwardSpec` (``output`` left to :func:`probe_output`).

    ``cache``: ``"auto"`` prefers a transformers-cache parameter, then a start position, then none; or force one
    of ``"hf"``, ``"internal"``, ``"none"``.
    """
    params = [
        p for p in inspect.signature(module.forward).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    names = [p.name for p in params]

    def pick(candidates: tuple[str, ...], taken: set[str]) -> str | None:
        return next((n for n in candidates if n in names and n not in taken), None)

    tokens = pick(TOKEN_NAMES, set())
    if tokens is None:
        required = [p.name for p in params if p.default is p.empty and p.kind != p.KEYWORD_ONLY]
        if not required:
            raise NativeMappingError(
                f"cannot map {_forward_name(module)}: no parameter takes the token ids "
                f"(expected one of {', '.join(TOKEN_NAMES)}, or a first required positional parameter)"
            )
        tokens = required[0]
    taken = {tokens}
    spec = ForwardSpec(tokens=tokens)
    for field, candidates in (("positions", POSITION_NAMES), ("start_pos", START_POS_NAMES), ("mask", MASK_NAMES),
                              ("cache", CACHE_NAMES), ("use_cache", USE_CACHE_NAMES)):
        name = pick(candidates, taken)
        setattr(spec, field, name)
        if name is not None:
            taken.add(name)
    unmapped = [p.name for p in params if p.name not in taken and p.default is p.empty]
    if unmapped:
        raise NativeMappingError(
            f"cannot map {_forward_name(module)}: required parameter(s) {', '.join(map(repr, unmapped))} have no "
            "transformers counterpart. Give them defaults, or write an HFDecoder with your own _adapt. Recognised: "
            f"tokens {TOKEN_NAMES}, positions {POSITION_NAMES}, start position {START_POS_NAMES}, padding mask "
            f"{MASK_NAMES}, transformers cache {CACHE_NAMES}"
        )
    if cache == "auto":
        spec.cache_mode = "hf" if spec.cache else ("internal" if spec.start_pos else "none")
    elif cache == "hf" and spec.cache is None or cache == "internal" and spec.start_pos is None:
        wanted = CACHE_NAMES if cache == "hf" else START_POS_NAMES
        raise NativeMappingError(f"cache={cache!r}, but {_forward_name(module)} has no parameter among {wanted}")
    elif cache not in ("hf", "internal", "none"):
        raise ValueError(f"cache={cache!r}; choose auto, hf, internal or none")
    else:
        spec.cache_mode = cache
    return spec


def main_tensor(output, owner: str = "the native forward") -> torch.Tensor:
    """The tensor a native forward returns: itself, ``logits``/``last_hidden_state`` of a mapping, or the first
    tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("logits", "last_hidden_state"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        output = tuple(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor) and item.dim() == 3:
                return item
    raise NativeMappingError(
        f"{owner} returned {type(output).__name__}; expected logits or hidden states, (batch, seq, features): a "
        "tensor, a tuple starting with one, or a dict with 'logits' or 'last_hidden_state'"
    )


def probe_output(module: nn.Module, spec: ForwardSpec) -> torch.Tensor:
    """Run the native forward once on two tokens (eval mode, no grad) and return its main output tensor."""
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    call: dict = {spec.tokens: torch.zeros((1, 2), dtype=torch.long, device=device)}
    if spec.start_pos:
        call[spec.start_pos] = 0
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            output = module(**call)
    except Exception as err:
        raise NativeMappingError(
            f"cannot map {_forward_name(module)}: calling it with {spec.tokens}=<1x2 token ids> failed: "
            f"{type(err).__name__}: {err}"
        ) from err
    finally:
        module.train(was_training)
    tensor = main_tensor(output, _forward_name(module))
    if tensor.dim() != 3 or tuple(tensor.shape[:2]) != (1, 2):
        raise NativeMappingError(
            f"{_forward_name(module)} returned shape {tuple(tensor.shape)} for 1x2 token ids; expected (1, 2, features)"
        )
    return tensor


# ============================================================================================ config inference
_TOKEN_EMBED_HINTS = ("tok", "wte", "word", "embed_tokens", "token")
_POSITION_HINTS = ("pos", "wpe", "position")


def find_token_embedding(module: nn.Module) -> tuple[str, nn.Embedding] | None:
    """The token embedding: an ``nn.Embedding`` named like one (``tok_embeddings``, ``wte``, ...), else the first
    embedding that is not a position embedding."""
    embeddings = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Embedding)]
    for name, emb in embeddings:
        if any(h in name.lower() for h in _TOKEN_EMBED_HINTS):
            return name, emb
    for name, emb in embeddings:
        if not any(h in name.lower() for h in _POSITION_HINTS):
            return name, emb
    return None


def find_output_projection(module: nn.Module, vocab_size: int, hidden_size: int | None) -> nn.Linear | None:
    """The native output layer: the last ``nn.Linear`` mapping ``hidden_size`` to ``vocab_size``."""
    found = None
    for _, m in module.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == vocab_size and hidden_size in (None, m.in_features):
            found = m
    return found


def _attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    holders = [module] + [getattr(module, h) for h in _CONFIG_HOLDERS if getattr(module, h, None) is not None]
    for holder in holders:
        for name in names:
            value = holder.get(name) if isinstance(holder, Mapping) else getattr(holder, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _count_layers(module: nn.Module) -> int | None:
    best = 0
    for m in module.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > best:
            kinds = {type(child) for child in m}
            if len(kinds) == 1 and not issubclass(next(iter(kinds)), (nn.Linear, nn.Dropout, nn.Identity)):
                best = len(m)
    if best:
        return best
    rnn = next((m for m in module.modules() if isinstance(m, nn.RNNBase)), None)
    if rnn is not None:
        return rnn.num_layers
    return _attr(module, _LAYER_ATTRS)


def infer_sizes(module: nn.Module) -> tuple[dict, dict]:
    """``(sizes, reasons)``: the sizes inferred from ``module``, and why each missing one could not be."""
    sizes: dict = {}
    reasons: dict = {}
    found = find_token_embedding(module)
    if found is not None:
        sizes["vocab_size"], sizes["hidden_size"] = found[1].num_embeddings, found[1].embedding_dim
    for key, attrs in (("vocab_size", _VOCAB_ATTRS), ("hidden_size", _HIDDEN_ATTRS)):
        if key not in sizes and (value := _attr(module, attrs)) is not None:
            sizes[key] = value
    if "vocab_size" not in sizes:
        reasons["vocab_size"] = "no token nn.Embedding and no vocab_size attribute"
    if "hidden_size" not in sizes:
        reasons["hidden_size"] = f"no token nn.Embedding and no attribute among {_HIDDEN_ATTRS}"
    layers = _count_layers(module)
    if layers:
        sizes["num_hidden_layers"] = layers
    else:
        reasons["num_hidden_layers"] = f"no list of identical blocks, no RNN, no attribute among {_LAYER_ATTRS}"
    context = _attr(module, _CONTEXT_ATTRS)
    if context is None:
        positions = [m for n, m in module.named_modules()
                     if isinstance(m, nn.Embedding) and any(h in n.lower() for h in _POSITION_HINTS)]
        context = positions[0].num_embeddings if positions else None
    if context is not None:
        sizes["max_position_embeddings"] = context
    return sizes, reasons


# ============================================================================================ config and model
class NativeCausalLMConfig(PretrainedConfig):
    """The config of a native decoder wrapped by :func:`to_hf_api`."""

    model_type = "hfbridge_native_causal_lm"

    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    native_class: str | None = None
    native_forward: dict | None = None


class NativeDecoder(HFDecoder):
    """The generic adapter :func:`to_hf_api` writes: maps transformers' arguments per a :class:`ForwardSpec`."""

    def __init__(self, model: nn.Module, config: PretrainedConfig, spec: ForwardSpec):
        super().__init__(model, config)
        self.spec = spec
        self._warned_mask = False

    @property
    def resolved_cache_mode(self) -> str:
        return self.spec.cache_mode

    def _adapt(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, start_pos: int = 0,
               use_cache=None, **kwargs):
        spec = self.spec
        call = {spec.tokens: input_ids}
        if spec.mask and attention_mask is not None:
            call[spec.mask] = attention_mask
        elif attention_mask is not None and not self._warned_mask and bool((attention_mask == 0).any()):
            self._warned_mask = True
            log.warning("%s takes no padding mask: padded positions are attended to (batched generation with "
                        "left padding differs from unpadded generation)", _forward_name(self.model))
        if spec.positions and position_ids is not None:
            call[spec.positions] = position_ids
        if spec.cache_mode == "hf" and past_key_values is not None:
            call[spec.cache] = past_key_values
            if spec.start_pos:
                call[spec.start_pos] = past_key_values.get_seq_length()
        elif spec.start_pos:
            call[spec.start_pos] = start_pos if spec.cache_mode == "internal" else 0
        if spec.use_cache and use_cache is not None:
            call[spec.use_cache] = use_cache
        tensor = main_tensor(self.model(**call), _forward_name(self.model))
        # the cache was updated in place: the wrapper hands on the one it passed
        if spec.output == "logits":
            return CausalLMOutputWithPast(logits=tensor)
        return BaseModelOutputWithPast(last_hidden_state=tensor)


def _spec_for(config: NativeCausalLMConfig, native_model: nn.Module) -> ForwardSpec:
    if config.native_forward:
        return ForwardSpec.from_dict(config.native_forward)
    spec = map_forward(native_model)
    spec.output = "logits" if probe_output(native_model, spec).shape[-1] == config.vocab_size else "hidden"
    return spec


class NativeDecoderModel(HFDecoderModelArchitecture):
    """A native decoder as a transformers base model (see :func:`to_hf_api`)."""

    config_class = NativeCausalLMConfig
    base_model_prefix = "native"

    def __init__(self, config: NativeCausalLMConfig, native_model: nn.Module | None = None, **kwargs):
        if native_model is None:
            where = f" ({config.native_class})" if config.native_class else ""
            raise ValueError(
                f"{type(self).__name__} wraps a native module{where} it cannot build from its config: pass it, "
                f"e.g. {type(self).__name__}.from_pretrained(path, native_model=MyModel(...))"
            )
        spec = _spec_for(config, native_model)
        found = find_token_embedding(native_model)
        super().__init__(NativeDecoder(native_model, config, spec), found[1] if found else None, config, **kwargs)


class NativeModelForCausalLM(LMHeadModelLMHeadMixin, NativeDecoderModel):
    """A native decoder as a transformers causal LM (see :func:`to_hf_api`).

    A native model returning logits keeps its own output layer (pointed at by ``lm_head``, applied by the native
    forward); one returning hidden states gets a new ``lm_head``, tied to the token embedding when
    ``config.tie_word_embeddings``.
    """

    def __init__(self, config: NativeCausalLMConfig, native_model: nn.Module | None = None, **kwargs):
        if native_model is not None and "lm_head" not in kwargs:
            spec = _spec_for(config, native_model)
            if spec.output == "logits":
                head = find_output_projection(native_model, config.vocab_size, config.hidden_size)
                kwargs["lm_head"] = head if head is not None else nn.Identity()
        super().__init__(config, native_model=native_model, **kwargs)


def register_auto_classes(config_class: type = NativeCausalLMConfig, model_class: type = NativeModelForCausalLM) -> None:
    """Register a wrapped model's config and class with ``AutoConfig`` and ``AutoModelForCausalLM`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(config_class.model_type, config_class)
    except ValueError:
        pass
    try:
        AutoModelForCausalLM.register(config_class, model_class)
    except ValueError:
        pass


def to_hf_api(
    module: nn.Module,
    tokenizer=None,
    *,
    cache: str = "auto",
    output: str | None = None,
    **config_overrides,
) -> NativeModelForCausalLM:
    """Wrap a native decoder as a transformers causal LM (``generate``, ``pipeline``, ``save_pretrained``, ...).

    Args:
        module: the native model: token ids in, logits or hidden states out (see the module docstring).
        tokenizer: optional; its pad/bos/eos ids go into the config and generation config.
        cache: ``"auto"``, ``"hf"`` (transformers ``Cache`` argument), ``"internal"`` (the model's own cache,
            indexed by a start position) or ``"none"`` (recompute the sequence at every generation step).
        output: ``"logits"`` or ``"hidden"`` when the output width cannot tell (vocabulary == hidden size).
        **config_overrides: config values that override or complete the inferred ones (``vocab_size``,
            ``hidden_size``, ``num_hidden_layers``, ``max_position_embeddings``, ``tie_word_embeddings``, ...).
    """
    if isinstance(module, HFDecoderModelArchitecture):
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"to_hf_api wraps an nn.Module, got {type(module).__name__}")
    name = type(module).__name__
    spec = map_forward(module, cache)
    sizes, reasons = infer_sizes(module)
    for key in list(reasons):
        if config_overrides.get(key) is not None:
            reasons.pop(key)
    sizes.update({k: v for k, v in config_overrides.items() if v is not None})

    width = int(probe_output(module, spec).shape[-1])
    if output is None:
        vocab, hidden = sizes.get("vocab_size"), sizes.get("hidden_size")
        if vocab is not None and width == vocab and width != hidden:
            output = "logits"
        elif hidden is not None and width == hidden and width != vocab:
            output = "hidden"
        elif vocab is None and hidden is not None:
            output, sizes["vocab_size"] = "logits", width  # logits of an unknown vocabulary: their width
            reasons.pop("vocab_size", None)
        elif vocab is not None and hidden is None and width != vocab:
            output, sizes["hidden_size"] = "hidden", width
            reasons.pop("hidden_size", None)
        elif vocab is not None and width == vocab == hidden:
            reasons["output"] = f"its output width {width} is both the vocabulary and the hidden size; pass output='logits' or 'hidden'"
        elif vocab is not None and hidden is not None:
            reasons["output"] = f"its output width {width} is neither the vocabulary ({vocab}) nor the hidden size ({hidden})"
    elif output not in ("logits", "hidden"):
        raise ValueError(f"output={output!r}; choose 'logits' or 'hidden'")
    if reasons:
        detail = "; ".join(f"{k} ({why})" for k, why in reasons.items())
        keywords = ", ".join(f"{k}=..." for k in reasons if k != "output")
        hint = f" Pass them: to_hf_api(module, {keywords})." if keywords else ""
        raise NativeMappingError(f"to_hf_api could not infer from {name}: {detail}.{hint}")
    spec.output = output

    found = find_token_embedding(module)
    if output == "hidden" and "tie_word_embeddings" not in config_overrides:
        # a new head shares the token embedding when one of the right shape exists
        sizes["tie_word_embeddings"] = found is not None and (
            found[1].num_embeddings, found[1].embedding_dim) == (sizes["vocab_size"], sizes["hidden_size"])
    if output == "logits":
        sizes["tie_word_embeddings"] = False  # the native output layer is the head; ties inside it stay as they are
    special = {}
    if tokenizer is not None:
        special = {k: getattr(tokenizer, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config = NativeCausalLMConfig(
        native_class=f"{type(module).__module__}.{type(module).__qualname__}", native_forward=spec.to_dict(),
        **special, **sizes,
    )
    model = NativeModelForCausalLM(config, native_model=module)
    if tokenizer is not None and model.generation_config is not None:
        for key, value in special.items():
            if value is not None:
                setattr(model.generation_config, key, value)
    return model

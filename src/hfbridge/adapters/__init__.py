"""Hugging Face functionality for PyTorch-native modules (seed 004): wrap a native model once, then use
``generate``, ``pipeline``, ``save_pretrained``/``from_pretrained``, the Auto classes and hfbridge training on it.

See ``docs/adapters.md``. The classes keep the seed's names.
"""

from hfbridge.adapters.base import (
    AdapterError,
    HFDecoder,
    HFDecoderModelArchitecture,
    HFEncoder,
    HFEncoderDecoderModelArchitecture,
    HFEncoderModelArchitecture,
    HFModelArchitecture,
)
from hfbridge.adapters.cache import NativeCache
from hfbridge.adapters.heads import (
    ConditionalGenerationLMHeadMixin,
    LMHeadMixin,
    LMHeadModelLMHeadMixin,
    SequenceClassificationLMHeadMixin,
    shift_tokens_right,
)

__all__ = [
    "AdapterError",
    "ConditionalGenerationLMHeadMixin",
    "HFDecoder",
    "HFDecoderModelArchitecture",
    "HFEncoder",
    "HFEncoderDecoderModelArchitecture",
    "HFEncoderModelArchitecture",
    "HFModelArchitecture",
    "LMHeadMixin",
    "LMHeadModelLMHeadMixin",
    "NativeCache",
    "SequenceClassificationLMHeadMixin",
    "shift_tokens_right",
]

from hfbridge.adapters.auto import (  # noqa: E402
    ForwardSpec,
    NativeCausalLMConfig,
    NativeDecoder,
    NativeMappingError,
    NativeModelForCausalLM,
    register_auto_classes,
    to_hf_api,
)

__all__ += [
    "ForwardSpec",
    "NativeCausalLMConfig",
    "NativeDecoder",
    "NativeMappingError",
    "NativeModelForCausalLM",
    "register_auto_classes",
    "to_hf_api",
]

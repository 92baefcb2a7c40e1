"""Model faces and the loading core. The modules are imported on first use; this package imports nothing from the
parallel layer, the adapters face or the data layer (see :mod:`hfbridge.models.hooks`)."""

from hfbridge._shared import lazy_exports

_EXPORTS = {
    "HFAutoModelForCausalLM": "hfbridge.models.causal_lm",
    "HFAutoModelForImageTextToText": "hfbridge.models.image_text",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""Model faces and the loading core."""

from hfbridge.models.causal_lm import HFAutoModelForCausalLM

__all__ = ["HFAutoModelForCausalLM"]

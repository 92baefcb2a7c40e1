"""JAX tests run on 8 virtual CPU devices: XLA reads this flag when its CPU backend starts, so it is set here,
before any test module touches jax."""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax_helpers import FAMILIES, MORE_FAMILIES, perturb_small_tensors  # noqa: E402


@pytest.fixture(scope="session")
def jax_tokenizer():
    pytest.importorskip("jax")
    from hfbridge.testing import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def jax_model_dir(tmp_path_factory, jax_tokenizer):
    """``jax_model_dir(name)``: a folder holding the tiny random model ``FAMILIES[name]`` (built once)."""
    from hfbridge.testing import build_tiny_causal_lm

    built: dict[str, str] = {}

    def get(name: str = "llama") -> str:
        if name not in built:
            spec = dict({**FAMILIES, **MORE_FAMILIES}[name])
            family = spec.pop("family")
            folder = tmp_path_factory.mktemp(name)
            build_tiny_causal_lm(folder, family, tokenizer=jax_tokenizer, **spec)
            perturb_small_tensors(folder)
            built[name] = str(folder)
        return built[name]

    return get


@pytest.fixture(scope="session")
def hf_logits():
    """``hf_logits(folder, ids, **config_overrides)``: transformers' fp32 logits as numpy."""
    import torch
    from transformers import AutoModelForCausalLM

    def run(folder, ids, attention_mask=None, **overrides):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **overrides).eval()
        kwargs = {} if attention_mask is None else {"attention_mask": torch.tensor(np.asarray(attention_mask))}
        with torch.no_grad():
            return model(torch.tensor(np.asarray(ids)), **kwargs).logits.numpy()

    return run


@pytest.fixture
def ids():
    return np.random.default_rng(0).integers(0, 500, size=(2, 12)).astype(np.int32)

"""Fixtures for the adapter tests: the native models of ``examples/`` and an HF Llama with the same weights."""

import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import native_llama  # noqa: E402

from hfbridge.testing import tiny_llama_config  # noqa: E402


def _perturb_norms(model: torch.nn.Module) -> None:
    """RMSNorm weights start at 1; make them differ so a wrong mapping of them shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)


@pytest.fixture(scope="session")
def llama_config(tiny_tokenizer):
    config = tiny_llama_config(len(tiny_tokenizer))
    config.pad_token_id = tiny_tokenizer.pad_token_id
    config.eos_token_id = tiny_tokenizer.eos_token_id
    config.bos_token_id = tiny_tokenizer.bos_token_id
    return config


@pytest.fixture(scope="session")
def hf_llama(llama_config):
    """A transformers LlamaForCausalLM (the reference), tiny and random."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config).eval()
    _perturb_norms(model)
    return model


@pytest.fixture
def native_transformer(llama_config, hf_llama):
    """The native Llama of examples/native_llama.py with the reference's weights."""
    transformer = native_llama.Transformer(native_llama.model_args_from_config(llama_config, max_batch_size=8))
    return native_llama.load_hf_llama_weights(transformer, hf_llama)


@pytest.fixture
def prompt_ids(tiny_tokenizer):
    texts = ["The quick brown fox", "What is the capital of"]
    rows = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"][:4] for t in texts]
    return torch.tensor(rows)

"""Tiny random Llama-family models saved once per test session, for the GGUF export tests."""

import pytest

from hfbridge.testing import build_tiny_causal_lm

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _overrides(family: str) -> dict:
    # Weights 5x the default init: with the default, attention is so flat that even a wrong q/k layout changes
    # the logits by less than 0.01, so the round trip would prove little. transformers' GGUF reader gives qwen3
    # models Qwen3Config's head_dim (128) whatever the file says.
    return {"initializer_range": 0.1, **({"head_dim": 128} if family == "qwen3" else {})}


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory, tiny_tokenizer):
    made: dict = {}

    def build(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = build_tiny_causal_lm(tmp_path_factory.mktemp(f"tiny-{family}"), family,
                                             tokenizer=tiny_tokenizer, **{**_overrides(family), **overrides})
        return made[key]

    return build

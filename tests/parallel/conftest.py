"""Fixtures of the parallel tests: tiny models on disk and single-process reference runs."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hfbridge.testing import build_tiny_causal_lm  # noqa: E402


@pytest.fixture(scope="session")
def qwen3_tied_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Qwen3 (per-head q/k norms) with tied input and output embeddings."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-qwen3-tied"), "qwen3", tokenizer=tiny_tokenizer,
                                tie_word_embeddings=True)

"""Fixtures of the preference tests: string and conversational pairs, KTO examples."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def string_pairs() -> list[dict]:
    return [{"prompt": f"what is {i} plus {i}?", "chosen": f"it is {2 * i}", "rejected": f"maybe {i + 7} or so"}
            for i in range(8)]


@pytest.fixture
def chat_pairs() -> list[dict]:
    return [{"chosen": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}],
             "rejected": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "go away"}]}
            for i in range(8)]
